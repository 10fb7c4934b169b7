"""`samless export`: a phase-2 checkpoint -> a model package that `samless segment` and Slicer load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from samless import __version__
from samless.errors import SamlessError
from samless.modeling import build_model
from samless.package_write import save_package
from samless.training.checkpoint import checkpoint_card, load_checkpoint_info, load_model_weights
from samless.training.teachers import TEACHERS
from samless.training.train import run_settings, split_sha256

DEFAULT_INTENDED_USE = ("Research on MS lesion segmentation of brain FLAIR MRI. Not validated for clinical use; "
                        "not a medical device.")


def export_package(checkpoint: str | Path, out: str | Path, *, name: str | None = None,
                   metrics: str | Path | None = None, description: str = "", license: str = "Apache-2.0",
                   intended_use: str = DEFAULT_INTENDED_USE, training_data: str = "",
                   extra: dict[str, Any] | None = None, overwrite: bool = False, half: bool = False,
                   postprocessing: dict[str, Any] | None = None) -> Path:
    """Write the package; provenance records data, every run of the --init chain, SAM checkpoint and the
    run's settings; `postprocessing` (e.g. from `samless tune`) replaces the default threshold / minimum size."""
    checkpoint = Path(checkpoint)
    info = load_checkpoint_info(checkpoint)
    if info.get("phase") != 2:
        raise SamlessError(f"{checkpoint} is a phase-{info.get('phase')} checkpoint: its aggregator was never "
                           "trained. Run `samless train phase2 --init` on it and export that.")
    card = checkpoint_card(checkpoint, info)
    net = build_model(card.architecture)
    net.load_state_dict(load_model_weights(checkpoint))
    config = info["config"]
    card = card.replace(
        name=name or card.name,
        description=description or card.description,
        license=license,
        intended_use=intended_use,
        provenance={
            "samless_version": __version__,
            "training_data": training_data or config["split"],
            "split_sha256": info.get("split_sha256") or split_sha256(config["split"]),  # as trained: it may move
            "fold": config["fold"],
            "phases": training_runs(checkpoint),
            "settings": config,
        },
        metrics=_metrics(metrics, info),
        postprocessing=card.postprocessing.updated(postprocessing),
        extra={**card.extra, **(extra or {})},  # other keys of the card (e.g. "demo")
    )
    return save_package(net, card, out, overwrite=overwrite, half=half)


def training_runs(checkpoint: str | Path, seen: set[Path] | None = None) -> list[dict[str, Any]]:
    """The runs that made a checkpoint, oldest first, found by following each run's --init back to a run
    from scratch, a phase-1 run or a model package (listed with the provenance its card gave); a checkpoint
    no longer on disk ends the chain with a note saying so, and so does one met twice (a cycle, e.g. a
    checkpoint overwritten by a run it started)."""
    seen = set() if seen is None else seen
    runs: list[dict[str, Any]] = []
    path: str | Path | None = checkpoint
    while path:
        where = Path(path).resolve()
        if where in seen:
            runs.append({"run": _run_name(path), "note": f"checkpoint {path} appears twice in its own history"})
            break
        seen.add(where)
        try:
            info = load_checkpoint_info(path)
        except SamlessError:  # checkpoint.py alone decides what a checkpoint folder holds
            runs.append({"run": _run_name(path), "note": f"checkpoint {path} is no longer on disk"})
            break
        if info.get("average_of"):  # `samless train average`: its members' chains, each in full
            members = [training_runs(m, set(seen)) if isinstance(m, str) else [_package_entry(m)]
                       for m in info["average_of"]]
            runs.append({"phase": 2, "run": _run_name(path), "average_of": members})
            break
        runs.append(_run_entry(info, path))
        if info.get("init_package"):  # fine-tuned from a model package: its card told how it was made
            runs.append(_package_entry(info["init_package"]))
            break
        path = info["config"].get("init") or None  # phase 1 too may start from a trained network
    return runs[::-1]


def _package_entry(package: dict[str, Any]) -> dict[str, Any]:
    """A model package in a chain of runs, as the run that used it recorded it (`package_identity`)."""
    return {"run": _run_name(package["source"]), "package": package["name"], "source": package["source"],
            "weights_sha256": package["weights_sha256"], "provenance": package["provenance"]}


def _run_name(checkpoint: str | Path) -> str:
    """A run's folder name (training writes RUN/checkpoints/{best,last}), else the checkpoint's own name."""
    path = Path(checkpoint)
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.name


def _run_entry(info: dict[str, Any], checkpoint: str | Path) -> dict[str, Any]:
    """One run as the card's provenance lists it."""
    config = run_settings(info["config"])
    entry: dict[str, Any] = {"phase": info.get("phase"), "run": _run_name(checkpoint), "epochs": config["epochs"],
                             "best_epoch": _best_epoch(info)}
    done = int(info.get("epoch", config["epochs"] - 1)) + 1
    if done < config["epochs"]:  # a run stopped early (--stop-after, or a session's end): say so
        entry["epochs_done"] = done
    for key in ("soft_labels", "three_plane"):  # noted only where used, so other runs' entries read as before
        if config[key]:
            entry[key] = True
    if info.get("phase") == 1:
        entry.update(sam_type=config["sam_type"], teacher=TEACHERS[config["sam_type"]].name,
                     teacher_licence=TEACHERS[config["sam_type"]].licence, sparse_prompt=config["sparse_prompt"],
                     sam_checkpoint=Path(config["sam_checkpoint"]).name
                     if config["sam_checkpoint"] else "random weights (not a real SAM)")
        if info.get("teacher_sha256"):
            entry["sam_checkpoint_sha256"] = info["teacher_sha256"]
        return entry
    entry.update(init=_run_name(config["init"]) if config["init"] else "scratch",
                 context_slices=config["context_slices"], finetune_learner=config["finetune_learner"],
                 loss=config["loss"], patch_size=config["patch_size"] or None, sampling=config["sampling"],
                 cpu_bf16=config["cpu_bf16"])
    return entry


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
