"""`samless train average`: one network whose weights are the mean of several phase-2 checkpoints.

Runs fine-tuned from one starting point stay in one basin of the loss, and the mean of their weights (a
"model soup", Wortsman et al. 2022) tends to score like an ensemble of them at the cost of one network.
The result is an ordinary phase-2 checkpoint (OUT/checkpoints/best): `samless export` and `samless train
phase2 --init` take it as any other, and the export's provenance lists each member's
own chain of runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from samless.errors import SamlessError
from samless.modeling import build_model
from samless.training.checkpoint import load_checkpoint_info, load_model_weights, save_checkpoint

# What must match for weights to be averaged meaningfully: the network and what it is given.
_SAME = ("architecture", "inputs", "normalization")


def average_checkpoints(members: list[str | os.PathLike], out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write OUT/checkpoints/best holding the mean of the members' weights; return its path."""
    if len(members) < 2:
        raise SamlessError("averaging needs at least two phase-2 checkpoints.")
    target = Path(out) / "checkpoints" / "best"
    if target.exists() and not overwrite:
        raise SamlessError(f"{target} already exists; pass --overwrite to replace it or choose another --out.")
    if target.resolve() in {Path(m).resolve() for m in members}:
        raise SamlessError(f"{target} is one of the checkpoints to average; write the mean to another --out.")
    infos = [_member_info(m) for m in members]
    _check_compatible(infos, members)
    weights = _mean([load_model_weights(m) for m in members])
    card = {**infos[0]["card"], "name": Path(out).name}
    net = build_model(card["architecture"])
    net.load_state_dict(weights)
    # The members' data; their own settings stay in their checkpoints (the export lists each member's runs).
    config = {"phase": 2, "split": infos[0]["config"]["split"], "fold": infos[0]["config"]["fold"],
              "out": str(out), "init": ""}
    return save_checkpoint(target, net, None, phase=2, epoch=None, history=[], config=config, card=card,
                           average_of=[str(Path(m).resolve()) for m in members])


def _member_info(member: str | os.PathLike) -> dict[str, Any]:
    info = load_checkpoint_info(member)
    if info.get("phase") != 2:
        raise SamlessError(f"{member} is a phase-{info.get('phase')} checkpoint; only phase-2 networks (learner and "
                           "aggregator trained together) can be averaged.")
    return info


def _mean(weights: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean of floating-point tensors (computed in float64); counters such as BatchNorm's are the first's."""
    return {k: (torch.stack([w[k].double() for w in weights]).mean(0).to(v.dtype) if v.is_floating_point() else v)
            for k, v in weights[0].items()}


def _check_compatible(infos: list[dict[str, Any]], members: list[str | os.PathLike]) -> None:
    """Members must share the network, its inputs and intensity normalisation, and (for the provenance the
    package records) the training data: the split file and fold."""
    for info, member in zip(infos[1:], members[1:]):
        for key in _SAME:
            if info["card"].get(key) != infos[0]["card"].get(key):
                raise SamlessError(f"{member} differs from {members[0]} in its {key}; average runs of one network "
                                   "given the same inputs only.")
        for key, value in (("split", lambda c: Path(c["split"]).resolve()), ("fold", lambda c: c["fold"])):
            if value(info["config"]) != value(infos[0]["config"]):
                raise SamlessError(f"{member} was trained on another {key} than {members[0]}; average runs on the "
                                   "same training data only, so the package can say what it learnt from.")
