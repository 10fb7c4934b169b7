"""Real MS scans: how models do on the real cases of ../shared/data/ljubljana-ms (evaluation only).

- ``cross_sectional/<patient>``: Dice, lesion F1, lesion TPR, false positives, lesion count and volume and
  the volume error, against the consensus mask of three raters (1 mm, skull-stripped, MNI);
- ``longitudinal/<patient>``: the segmentation of the follow-up FLAIR (``study2``, clinical 2D, skull on)
  against the expert's new and enlarging lesions (``gt.nii.gz``, moved onto that FLAIR with the inverse of
  ``study2_FLAIR_to_common_space.txt``): the fraction of those lesions it touches and of their voxels it covers;
- ``clinical_flair/*``: lesion count and volume, no truth: look at the overlays.

Every case goes through `samless segment`'s own path (reading checks, the FLAIR contrast check, the
pipeline). Writes OUT/real_scans.md, OUT/real_scans.json and one overlay PNG per case and model (truth
green, model red). These cases are for evaluation only: never tune a setting on what this prints.

    .venv/bin/python Testing/benchmarks/real_scans.py [--model samless-demo ...] [--data DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from samless.demo import overlay_png
from samless.package import resolve_model
from samless.pipeline import Segmentation, Segmenter, load_inputs
from samless.training.metrics import case_metrics

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "ljubljana-ms"


def segment(segmenter: Segmenter, path: Path) -> tuple[sitk.Image, Segmentation, float]:
    tick = time.perf_counter()
    image = load_inputs([path], segmenter.modalities, check_contrast=True)[0]
    result = segmenter.segment([image])
    return image, result, time.perf_counter() - tick


def found(result: Segmentation) -> dict[str, Any]:
    return {"found_lesions": result.statistics["lesion_count"], "found_volume_ml": result.statistics["total_volume_ml"]}


def cross_sectional(segmenter: Segmenter, data: Path, out: Path) -> list[dict[str, Any]]:
    rows = []
    for case in sorted(p for p in (data / "cross_sectional").glob("*") if (p / "mask.nii.gz").is_file()):
        image, result, seconds = segment(segmenter, case / "flair.nii.gz")
        label = result.label
        truth = sitk.ReadImage(str(case / "mask.nii.gz"))
        m = case_metrics(label, truth, surface=False)
        overlay_png(image, truth, label, out / f"{segmenter.name}_{case.name}.png")
        rows.append({"case": case.name, "dice": m["dice"], "lesion_f1": m["lesion_f1"], "lesion_tpr": m["lesion_tpr"],
                     "false_positives": m["false_positives"], "true_lesions": m["true_lesions"],
                     "found_lesions": m["pred_lesions"], "true_volume_ml": m["true_volume_ml"],
                     "found_volume_ml": m["pred_volume_ml"],
                     "volume_error_pct": 100.0 * (m["pred_volume_ml"] - m["true_volume_ml"]) / m["true_volume_ml"],
                     "seconds": seconds})
    return rows


def expert_change_mask(patient: Path, flair: sitk.Image) -> sitk.Image:
    """The expert's new/enlarging lesions (common space) on the follow-up FLAIR's grid."""
    to_flair = sitk.ReadTransform(str(patient / "study2_FLAIR_to_common_space.txt"))  # common -> FLAIR points
    return sitk.Resample(sitk.ReadImage(str(patient / "gt.nii.gz")), flair, to_flair.GetInverse(),
                         sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def longitudinal(segmenter: Segmenter, data: Path, out: Path) -> list[dict[str, Any]]:
    rows = []
    for patient in sorted(p for p in (data / "longitudinal").glob("*") if (p / "gt.nii.gz").is_file()):
        image, result, seconds = segment(segmenter, patient / "study2_FLAIR.nii.gz")
        change = expert_change_mask(patient, image)
        lesions = sitk.GetArrayFromImage(sitk.ConnectedComponent(change, True))
        mask = sitk.GetArrayFromImage(result.label) > 0
        n = int(lesions.max())
        touched = len(np.unique(lesions[mask & (lesions > 0)]))
        overlay_png(image, change, result.label, out / f"{segmenter.name}_{patient.name}_study2.png")
        rows.append({"case": f"{patient.name} study2", "new_or_enlarging_lesions": n,
                     "lesions_touched_fraction": touched / n if n else float("nan"),
                     "voxels_covered_fraction": float(mask[lesions > 0].mean()) if n else float("nan"),
                     **found(result), "seconds": seconds})
    return rows


def clinical(segmenter: Segmenter, data: Path, out: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted((data / "clinical_flair").glob("*.nii.gz")):
        image, result, seconds = segment(segmenter, path)
        name = path.name.removesuffix(".nii.gz")
        overlay_png(image, None, result.label, out / f"{segmenter.name}_{name}.png")
        rows.append({"case": name, "grid": "x".join(map(str, image.GetSize())),
                     "spacing_mm": "x".join(f"{s:.2f}" for s in image.GetSpacing()), **found(result),
                     "seconds": seconds})
    return rows


def markdown(title: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return f"### {title}\n\n(no cases found)\n"
    keys = list(rows[0])
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="model package or bundled name (repeatable; samless-demo)")
    parser.add_argument("--data", type=Path, default=DATA, help=f"the real data folder (default {DATA})")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmark_results" / "real_scans")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"))
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"no real data at {args.data}: nothing to measure (it lives beside the checkout, in ../shared).")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "data": str(args.data),
                              "models": {}}
    text = ["# Real MS scans (evaluation only)", ""]
    for model in args.model or ["samless-demo"]:
        segmenter = Segmenter.from_model(model, backend=args.backend, threads=2)
        name = segmenter.name
        sections = {"cross-sectional (consensus masks)": cross_sectional(segmenter, args.data, args.out),
                    "longitudinal: expert's new and enlarging lesions on the follow-up": longitudinal(
                        segmenter, args.data, args.out),
                    "clinical FLAIR, no truth": clinical(segmenter, args.data, args.out)}
        report["models"][name] = {"package": str(resolve_model(model)), "sections": sections}
        text += [f"## {name}", ""] + [markdown(title, rows) for title, rows in sections.items()]
    (args.out / "real_scans.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "real_scans.md").write_text("\n".join(text))
    print("\n".join(text))
    print(f"wrote {args.out / 'real_scans.md'}, {args.out / 'real_scans.json'} and the overlays", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
