"""Segmentation metrics for MS lesions: voxel-wise (MONAI) and lesion-wise (connected components).

Voxel-wise: Dice, IoU, sensitivity, precision (MONAI), HD95 and ASSD in mm (MONAI, with spacing),
absolute volume difference in mL. Lesion-wise (26-connected components, hand-written: MONAI has no
lesion detection metric): a true lesion is detected when any predicted voxel touches it; a predicted
lesion is a false positive when it touches no true lesion. Size strata group true lesions (and
false-positive predictions) by volume.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

SIZE_BINS_MM3 = ((0.0, 10.0), (10.0, 100.0), (100.0, 1000.0), (1000.0, math.inf))


def bin_name(lo: float, hi: float) -> str:
    return f"{lo:g}-{hi:g}mm3" if math.isfinite(hi) else f">={lo:g}mm3"


def _as_image(image: sitk.Image | str | os.PathLike) -> sitk.Image:
    return image if isinstance(image, sitk.Image) else sitk.ReadImage(str(image))


def case_metrics(prediction: sitk.Image | str | os.PathLike, truth: sitk.Image | str | os.PathLike,
                 surface: bool = True) -> dict[str, Any]:
    """All metrics of one case (`surface=False`: without the slow HD95/ASSD). Both images on one grid;
    any non-zero voxel is lesion."""
    from monai.metrics import (
        compute_average_surface_distance,
        compute_confusion_matrix_metric,
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
        get_confusion_matrix,
    )

    pred_img, truth_img = _as_image(prediction), _as_image(truth)
    pred = sitk.GetArrayFromImage(pred_img) > 0
    true = sitk.GetArrayFromImage(truth_img) > 0
    if pred.shape != true.shape:
        raise ValueError(f"prediction {pred.shape} and truth {true.shape} are not on one grid")
    spacing = tuple(reversed(truth_img.GetSpacing()))  # numpy (z, y, x) order
    voxel_ml = math.prod(spacing) / 1000.0
    p = torch.from_numpy(pred[None, None].astype(np.float32))
    t = torch.from_numpy(true[None, None].astype(np.float32))
    # A lesion-free scan scores 1 if left empty and 0 with any false positive (MONAI's default, NaN, would
    # drop the false positive from the mean and flatter the model).
    out: dict[str, Any] = {
        "dice": float(compute_dice(p, t, include_background=True, ignore_empty=False)[0, 0]),
        "iou": float(compute_iou(p, t, include_background=True, ignore_empty=False)[0, 0]),
        "true_volume_ml": float(true.sum() * voxel_ml),
        "pred_volume_ml": float(pred.sum() * voxel_ml),
    }
    out["abs_volume_diff_ml"] = abs(out["pred_volume_ml"] - out["true_volume_ml"])
    confusion = get_confusion_matrix(p, t, include_background=True)
    out["sensitivity"] = _finite(compute_confusion_matrix_metric("sensitivity", confusion))
    out["precision"] = _finite(compute_confusion_matrix_metric("precision", confusion))
    if surface and pred.any() and true.any():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")  # MONAI's own internal call
        out["hd95_mm"] = float(compute_hausdorff_distance(p, t, include_background=True, percentile=95,
                                                          spacing=spacing)[0, 0])
        out["assd_mm"] = float(compute_average_surface_distance(p, t, include_background=True, symmetric=True,
                                                                spacing=spacing)[0, 0])
    else:
        out["hd95_mm"] = out["assd_mm"] = math.nan
    out.update(lesion_metrics(pred, true, voxel_ml * 1000.0))
    return out


def _finite(value: torch.Tensor) -> float:
    v = float(value.reshape(-1)[0])
    return v if math.isfinite(v) else math.nan


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


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, std and median over cases of every numeric metric (NaNs ignored)."""
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and not isinstance(rows[0][k], bool)]
    summary = {}
    for key in keys:
        values = np.array([r[key] for r in rows], dtype=float)
        values = values[np.isfinite(values)]
        summary[key] = ({"mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values)),
                         "n": int(values.size)} if values.size else {"mean": math.nan, "std": math.nan,
                                                                      "median": math.nan, "n": 0})
    return summary
