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
    # A phase-2 start (fine-tuning, 2D -> 2.5D) carries its own phases: they come first.
    earlier = [{"phase": 2, "epochs": init_info["config"].get("epochs"),
                "init": "a checkpoint" if init_info["config"].get("init") else "scratch",
                "context_slices": init_info["config"].get("context_slices", 0), "best_epoch": _best_epoch(init_info)}
               ] if init_info and init_info.get("phase") == 2 else []
    phase1_info = init_info if init_info and init_info.get("phase") == 1 else None
    phase1_config = phase1_info["config"] if phase1_info else {}
    start = "scratch" if not init_info else ("phase-1 learner" if phase1_info else
                                             f"phase-2 network ({Path(config['init']).parent.parent.name}, "
                                             f"{init_info['config'].get('epochs')} epochs)")
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
                if phase1_info else None,
                {"phase": 2, "epochs": config["epochs"], "init": start,
                 "context_slices": config.get("context_slices", 0),
                 "finetune_learner": config["finetune_learner"], "best_epoch": _best_epoch(info)},
            ) if p],
            "settings": config,
        },
        "metrics": _metrics(metrics, info),
    })
    card["postprocessing"] = {**card["postprocessing"], **(postprocessing or {})}
    if extra:
        card.update(extra)
    return save_package(net, card, out, overwrite=overwrite, half=half)


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
