"""Follow-up evaluation on pairs with a known change (phantom pairs, or a real pair's expert mask).

A change lesion is a new or enlarging lesion of the follow-up. A true one is detected when a predicted change
lesion touches it; a predicted one with no true change lesion under it is a false positive. Counts are pooled
over the pairs for sensitivity, precision and F1 (a pair with few change lesions would swing a per-pair mean),
and also given per pair.

Beside `samless followup` (registration, both scans segmented, lesions matched and classed) runs the simple
method a user could do by hand: subtract the registered baseline's lesion mask from the follow-up's, and call
each remaining piece of at least `min_new_mm3` a change. Both use the same registration and segmentations, so
the difference between them is the change logic alone.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from samless.errors import SamlessError
from samless.followup import ENLARGING, NEW, Change, ChangeRules, change_label, classify, followup_change
from samless.imageio import atomic_folder, csv_text, read_image, refuse_existing, write_text
from samless.pipeline import Segmenter, SegmentOptions

METHODS = ("samless followup", "segmentations only", "subtraction")


def change_lesions(change: sitk.Image) -> sitk.Image:
    """The new and enlarging lesions of a change label map, as connected components."""
    return sitk.ConnectedComponent((change == NEW) | (change == ENLARGING), True)


def change_detection(truth: sitk.Image, predicted: sitk.Image) -> dict[str, int]:
    """Counts of true and predicted change lesions and which of them meet (both maps on one grid)."""
    t = sitk.GetArrayFromImage(change_lesions(truth))
    p = sitk.GetArrayFromImage(change_lesions(predicted))
    cls_t = sitk.GetArrayViewFromImage(truth)
    cls_p = sitk.GetArrayViewFromImage(predicted)
    both = (t > 0) & (p > 0)
    hit_t = np.unique(t[both])
    hit_p = np.unique(p[both])
    same_class = np.unique(t[both & (cls_t == cls_p)])
    n_true, n_pred = int(t.max()), int(p.max())
    return {"true_changes": n_true, "found_changes": n_pred, "true_detected": int(hit_t.size),
            "true_detected_same_class": int(same_class.size), "found_true": int(hit_p.size),
            "false_positives": n_pred - int(hit_p.size)}


def rates(counts: dict[str, int]) -> dict[str, float]:
    """Sensitivity, precision and F1 of change lesions from (pooled) counts; nan where undefined."""
    sens = counts["true_detected"] / counts["true_changes"] if counts["true_changes"] else math.nan
    prec = counts["found_true"] / counts["found_changes"] if counts["found_changes"] else math.nan
    if counts["true_changes"] == 0 and counts["found_changes"] == 0:
        f1 = 1.0  # nothing changed and nothing was called
    elif math.isnan(sens) or math.isnan(prec) or sens + prec == 0:
        f1 = 0.0
    else:
        f1 = 2 * sens * prec / (sens + prec)
    return {"sensitivity": sens, "precision": prec, "f1": f1}


def subtraction_change(followup_label: sitk.Image, baseline_label: sitk.Image, min_mm3: float) -> sitk.Image:
    """The by-hand method: follow-up lesion voxels that were not lesion at baseline, in pieces of at least
    `min_mm3`, labelled new (2)."""
    grown = sitk.And(followup_label > 0, sitk.Not(baseline_label > 0))
    voxel = math.prod(followup_label.GetSpacing())
    pieces = sitk.RelabelComponent(sitk.ConnectedComponent(grown, True),
                                   minimumObjectSize=int(math.ceil(min_mm3 / voxel - 1e-9)))
    return sitk.Cast(pieces > 0, sitk.sitkUInt8) * NEW


def method_labels(change: Change, rules: ChangeRules) -> dict[str, sitk.Image]:
    """Each method's change label map for one pair, all from the same registration and segmentations:
    `samless followup` itself, its classes without the difference-image check, and the by-hand subtraction."""
    unchecked = classify(change.followup.label, change.baseline_lesions, replace(rules, evidence_sd=0.0))
    by_hand = subtraction_change(change.followup.label, change.baseline_lesions, rules.min_new_mm3)
    return dict(zip(METHODS, (change.label, change_label(change.followup.label, unchecked), by_hand)))


def landmark_error_mm(found: sitk.Transform, truth: sitk.Transform, image: sitk.Image, step: int = 400) -> float:
    """Mean distance between where the two transforms send the head's voxels (every `step`-th of them)."""
    arr = sitk.GetArrayViewFromImage(image)
    head = np.argwhere(arr > np.percentile(arr, 60))[::step]
    points = [image.TransformIndexToPhysicalPoint([int(i[2]), int(i[1]), int(i[0])]) for i in head]
    return float(np.mean([np.linalg.norm(np.subtract(found.TransformPoint(q), truth.TransformPoint(q)))
                          for q in points]))


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """The pairs of a `samless phantom --pairs` list, with absolute paths, checked to exist."""
    path = Path(path)
    try:
        listing = json.loads(path.read_text(encoding="utf-8"))
        pairs = listing["pairs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SamlessError(f"cannot read the pair list {path} ({exc}); give the pairs.json that "
                           "`samless phantom --pairs` wrote.") from None
    out = []
    for pair in pairs:
        entry = {k: (path.parent / v if k in ("baseline", "followup", "change", "transform") else v)
                 for k, v in pair.items()}
        missing = [str(entry[k]) for k in ("baseline", "followup", "change") if not Path(entry[k]).exists()]
        if missing:
            raise SamlessError(f"pair {pair.get('id')}: missing {', '.join(missing)}.")
        out.append(entry)
    if not out:
        raise SamlessError(f"{path} lists no pairs.")
    return out


def evaluate_pairs(models: list[str], pairs: list[dict[str, Any]], out: Path, *, overwrite: bool = False,
                   backend: str = "auto", device: str = "auto", threads: int | None = None,
                   options: SegmentOptions | None = None, rules: ChangeRules | None = None,
                   progress=None) -> dict[str, Any]:
    """Run every model's follow-up (and the subtraction method on its segmentations) on every pair; write
    pairs.csv, summary.json and summary.md into `out` (whole, or not at all)."""
    refuse_existing([out], overwrite, "choose another --out")
    rules = rules or ChangeRules()
    rows = []
    for model in models:
        segmenter = Segmenter.from_model(model, backend=backend, device=device, threads=threads)
        for pair in pairs:
            rows += pair_rows(segmenter, pair, options, rules)
            if progress:
                for row in rows[-len(METHODS):]:
                    progress(row)
    summary = summarize_pairs(rows)
    with atomic_folder(out) as staging:
        write_text(csv_text(rows), staging / "pairs.csv")
        write_text(json.dumps({"pairs": len(pairs), "rules": rules.__dict__, "methods": summary}, indent=2) + "\n",
                   staging / "summary.json")
        write_text(pairs_markdown(summary, len(pairs)), staging / "summary.md")
    return summary


def pair_rows(segmenter: Segmenter, pair: dict[str, Any], options: SegmentOptions | None,
              rules: ChangeRules) -> list[dict[str, Any]]:
    """Every method's row for one pair."""
    baseline, followup = read_image(pair["baseline"]), read_image(pair["followup"])
    truth = read_image(pair["change"])
    tick = time.perf_counter()
    change = followup_change(segmenter, baseline, followup, options=options, rules=rules,
                             allow_poor_registration=True)
    seconds = time.perf_counter() - tick
    reg = change.registration
    error = math.nan
    if pair.get("transform") and Path(pair["transform"]).exists():
        error = landmark_error_mm(reg.transform, sitk.ReadTransform(str(pair["transform"])), followup)
    common = {"pair": pair["id"], "model": segmenter.name, "seconds": round(seconds, 2),
              "registration_correlation": round(reg.correlation, 4), "registration_error_mm": round(error, 3),
              "warnings": len(change.warnings)}
    return [{"method": name, **common, **change_detection(truth, predicted)}
            for name, predicted in method_labels(change, rules).items()]


def summarize_pairs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model and method: pooled counts and rates, false positives per pair, seconds, registration error."""
    out: dict[str, Any] = {}
    keys = ("true_changes", "found_changes", "true_detected", "true_detected_same_class", "found_true",
            "false_positives")
    for model in dict.fromkeys(r["model"] for r in rows):
        for method in METHODS:
            sel = [r for r in rows if r["model"] == model and r["method"] == method]
            if not sel:
                continue
            counts = {k: int(sum(r[k] for r in sel)) for k in keys}
            per_pair = [rates(r)["f1"] for r in sel]
            errors = [r["registration_error_mm"] for r in sel if not math.isnan(r["registration_error_mm"])]
            out[f"{model}: {method}"] = {
                **counts, **rates(counts), "pairs": len(sel), "mean_pair_f1": float(np.mean(per_pair)),
                "false_positives_per_pair": counts["false_positives"] / len(sel),
                "seconds_per_pair": float(np.mean([r["seconds"] for r in sel])),
                "registration_error_mm_mean": float(np.mean(errors)) if errors else math.nan,
                "registration_error_mm_max": float(np.max(errors)) if errors else math.nan}
    return out


def pairs_markdown(summary: dict[str, Any], n_pairs: int) -> str:
    cols = ("sensitivity", "precision", "f1", "mean_pair_f1", "false_positives_per_pair", "true_changes",
            "true_detected", "found_changes", "seconds_per_pair", "registration_error_mm_mean")
    lines = [f"# Follow-up evaluation on {n_pairs} pairs (change lesions: new or enlarging)", "",
             "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, s in summary.items():
        lines.append(f"| {name} | " + " | ".join(_cell(s[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)
