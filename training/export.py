"""`samless export`: a phase-2 checkpoint -> a model package that `samless segment` and Slicer load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from samless import __version__
from samless.errors import SamlessError
from samless.modeling import build_model
from samless.package import save_package
from samless.training.checkpoint import load_checkpoint_info, load_model_weights

DEFAULT_INTENDED_USE = ("Research on MS lesion segmentation of brain FLAIR MRI. Not validated for clinical use; "
                        "not a medical device.")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def export_package(checkpoint: str | Path, out: str | Path, *, name: str | None = None,
                   metrics: str | Path | None = None, description: str = "", license: str = "Apache-2.0",
                   intended_use: str = DEFAULT_INTENDED_USE, training_data: str = "", phase1: str | Path | None = None,
                   extra: dict[str, Any] | None = None, overwrite: bool = False, half: bool = False,
                   postprocessing: dict[str, Any] | None = None) -> Path:
    """Write the package; provenance records data, phases, SAM checkpoint and the run's settings;
    `postprocessing` (e.g. from `samless tune`) replaces the default threshold / minimum lesion size."""
    checkpoint = Path(checkpoint)
    info = load_checkpoint_info(checkpoint)
    if info.get("phase") != 2:
        raise SamlessError(f"{checkpoint} is a phase-{info.get('phase')} checkpoint: its aggregator was never "
                           "trained. Run `samless train phase2 --init` on it and export that.")
    card = dict(info["card"])
    net = build_model(card["architecture"])
    net.load_state_dict(load_model_weights(checkpoint))
    config = info["config"]
    init_info = load_checkpoint_info(phase1 or config["init"]) if (phase1 or config.get("init")) else None
    init_phase = init_info.get("phase") if init_info else None
    phase1_config = init_info["config"] if init_phase == 1 else {}
    if init_phase == 2:  # fine-tuning or 2D -> 2.5D: the earlier run comes first
        earlier = [_phase2_entry(init_info, "a checkpoint" if init_info["config"].get("init") else "scratch")]
        run = Path(config["init"]).parent.parent.name
        start = f"phase-2 network ({run}, {init_info['config'].get('epochs')} epochs)"
    else:
        earlier, start = [], "phase-1 learner" if init_phase == 1 else "scratch"
    card.update({
        "name": name or card["name"],
        "description": description or card.get("description", ""),
        "license": license,
        "intended_use": intended_use,
        "provenance": {
            "samless_version": __version__,
            "training_data": training_data or config["split"],
            "split_sha256": _sha256(Path(config["split"])),
            "fold": config["fold"],
            "phases": earlier + [p for p in (
                {"phase": 1, "epochs": phase1_config.get("epochs"), "sam_type": phase1_config.get("sam_type"),
                 "sam_checkpoint": Path(phase1_config["sam_checkpoint"]).name
                 if phase1_config.get("sam_checkpoint") else "random weights (not a real SAM)"}
                if init_phase == 1 else None,
                {**_phase2_entry(info, start), "finetune_learner": config["finetune_learner"],
                 "best_epoch": _best_epoch(info)},
            ) if p],
            "settings": config,
        },
        "metrics": _metrics(metrics, info),
    })
    card["postprocessing"] = {**card["postprocessing"], **(postprocessing or {})}
    if extra:
        card.update(extra)
    return save_package(net, card, out, overwrite=overwrite, half=half)


def _phase2_entry(info: dict[str, Any], start: str) -> dict[str, Any]:
    """A phase-2 run as the card's provenance lists it."""
    config = info["config"]
    return {"phase": 2, "epochs": config.get("epochs"), "init": start,
            "context_slices": config.get("context_slices", 0), "best_epoch": _best_epoch(info)}


def _best_epoch(info: dict[str, Any]) -> int | None:
    scored = [r for r in info.get("history", []) if "val_dice" in r]
    return max(scored, key=lambda r: r["val_dice"])["epoch"] if scored else info.get("epoch")


def _metrics(path: str | Path | None, info: dict[str, Any]) -> dict[str, Any]:
    """An evaluation summary if given, else the best validation scores of the run."""
    if path:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    scored = [r for r in info.get("history", []) if "val_dice" in r]
    if not scored:
        return {}
    best = max(scored, key=lambda r: r["val_dice"])
    return {"validation": {k: v for k, v in best.items() if k.startswith("val_")}}
