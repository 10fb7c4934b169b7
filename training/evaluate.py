"""`samless evaluate`: accuracy and speed of one or more methods on the same cases.

Methods: model packages (SAM-free, exactly as `samless segment` runs them) and phase-1 checkpoints
(learner + SAM, as in the paper's phase 1), so the paper's comparison comes from one command. Every
method goes through the same pipeline (preprocessing, windows, back-mapping, post-processing).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from samless.backends import ModuleBackend
from samless.errors import SamlessError
from samless.imageio import csv_text, refuse_existing, write_text
from samless.package import load_package, resolve_model
from samless.pipeline import Segmenter, SegmentOptions, load_inputs
from samless.training.metrics import SIZE_BINS_MM3, bin_name, case_metrics, summarize
from samless.training.split import Case, check_cases

HEADLINE = ("dice", "iou", "hd95_mm", "assd_mm", "sensitivity", "precision", "lesion_tpr", "lesion_precision",
            "lesion_f1", "false_positives", "abs_volume_diff_ml", "seconds")


@dataclass
class Method:
    """A named way to segment a case: case in, uint8 label map on the case's grid out."""

    name: str
    segment: Callable[[Case], sitk.Image]
    modalities: list[str]


def segmenter_method(name: str, segmenter: Segmenter, options: SegmentOptions | None = None) -> Method:
    modalities = segmenter.modalities

    def segment(case: Case) -> sitk.Image:
        return segmenter.segment(load_inputs(case.images, modalities), options).label

    return Method(name, segment, modalities)


def package_method(model: str, backend: str = "auto", device: str = "auto", threads: int | None = None,
                   options: SegmentOptions | None = None) -> Method:
    package = load_package(resolve_model(model))
    return segmenter_method(f"{package.name} (no SAM)",
                            Segmenter.from_package(package, backend, device, threads), options)


def baseline_method() -> Method:
    """The LGA-like classical baseline (phantom cases: it needs their white-matter map)."""
    from samless.training.baseline import lga_baseline, phantom_white_matter

    def segment(case: Case) -> sitk.Image:
        return lga_baseline(sitk.ReadImage(str(case.images[0])), phantom_white_matter(case.images[0].parent))

    return Method("LGA-like baseline (FLAIR threshold in WM)", segment, ["FLAIR"])


def phase1_method(checkpoint: str, sam_type: str | None = None, sam_checkpoint: str | None = None,
                  device: str = "auto", options: SegmentOptions | None = None) -> Method:
    """A phase-1 checkpoint run with its teacher in the loop (learner -> teacher's mask decoder). The teacher,
    its checkpoint and sparse prompt are the run's own unless `sam_type` / `sam_checkpoint` say otherwise."""
    from samless.modeling import build_model
    from samless.training.checkpoint import checkpoint_card, load_checkpoint_info, load_model_weights
    from samless.training.sam import SAMTeacher, build_sam
    from samless.training.train import SAMGuided, run_settings

    info = load_checkpoint_info(checkpoint)
    if info.get("phase") != 1:
        raise SamlessError(f"{checkpoint} is a phase-{info.get('phase')} checkpoint; --phase1 takes phase-1 ones.")
    card = checkpoint_card(checkpoint, info)
    net = build_model(card.architecture)
    net.load_state_dict(load_model_weights(checkpoint))
    config = run_settings(info["config"])
    sam_type = sam_type or config["sam_type"]
    if sam_checkpoint is None and sam_type == config["sam_type"]:
        sam_checkpoint = config["sam_checkpoint"] or None
    teacher = SAMTeacher(build_sam(sam_type, sam_checkpoint), len(card.inputs.modalities),
                         sparse_prompt=config["sparse_prompt"])
    guided = SAMGuided(net.learner, teacher, card.inputs.context_slices)
    return segmenter_method(f"{card.name} phase 1 (with teacher {sam_type})",
                            Segmenter(card, ModuleBackend(guided, device)), options)


def case_group(case: Case) -> str:
    """The acquisition protocol of a phantom case (from its phantom.json), else 'all'."""
    meta = case.images[0].parent / "phantom.json"
    return json.loads(meta.read_text(encoding="utf-8")).get("protocol", "all") if meta.exists() else "all"


def evaluate(methods: list[Method], cases: list[Case], out: Path, overwrite: bool = False,
             progress=None) -> dict[str, Any]:
    """Segment every case with every method; write cases.csv, summary.json and summary.md into `out`."""
    targets = [out / n for n in ("cases.csv", "summary.json", "summary.md")]
    refuse_existing(targets, overwrite, "choose another --out")
    check_cases(cases, require_lesions=False)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    groups = {case.id: case_group(case) for case in cases}
    for method in methods:
        for case in cases:
            tick = time.perf_counter()
            label = method.segment(case)  # reading the inputs is part of the time per volume
            seconds = time.perf_counter() - tick
            rows.append({"method": method.name, "case": case.id, "group": groups[case.id],
                         **case_metrics(label, case.mask), "seconds": round(seconds, 3)})
            if progress:
                progress(method.name, case.id, rows[-1])
    summary = {m.name: summarize([r for r in rows if r["method"] == m.name]) for m in methods}
    by_group = {m.name: {g: summarize([r for r in rows if r["method"] == m.name and r["group"] == g])
                         for g in sorted(set(groups.values()))} for m in methods}
    write_text(csv_text(rows), out / "cases.csv")
    write_text(json.dumps({"cases": len(cases), "methods": summary, "by_group": by_group}, indent=2) + "\n",
               out / "summary.json")
    write_text(markdown(summary, len(cases), by_group), out / "summary.md")
    return summary


def _fmt(stat: dict[str, float]) -> str:
    if stat["n"] == 0 or not math.isfinite(stat["mean"]):
        return "n/a"
    return f"{stat['mean']:.3f} +/- {stat['std']:.3f}"


def markdown(summary: dict[str, dict[str, dict[str, float]]], n_cases: int,
             by_group: dict[str, dict[str, dict[str, dict[str, float]]]] | None = None) -> str:
    """Mean +/- std per method, per group (protocol) if there are several, then by lesion size."""
    lines = [f"# Evaluation on {n_cases} cases", "", "| metric | " + " | ".join(summary) + " |",
             "|---|" + "---|" * len(summary)]
    for key in HEADLINE:
        lines.append(f"| {key} | " + " | ".join(_fmt(s[key]) for s in summary.values() if key in s) + " |")
    groups = sorted({g for per_method in (by_group or {}).values() for g in per_method})
    if len(groups) > 1:
        lines += ["", "## By protocol", "", "| protocol | " + " | ".join(f"{m}: dice / lesion F1" for m in summary)
                  + " |", "|---|" + "---|" * len(summary)]
        for group in groups:
            cells = [f"{_fmt(by_group[m][group]['dice'])} / {_fmt(by_group[m][group]['lesion_f1'])}" for m in summary]
            lines.append(f"| {group} (n={by_group[next(iter(summary))][group]['dice']['n']}) | "
                         + " | ".join(cells) + " |")
    lines += ["", "## By lesion size (true lesion volume)", "",
              "| size | " + " | ".join(f"{m}: dice / sens. / detected" for m in summary) + " |",
              "|---|" + "---|" * len(summary)]
    for lo, hi in SIZE_BINS_MM3:
        name = bin_name(lo, hi)
        cells = []
        for s in summary.values():
            cells.append(" / ".join(_fmt(s[f"{k}_{name}"]).split(" +/-")[0]
                                    for k in ("dice", "sensitivity", "lesion_tpr")))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
