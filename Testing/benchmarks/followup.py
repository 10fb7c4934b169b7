"""Follow-up: `samless followup` beside subtracting two segmentations, on the real pair and on phantom pairs.

- the real pair ``../shared/data/ljubljana-ms/longitudinal/<patient>`` (evaluation only): the expert's new and
  enlarging lesions (``gt.nii.gz``, common space, moved onto the follow-up FLAIR with the inverse of
  ``study2_FLAIR_to_common_space.txt``) against the change lesions found between ``study1`` and ``study2``;
  and the registration against the database's own (``study1`` and ``study2`` to common space), in mm;
- phantom pairs (``--pairs``, a `samless phantom --pairs` list): change-lesion sensitivity, precision, F1,
  false positives per pair, registration error against the known motion;
- seconds per pair on two 1 mm volumes (a phantom pair of the 3D protocol), with the registration's share.

Prints a Markdown table and writes OUT/followup.json and OUT/followup.md. The real pair is for evaluation only:
never tune a setting on what this prints.

    .venv/bin/python Testing/benchmarks/followup.py [--model samless-demo] [--pairs PAIRS.json] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from samless.followup import ChangeRules, followup_change
from samless.pipeline import Segmenter, load_inputs
from samless.training.evaluate_pairs import (
    METHODS,
    change_detection,
    landmark_error_mm,
    method_labels,
    pair_rows,
    rates,
    read_pairs,
    summarize_pairs,
)

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "ljubljana-ms"


def real_pairs(segmenter: Segmenter, data: Path) -> list[dict[str, Any]]:
    rows = []
    for patient in sorted(p for p in (data / "longitudinal").glob("*") if (p / "gt.nii.gz").is_file()):
        modalities = segmenter.modalities
        baseline = load_inputs([patient / "study1_FLAIR.nii.gz"], modalities, check_contrast=True)[0]
        followup = load_inputs([patient / "study2_FLAIR.nii.gz"], modalities, check_contrast=True)[0]
        to_common = [sitk.ReadTransform(str(patient / f"study{k}_FLAIR_to_common_space.txt")) for k in (1, 2)]
        # expert mask (common space) onto the follow-up; 2 marks every expert lesion as a change lesion
        expert = sitk.Resample(sitk.ReadImage(str(patient / "gt.nii.gz")), followup, to_common[1].GetInverse(),
                               sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        truth = sitk.Cast(expert > 0, sitk.sitkUInt8) * 2
        tick = time.perf_counter()
        change = followup_change(segmenter, baseline, followup, allow_poor_registration=True)
        seconds = time.perf_counter() - tick
        database = sitk.CompositeTransform([to_common[0], to_common[1].GetInverse()])  # follow-up -> baseline
        error = landmark_error_mm(change.registration.transform, database, followup)
        for method, predicted in method_labels(change, ChangeRules()).items():
            counts = change_detection(truth, predicted)
            rows.append({"pair": f"{patient.name} (real)", "method": method, **counts, **rates(counts),
                         "seconds": round(seconds, 2), "registration_error_mm": round(error, 3),
                         "registration_correlation": round(change.registration.correlation, 4),
                         "summary": change.summary})
    return rows


def markdown(real: list[dict[str, Any]], phantom: dict[str, Any], model: str) -> str:
    lines = [f"# Follow-up: {model}", ""]
    if real:
        lines += ["## Real pair: the expert's new and enlarging lesions", "",
                  "| pair | method | expert lesions | found by the method | sensitivity | change lesions called "
                  "| false positives | registration vs database (mm) | seconds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in real:
            lines.append(f"| {r['pair']} | {r['method']} | {r['true_changes']} | {r['true_detected']} | "
                         f"{_f(r['sensitivity'])} | {r['found_changes']} | {r['false_positives']} | "
                         f"{r['registration_error_mm']:.2f} | {r['seconds']:.1f} |")
        lines.append("")
    if phantom:
        lines += ["## Phantom pairs: change lesions (new or enlarging)", "",
                  "| method | pairs | sensitivity | precision | F1 | false positives per pair | registration error mm "
                  "(mean / max) | seconds per pair |", "|---|---|---|---|---|---|---|---|"]
        for name, s in phantom.items():
            lines.append(f"| {name} | {s['pairs']} | {_f(s['sensitivity'])} | {_f(s['precision'])} | {_f(s['f1'])} | "
                         f"{s['false_positives_per_pair']:.2f} | {_f(s['registration_error_mm_mean'])} / "
                         f"{_f(s['registration_error_mm_max'])} | {s['seconds_per_pair']:.1f} |")
    return "\n".join(lines) + "\n"


def _f(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="samless-demo")
    ap.add_argument("--pairs", help="a `samless phantom --pairs` list (pairs.json)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmark_results" / "followup")
    args = ap.parse_args(argv)
    segmenter = Segmenter.from_model(args.model, backend="onnx", threads=args.threads)
    real = real_pairs(segmenter, args.data) if (args.data / "longitudinal").is_dir() else []
    if not real:
        print(f"no real pair under {args.data / 'longitudinal'} (skipped)", file=sys.stderr)
    rows = []
    for pair in read_pairs(args.pairs) if args.pairs else []:
        rows += pair_rows(segmenter, pair, None, ChangeRules())
        print(f"{pair['id']}: " + ", ".join(f"{r['method']} {r['true_detected']}/{r['true_changes']} "
                                             f"+{r['false_positives']}" for r in rows[-len(METHODS):]), flush=True)
    phantom = summarize_pairs(rows) if rows else {}
    text = markdown(real, phantom, segmenter.name)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "followup.md").write_text(text, encoding="utf-8")
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "model": segmenter.name,
              "threads": args.threads, "real": real, "phantom": phantom, "phantom_rows": rows}
    (args.out / "followup.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {args.out / 'followup.md'} and {args.out / 'followup.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
