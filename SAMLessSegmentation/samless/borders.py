"""Lesion borders from the image: each lesion the network finds grows into the fainter rim around it.

The network marks a lesion's bright core well and its rim poorly, yet raters (and the partial-volume
rule our phantom masks follow) count the rim, whose contrast fades towards the surrounding tissue. So a
voxel near a found lesion gets a probability from its own contrast, on the normalised FLAIR:

    contrast = (I - background) / (core - background), clipped to [0, 1]

`core` is the median of the lesion's voxels, `background` the median of a shell of tissue around it (so
each lesion is judged against its own neighbourhood, whatever the scan's scale or skull). A rim voxel at
`rim_fraction` of the core's contrast reaches the card's threshold; lowering the threshold grows the
borders further, raising it shrinks them, with no new network run. The map only ever rises: growth
cannot remove what the network found, and it never makes a lesion where the network found none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from samless.card import Postprocessing
from samless.errors import SamlessError

# Voxels fainter than this share of the core's contrast never join, whatever the threshold: they are tissue.
CONTRAST_FLOOR = 0.2


@dataclass(frozen=True)
class BorderGrowth:
    """How far and how faint a lesion's rim may be (the model card's `postprocessing.borders`)."""

    rim_fraction: float = 0.5  # share of the core's contrast that counts as lesion at the card's threshold
    reach_mm: float = 2.0  # how far beyond the network's lesion the rim may reach
    shell_mm: tuple[float, float] = (2.0, 4.0)  # the background shell: this far from the lesion
    min_contrast: float = 0.1  # core minus background (normalised units) below which a lesion does not grow
    smooth_mm: float = 0.0  # Gaussian sigma on the FLAIR first, so noise alone does not join a lesion

    def __post_init__(self) -> None:
        inner, outer = self.shell_mm
        if not (0.0 < self.rim_fraction <= 1.0 and self.reach_mm >= 0 and 0 <= inner < outer
                and self.min_contrast > 0 and self.smooth_mm >= 0):
            raise SamlessError(f"invalid lesion border settings {self}: rim_fraction in (0, 1], reach_mm >= 0, "
                               "0 <= shell inner < outer, min_contrast > 0, smooth_mm >= 0.")

    @classmethod
    def from_card(cls, post: Postprocessing) -> BorderGrowth | None:
        """The card's settings, or None where the card has none (older packages). Whether they are used when
        a run does not say is the card's `borders_by_default`."""
        settings = dict(post.borders or {})
        if not settings:
            return None
        try:
            return cls(**{**settings, "shell_mm": tuple(settings.get("shell_mm", cls.shell_mm))})
        except TypeError as exc:
            raise SamlessError(f"the model card's postprocessing.borders is not understood: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "shell_mm": list(self.shell_mm)}


    def __call__(self, probability: np.ndarray, flair: np.ndarray, foreground: np.ndarray,
                 spacing_zyx: Sequence[float], threshold: float, min_lesion_mm3: float = 0.0) -> np.ndarray:
        """`probability` (z, y, x) with each lesion's rim raised; `flair` normalised on the same grid.

        Lesions under `min_lesion_mm3` at `threshold` do not grow: a speck that the minimum size would drop
        must not become a lesion through its rim."""
        lesions = sitk.ConnectedComponent(_image(probability >= threshold, spacing_zyx), True)
        shape = sitk.LabelShapeStatisticsImageFilter()
        shape.Execute(lesions)
        labels = sitk.GetArrayViewFromImage(lesions)
        out = probability.copy()
        if self.smooth_mm > 0 and shape.GetNumberOfLabels():
            flair = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(_image(flair, spacing_zyx, np.float32),
                                                                          self.smooth_mm))
        margin = np.ceil(max(self.shell_mm[1], self.reach_mm) / np.asarray(spacing_zyx)).astype(int) + 1
        for label in shape.GetLabels():
            if shape.GetPhysicalSize(label) < min_lesion_mm3:
                continue
            box = _box(shape.GetBoundingBox(label), margin, labels.shape)
            rim = self._rim(labels[box] == label, labels[box] > 0, flair[box], foreground[box], spacing_zyx)
            if rim is not None:
                np.maximum(out[box], np.clip(rim * (threshold / self.rim_fraction), 0.0, 1.0), out=out[box])
        return out

    def _rim(self, lesion: np.ndarray, any_lesion: np.ndarray, flair: np.ndarray, foreground: np.ndarray,
             spacing_zyx: Sequence[float]) -> np.ndarray | None:
        """The contrast fraction of the voxels around one lesion that connect to it (0 elsewhere)."""
        distance = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
            _image(lesion, spacing_zyx), insideIsPositive=False, squaredDistance=False, useImageSpacing=True))
        shell = (distance > self.shell_mm[0]) & (distance <= self.shell_mm[1]) & foreground & ~any_lesion
        if shell.sum() < 10:
            return None
        background = float(np.median(flair[shell]))
        span = float(np.median(flair[lesion])) - background
        if span < self.min_contrast:
            return None
        contrast = np.clip((flair - background) / span, 0.0, 1.0)
        zone = (distance > 0) & (distance <= self.reach_mm) & foreground & (contrast >= CONTRAST_FLOOR)
        # the lesion is one component, so the part of the zone joined to it shares its label
        joined = sitk.GetArrayFromImage(sitk.ConnectedComponent(_image(zone | lesion, spacing_zyx), True))
        keep = (joined == joined[lesion][0]) & zone
        return np.where(keep, contrast, 0.0)


def _image(voxels: np.ndarray, spacing_zyx: Sequence[float], dtype: type = np.uint8) -> sitk.Image:
    image = sitk.GetImageFromArray(voxels.astype(dtype, copy=False))
    image.SetSpacing([float(s) for s in reversed(spacing_zyx)])
    return image


def _box(bbox: Sequence[int], margin: np.ndarray, shape: Sequence[int]) -> tuple[slice, ...]:
    """numpy slices (z, y, x) of a SimpleITK bounding box (x, y, z starts, then sizes) grown by `margin`."""
    start, size = np.asarray(bbox[:3][::-1]), np.asarray(bbox[3:][::-1])
    lo = np.maximum(start - margin, 0)
    hi = np.minimum(start + size + margin, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
