"""Lesion-wise metrics (connected components) and Dice, with numpy and SimpleITK only.

The demo scores itself with these in the light install; `samless.training.metrics` adds the voxel-wise
and surface metrics (MONAI) on top. Lesion-wise is hand-written: MONAI has no lesion detection metric.
A true lesion is detected when any predicted voxel touches it; a predicted lesion is a false positive
when it touches no true lesion. Size strata group true lesions (and false-positive predictions) by volume.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import SimpleITK as sitk

SIZE_BINS_MM3 = ((0.0, 10.0), (10.0, 100.0), (100.0, 1000.0), (1000.0, math.inf))


def bin_name(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}mm3" if math.isfinite(hi) else f">={lo:g}mm3"


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice of two masks; 1 when both are empty (a lesion-free scan left empty is right)."""
    pred, true = pred.astype(bool), true.astype(bool)
    total = int(pred.sum()) + int(true.sum())
    return 2.0 * int((pred & true).sum()) / total if total else 1.0


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))
    return labels, int(labels.max())


def lesion_metrics(pred: np.ndarray, true: np.ndarray, voxel_mm3: float) -> dict[str, Any]:
    """Lesion detection (TPR, precision, F1, false positives) and size-stratified Dice/sensitivity."""
    true_labels, n_true = _components(true)
    pred_labels, n_pred = _components(pred)
    true_sizes = np.bincount(true_labels.ravel(), minlength=n_true + 1)[1:] * voxel_mm3
    pred_sizes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)[1:] * voxel_mm3
    hit_true = np.unique(true_labels[pred & (true_labels > 0)])  # true lesions touched by the prediction
    hit_pred = np.unique(pred_labels[true & (pred_labels > 0)])  # predicted lesions touching the truth
    tpr = len(hit_true) / n_true if n_true else math.nan
    precision = len(hit_pred) / n_pred if n_pred else math.nan
    if n_true == 0 and n_pred == 0:
        f1 = 1.0
    elif not n_true or not n_pred:
        f1 = 0.0
    else:
        f1 = 0.0 if tpr + precision == 0 else 2 * tpr * precision / (tpr + precision)
    out: dict[str, Any] = {"true_lesions": n_true, "pred_lesions": n_pred, "lesion_tpr": tpr,
                           "lesion_precision": precision, "lesion_f1": f1, "false_positives": n_pred - len(hit_pred)}
    out.update(_size_strata(pred, true, true_labels, pred_labels, true_sizes, pred_sizes, hit_pred, voxel_mm3))
    return out


def _size_strata(pred, true, true_labels, pred_labels, true_sizes, pred_sizes, hit_pred, voxel_mm3):
    """Per size bin: true lesions of that size and the predictions touching them (+ false positives
    of that size): Dice, voxel sensitivity, lesion detection rate and count."""
    out: dict[str, Any] = {}
    hit = np.zeros(len(pred_sizes) + 1, bool)
    hit[hit_pred] = True
    for lo, hi in SIZE_BINS_MM3:
        name = bin_name(lo, hi)
        in_bin = np.nonzero((true_sizes >= lo) & (true_sizes < hi))[0] + 1
        t = np.isin(true_labels, in_bin)
        touching = np.unique(pred_labels[t & (pred_labels > 0)])
        fp_here = np.nonzero(~hit[1:] & (pred_sizes >= lo) & (pred_sizes < hi))[0] + 1
        p = np.isin(pred_labels, np.concatenate([touching, fp_here]))
        denominator = t.sum() + p.sum()
        out[f"dice_{name}"] = 2.0 * (t & p).sum() / denominator if denominator else math.nan
        out[f"sensitivity_{name}"] = (t & pred).sum() / t.sum() if t.any() else math.nan
        detected = np.unique(true_labels[t & pred])
        out[f"lesion_tpr_{name}"] = len(detected) / len(in_bin) if len(in_bin) else math.nan
        out[f"count_{name}"] = int(len(in_bin))
    return out
