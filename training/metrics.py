"""Segmentation metrics for MS lesions: voxel-wise (MONAI) and lesion-wise (connected components).

Voxel-wise: Dice, IoU, sensitivity, precision (MONAI), HD95 and ASSD in mm (MONAI, with spacing),
absolute volume difference in mL. Lesion-wise (26-connected components): `samless.metrics`, which the
light install's demo uses too.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from samless.metrics import SIZE_BINS_MM3, bin_name, lesion_metrics

__all__ = ["SIZE_BINS_MM3", "bin_name", "case_metrics", "lesion_metrics", "summarize"]


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
