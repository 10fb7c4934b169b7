"""`samless train average`: one network whose weights are the mean of several phase-2 checkpoints.

Runs fine-tuned from one starting point stay in one basin of the loss, and the mean of their weights (a
"model soup", Wortsman et al. 2022) tends to score like an ensemble of them at the cost of one network.
Members are phase-2 checkpoints or model packages (e.g. a fine-tuned network averaged with the package it
started from). The result is an ordinary phase-2 checkpoint (OUT/checkpoints/best): `samless export` and
`samless train phase2 --init` take it as any other, and the export's provenance lists each member's own
chain of runs (a package's as its card gave it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from samless.card import ModelCard
from samless.errors import SamlessError
from samless.imageio import refuse_existing
from samless.modeling import build_model
from samless.training.checkpoint import (
    checkpoint_card,
    is_checkpoint,
    load_checkpoint_info,
    load_model_weights,
    save_checkpoint,
)
from samless.training.train import package_identity, package_weights, split_sha256

# What must match for weights to be averaged meaningfully: the network and what it is given.
_SAME = ("architecture", "inputs", "normalization")


def average_checkpoints(members: list[str | os.PathLike], out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write OUT/checkpoints/best holding the mean of the members' weights (phase-2 checkpoints, or model
    packages: folders, .zip files or bundled names); return its path."""
    if len(members) < 2:
        raise SamlessError("averaging needs at least two phase-2 checkpoints or model packages.")
    target = Path(out) / "checkpoints" / "best"
    refuse_existing([target], overwrite, "choose another --out")
    if target.resolve() in {Path(m).resolve() for m in members}:
        raise SamlessError(f"{target} is one of the checkpoints to average; write the mean to another --out.")
    found = [_member(m) for m in members]
    _check_compatible(found)
    checkpoints = [m for m in found if m.split is not None]
    if not checkpoints:
        raise SamlessError("give at least one phase-2 checkpoint among the members: packages record only the "
                           "sha256 of their split file, and the average's export reads the file itself.")
    # A fresh card of the shared network and inputs: not one member's description, tuned defaults or date.
    first = found[0].card
    card = ModelCard(name=Path(out).name, architecture=first.architecture, inputs=first.inputs,
                     normalization=first.normalization)
    net = build_model(card.architecture)
    net.load_state_dict(_mean([m.weights for m in found]))
    # The members' data; their own settings stay in their checkpoints (the export lists each member's runs).
    config = {"phase": 2, "split": checkpoints[0].split, "fold": checkpoints[0].fold, "out": str(out), "init": ""}
    return save_checkpoint(target, net, None, phase=2, epoch=None, history=[], config=config, card=card.to_json(),
                           average_of=[m.record for m in found])


@dataclass
class _Member:
    """One network to average: what it is, what it learnt from, and what the average records of it."""

    given: str
    card: ModelCard
    weights: dict[str, torch.Tensor]
    split_sha256: str
    fold: int | None  # None: a package whose card does not say
    split: str | None  # a checkpoint's split file (packages keep only its sha256)
    record: str | dict[str, Any]  # a checkpoint's resolved path; a package's identity


def _member(member: str | os.PathLike) -> _Member:
    if not is_checkpoint(member):  # a model package
        weights, package = package_weights(str(member))
        provenance = package.card.provenance
        return _Member(str(member), package.card, weights, provenance.get("split_sha256", ""),
                       provenance.get("fold"), None, package_identity(package))
    info = load_checkpoint_info(member)
    if info.get("phase") != 2:
        raise SamlessError(f"{member} is a phase-{info.get('phase')} checkpoint; only phase-2 networks (learner and "
                           "aggregator trained together) can be averaged.")
    split = info["config"]["split"]
    if not Path(split).is_file():
        raise SamlessError(f"{member} was trained on {split}, which is gone; the average must say what it learnt "
                           "from, so put the split file back.")
    return _Member(str(member), checkpoint_card(member, info), load_model_weights(member), split_sha256(split),
                   info["config"]["fold"], split, str(Path(member).resolve()))


def _mean(weights: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean of floating-point tensors (computed in float64). BatchNorm's step counters are the first
    member's (evaluation never reads them); any other integer tensor must be the same in every member."""
    for key, value in weights[0].items():
        if (not value.is_floating_point() and not key.endswith("num_batches_tracked")
                and any(not torch.equal(w[key], value) for w in weights[1:])):
            raise SamlessError(f"the networks differ in {key}, which holds integers and has no mean; average "
                               "networks that agree on it.")
    return {k: (torch.stack([w[k].double() for w in weights]).mean(0).to(v.dtype) if v.is_floating_point() else v)
            for k, v in weights[0].items()}


def _difference(theirs: Any, ours: Any) -> str:
    """What differs between two card sections, setting by setting: "planes ['axial'] vs [...]"."""
    if not (isinstance(theirs, dict) and isinstance(ours, dict)):
        return f"{theirs!r} vs {ours!r}"
    keys = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    return "; ".join(f"{k} {theirs.get(k)!r} vs {ours.get(k)!r}" for k in keys)


def _training_data(member: _Member, key: str) -> str:
    """How a member's split file or fold reads in a refusal: its path where known (a split with soft masks
    and one without are two files), else the start of its sha256."""
    if key == "fold":
        return f"fold {member.fold}"
    return member.split or f"sha256 {member.split_sha256[:12]}..."


def _check_compatible(members: list[_Member]) -> None:
    """Members must share the network, its inputs and intensity normalisation, and (for the provenance the
    package records) the training data: the same split file contents and fold."""
    first = members[0]
    for member in members[1:]:
        for key in _SAME:
            theirs, ours = member.card.to_json()[key], first.card.to_json()[key]
            if theirs != ours:
                raise SamlessError(f"{member.given} differs from {first.given} in its {key} "
                                   f"({_difference(theirs, ours)}); average runs of "
                                   "one network given the same inputs only.")
        for key in ("split_sha256", "fold"):
            what = "split file" if key == "split_sha256" else key
            unrecorded = [m.given for m in (first, member) if getattr(m, key) in (None, "")]
            if unrecorded:
                raise SamlessError(f"{unrecorded[0]} does not record its {what} (a package exported without "
                                   "it), so the average could not say what it learnt from; average checkpoints, "
                                   "or packages whose cards record it.")
            if getattr(member, key) != getattr(first, key):
                raise SamlessError(f"{member.given} was trained on another {what} than {first.given} "
                                   f"({_training_data(member, key)} vs {_training_data(first, key)}); average runs "
                                   "on the same training data only, so the package can say what it learnt from.")
