"""A model package's card as readable text, for `samless info`."""

from __future__ import annotations

import json
from typing import Any

from samless.package import ModelPackage


def describe(package: ModelPackage) -> str:
    """The model card as readable text (for `samless info`)."""
    card = package.card
    arch, inputs, post = card.architecture, card.inputs, card.postprocessing
    lines = [
        f"{card.name}  (schema {card.schema_version}, {package.source})",
        card.description,
        f"intended use : {card.intended_use or 'not stated'}",
        f"licence      : {card.license or 'not stated'}",
        f"network      : {arch.backbone} learner + {arch.aggregator} aggregator, "
        f"input {arch.input_size}px, embedding {arch.embed_dim}x{arch.embed_size}^2",
        f"inputs       : {', '.join(inputs.modalities)}; {inputs.slicing_axis} slices at "
        f"{' x '.join(str(s) for s in inputs.spacing_mm)} mm; planes {', '.join(inputs.planes)}"
        + (f"; {inputs.context_slices} neighbouring slices a side" if inputs.context_slices else ""),
        f"defaults     : threshold {post.threshold}, minimum lesion {post.min_lesion_mm3} mm^3"
        + (f"; borders grow to {post.borders['rim_fraction']:g} of a lesion's contrast within "
           f"{post.borders['reach_mm']:g} mm" if post.borders else ""),
        "files        : " + ", ".join(f"{n} ({'?' if f.bytes is None else f.bytes} B)" for n, f in card.files.items()),
    ]
    lines += _provenance_lines(dict(card.provenance))
    lines += [f"metrics      : {line}" for line in _metric_lines(dict(card.metrics))]
    return "\n".join(line for line in lines if line)


def _provenance_lines(provenance: dict[str, Any]) -> list[str]:
    """Training data and the runs that made the network, oldest first (`--json` gives every setting)."""
    lines = []
    if provenance.get("training_data"):
        sha = provenance.get("split_sha256") or "?"
        lines.append(f"trained on   : {provenance['training_data']} (fold {provenance.get('fold', '?')}, "
                     f"split sha256 {sha[:12]})")
    runs = _run_lines(provenance.get("phases") or [])
    lines += [("runs         : " if i == 0 else " " * 15) + line for i, line in enumerate(runs)]
    return lines


def _run_lines(runs: list[dict[str, Any]], depth: int = 0) -> list[str]:
    """One line per run; an average's members and a package's own runs indented below it. Cards come from
    anywhere (and from older versions, whose runs had no names): what is missing reads "?"."""
    pad, out = "  " * depth, []
    for run in (r for r in runs if isinstance(r, dict)):
        name = run.get("run", "?")
        if run.get("average_of"):
            members = [m if isinstance(m, list) else [] for m in run["average_of"]]
            shared = _shared_start(members)
            out.append(f"{pad}{name}: the mean of {len(members)} networks' weights"
                       + (f", all trained on from these {shared} runs:" if shared else ":"))
            out += _run_lines(members[0][:shared], depth + 1)
            for i, member in enumerate(members, 1):
                alone = f" {member[-1].get('run', '?')} as it is" if shared and not member[shared:] else ""
                out.append(f"{pad}  network {i}:{alone}")
                out += _run_lines(member[shared:], depth + 2)
        elif "package" in run:
            out.append(f"{pad}{name}: model package {run['package']} (weights sha256 "
                       f"{str(run.get('weights_sha256', '?'))[:12]}), itself made by:")
            out += _run_lines((run.get("provenance") or {}).get("phases") or [], depth + 1)
        elif "note" in run:
            out.append(f"{pad}{name}: {run['note']}")
        elif run.get("phase") == 1:
            out.append(f"{pad}{name}: phase 1, {_epochs(run)}, SAM {run.get('sam_type', '?')} "
                       f"({', '.join([str(run.get('sam_checkpoint')), *_flags(run)])})")
        else:
            extras = [f"{key} {run[key]}" for key in ("context_slices", "loss", "patch_size", "sampling")
                      if run.get(key) not in (None, 0, False)] + _flags(run)
            out.append(f"{pad}{name}: phase {run.get('phase', '?')}, {_epochs(run)} from "
                       f"{run.get('init', '?')}" + (f" ({', '.join(extras)})" if extras else ""))
    return out


def _epochs(run: dict[str, Any]) -> str:
    """"40 epochs", or "30 of 40 epochs" for a run stopped before its schedule's end."""
    if "epochs_done" in run:
        return f"{run['epochs_done']} of {run.get('epochs', '?')} epochs"
    return f"{run.get('epochs', '?')} epochs"


def _flags(run: dict[str, Any]) -> list[str]:
    """A run's on/off settings that are on, by name."""
    names = (("cpu_bf16", "bfloat16"), ("soft_labels", "soft labels"), ("three_plane", "three planes"))
    return [name for key, name in names if run.get(key)]


def _shared_start(chains: list[list[Any]]) -> int:
    """How many runs, oldest first, every chain begins with (so an average lists its common history once)."""
    shared = 0
    while chains and all(len(c) > shared for c in chains) and all(c[shared] == chains[0][shared] for c in chains):
        shared += 1
    return shared


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    """Headline numbers of an evaluation summary (or of validation) for the card's text form."""
    if "methods" in metrics:
        out = [f"{metrics.get('cases', '?')} evaluation cases"]
        for method, stats in metrics["methods"].items():
            parts = [f"{key} {stats[key]['mean']:.3f}" for key in ("dice", "lesion_f1", "lesion_tpr",
                                                                  "false_positives", "seconds") if key in stats]
            out.append(f"  {method}: " + ", ".join(parts))
        return out
    return [json.dumps(metrics, sort_keys=True)] if metrics else []


# --- finding a package by name -----------------------------------------------------------------
