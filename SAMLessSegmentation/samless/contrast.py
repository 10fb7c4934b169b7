"""Does a volume look like a FLAIR? A T1- or T2-weighted image given by mistake would yield confident
"lesions", so the command line checks the contrast before segmenting.

The check reads the deep brain only: voxels at least 30 mm inside the head (or the brain, when it is
skull-stripped), which hold white matter (the most common intensity there), the ventricles and deep grey
matter, and no scalp, whatever the field of view. Against white matter:

- T2-weighted: the ventricles are far brighter (CSF); few voxels are darker.
- T1-weighted: white matter is the brightest tissue; grey matter and CSF lie below it, little above.
- FLAIR: CSF is dark and grey matter (and lesions) a little brighter than white matter.

Thresholds were set on the real FLAIR, T1 and T2 scans of ../shared/data and on phantoms, with wide margins
(see Testing/core/test_bad_files.py). Intensity scale, bias field and skull-stripping do not matter; the
heavy lesion load of a FLAIR is not taken for T2 because its ventricles stay dark.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from samless.preprocess import foreground_mask

GRID_MM = 2.0
DEPTH_MM = 30.0
MIN_DEEP_VOXELS = 1000  # 8 mL at 2 mm: less than that and the check cannot tell (e.g. a tiny test volume)
# Fractions of deep-brain voxels relative to the white-matter mode m.
DARK, LOW, HIGH, BRIGHT = 0.6, 0.93, 1.07, 1.5
T2_MIN_BRIGHT = 0.07  # T2: at least this fraction above 1.5 m (CSF) ...
T2_BRIGHT_OVER_DARK = 2.0  # ... and several times more of it than below 0.6 m (FLAIR's ventricles)
T1_MAX_HIGH_OVER_LOW = 0.4  # T1: little just above m (grey matter lies below it)


@dataclass(frozen=True)
class ContrastReport:
    looks_like: str | None  # "flair", "t1", "t2", or None when the deep brain is too small to tell
    dark: float = 0.0
    low: float = 0.0
    high: float = 0.0
    bright: float = 0.0


def assess_contrast(image: sitk.Image) -> ContrastReport:
    """Which of FLAIR, T1- or T2-weighted the deep-brain intensities of `image` look like."""
    deep = _deep_brain_voxels(image)
    mode = _mode(deep) if deep.size >= MIN_DEEP_VOXELS else 0.0
    if mode <= 0:  # too little deep brain to tell, or no positive white-matter level
        return ContrastReport(None)
    rel = deep / mode
    dark, bright = float((rel < DARK).mean()), float((rel >= BRIGHT).mean())
    low = float(((rel >= DARK) & (rel < LOW)).mean())
    high = float(((rel > HIGH) & (rel < BRIGHT)).mean())
    if bright >= T2_MIN_BRIGHT and bright > T2_BRIGHT_OVER_DARK * dark:
        kind = "t2"
    elif high < T1_MAX_HIGH_OVER_LOW * low:
        kind = "t1"
    else:
        kind = "flair"
    return ContrastReport(kind, dark, low, high, bright)


def _deep_brain_voxels(image: sitk.Image) -> np.ndarray:
    """Voxels at least DEPTH_MM inside the filled head, on a GRID_MM grid."""
    size = [max(1, round(n * s / GRID_MM)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([GRID_MM] * 3)
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin(image.GetOrigin())
    coarse = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    voxels = sitk.GetArrayFromImage(coarse)
    head = sitk.GetImageFromArray(foreground_mask(voxels).astype(np.uint8))
    head.CopyInformation(coarse)
    head = sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(head, [2, 2, 2]))
    depth = sitk.SignedMaurerDistanceMap(head, insideIsPositive=True, squaredDistance=False, useImageSpacing=True)
    return voxels[sitk.GetArrayViewFromImage(depth) >= DEPTH_MM]


def _mode(values: np.ndarray) -> float:
    """The most common intensity (white matter in the deep brain), from a lightly smoothed histogram."""
    lo, hi = np.percentile(values, [0.5, 99.5])
    counts, edges = np.histogram(values, bins=128, range=(float(lo), float(max(hi, lo + 1e-6))))
    peak = int(np.convolve(counts, np.ones(5) / 5, "same").argmax())
    return float(edges[peak] + edges[peak + 1]) / 2


def contrast_problem(image: sitk.Image, name: str) -> str | None:
    """A one-line refusal when `image` looks T1- or T2-weighted rather than FLAIR, else None."""
    report = assess_contrast(image)
    if report.looks_like in (None, "flair"):
        return None
    why = ("the ventricles (CSF) are bright" if report.looks_like == "t2"
           else "white matter is brighter than grey matter")
    return (f"{name} looks {report.looks_like.upper()}-weighted, not FLAIR ({why}); give the FLAIR volume, or pass "
            "--skip-contrast-check to segment it anyway.")
