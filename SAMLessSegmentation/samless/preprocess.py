"""From input volumes to the network's grid and intensities, and the slicing conventions.

Training and inference both go through this module, so both see the same pixels.

Canonical grid: the volume reoriented (axes permuted/flipped, no resampling) so its direction is
closest to LPS, i.e. numpy axes (z, y, x) run inferior->superior, anterior->posterior, right->left.
Then the in-plane axes of the model's slicing plane are resampled to the model's spacing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from samless.card import ModelCard, Normalization
from samless.errors import SamlessError

# sitk axis index (x=0, y=1, z=2) that each plane slices along.
SLICE_AXIS_SITK = {"axial": 2, "coronal": 1, "sagittal": 0}
# A slice needs this much foreground to be worth running the network on.
MIN_FOREGROUND_FRACTION = 0.005


@dataclass
class PreparedVolume:
    """Network-ready voxels on the canonical grid, and that grid's geometry."""

    channels: np.ndarray  # (C, z, y, x) float32, normalised
    foreground: np.ndarray  # (z, y, x) bool: head voxels
    grid: sitk.Image  # a scalar image with the canonical grid's geometry (its voxels are not used)


def canonical_grid(image: sitk.Image, orientation: str, spacing_mm: list[float], slicing_axis: str,
                   isotropic: bool = False) -> sitk.Image:
    """An empty image on `image`'s field of view, reoriented, with the model's in-plane spacing.

    The slicing axis keeps its own spacing (thick 2D slices stay as acquired) unless `isotropic`.
    The grid's first and last voxel corners coincide with the input's, so no tissue is cropped.
    """
    oriented = sitk.DICOMOrient(image, orientation)
    old_spacing = np.array(oriented.GetSpacing())
    new_spacing = old_spacing.copy()
    in_plane = [a for a in range(3) if a != SLICE_AXIS_SITK[slicing_axis]]
    new_spacing[in_plane] = spacing_mm
    if isotropic:
        new_spacing[:] = spacing_mm[0]
    old_size = np.array(oriented.GetSize())
    new_size = np.maximum(1, np.round(old_size * old_spacing / new_spacing)).astype(int)
    direction = np.array(oriented.GetDirection()).reshape(3, 3)
    # Shift the origin (a voxel centre) so the outer voxel corners stay where they were.
    origin = np.array(oriented.GetOrigin()) + direction @ ((new_spacing - old_spacing) / 2)
    grid = sitk.Image([int(s) for s in new_size], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in new_spacing])
    grid.SetOrigin([float(o) for o in origin])
    grid.SetDirection(oriented.GetDirection())
    return grid


def resample_onto(image: sitk.Image, grid: sitk.Image, interpolator: int = sitk.sitkLinear,
                  default: float = 0.0) -> np.ndarray:
    """`image`'s voxels resampled onto `grid` in physical space, as float32 (z, y, x)."""
    if _downsamples(image, grid):
        # Blur a little before downsampling so thin structures are averaged, not aliased.
        sigma = [max(0.0, (g - s) / 2) for s, g in zip(image.GetSpacing(), _spacing_along(image, grid))]
        image = sitk.DiscreteGaussian(sitk.Cast(image, sitk.sitkFloat32), [v * v for v in sigma], 32, 0.01, True)
    out = sitk.Resample(image, grid, sitk.Transform(), interpolator, default, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _spacing_along(image: sitk.Image, grid: sitk.Image) -> list[float]:
    """The grid's spacing expressed along each axis of `image` (they may be permuted)."""
    d_img = np.array(image.GetDirection()).reshape(3, 3)
    d_grid = np.array(grid.GetDirection()).reshape(3, 3)
    match = np.abs(d_img.T @ d_grid).argmax(axis=1)  # grid axis closest to each image axis
    return [grid.GetSpacing()[int(j)] for j in match]


def _downsamples(image: sitk.Image, grid: sitk.Image) -> bool:
    return any(g > 1.5 * s for s, g in zip(image.GetSpacing(), _spacing_along(image, grid)))


def foreground_mask(voxels: np.ndarray) -> np.ndarray:
    """Head voxels: above 10% of the robust (2nd-98th percentile) intensity range, as FSL's BET does.

    Unlike Otsu this does not depend on how much air the field of view holds.
    """
    lo, hi = np.percentile(voxels[::3, ::3, ::3], [2, 98])
    return voxels > lo + 0.1 * (hi - lo)


def normalize(voxels: np.ndarray, foreground: np.ndarray, config: Normalization) -> np.ndarray:
    """Robust intensity scaling: map head percentiles (lower, upper) to (0, 1), then clip.

    The default upper anchor is the head's median: unlike a high percentile it does not move with the
    lesion load (heavy loads fill a few percent of the head and would drag a 99th percentile).
    """
    if config.method != "foreground_percentile":
        raise SamlessError(f"unknown normalisation method {config.method!r} in the model card.")
    values = voxels[foreground] if foreground.any() else voxels.ravel()
    lo, hi = np.percentile(values, [config.lower_percentile, config.upper_percentile])
    if hi <= lo:
        raise SamlessError("the image has almost no intensity contrast inside the head; check the input volume.")
    out = (voxels - lo) / (hi - lo)
    return np.clip(out, *config.clip, out=out).astype(np.float32, copy=False)


def prepare(images: list[sitk.Image], card: ModelCard, *, isotropic: bool = False) -> PreparedVolume:
    """Reorient, resample and normalise the input modalities (first = reference, e.g. FLAIR)."""
    inputs = card.inputs
    grid = canonical_grid(images[0], inputs.orientation, list(inputs.spacing_mm), inputs.slicing_axis, isotropic)
    resampled = [resample_onto(img, grid) for img in images]
    foreground = foreground_mask(resampled[0])
    channels = np.stack([normalize(v, foreground, card.normalization) for v in resampled])
    return PreparedVolume(channels=channels, foreground=foreground, grid=grid)


# --- slicing conventions (shared with training) ------------------------------------------------

def to_slices(volume: np.ndarray, plane: str) -> np.ndarray:
    """View a (..., z, y, x) volume as (..., n_slices, rows, cols) slices of `plane`.

    Axial slices are (y, x): anterior up, patient's left on the right (radiological view).
    Coronal (z, x) and sagittal (z, y) slices put superior up.
    """
    if plane == "axial":
        return volume
    if plane == "coronal":
        return np.flip(np.moveaxis(volume, -2, -3), axis=-2)
    if plane == "sagittal":
        return np.flip(np.moveaxis(volume, -1, -3), axis=-2)
    raise SamlessError(f"unknown plane {plane!r}; use one of {tuple(SLICE_AXIS_SITK)}.")


def with_context(slices: np.ndarray, index: int, context: int) -> np.ndarray:
    """Slice `index` of (C, n, rows, cols) slices with its `context` neighbours on each side, as
    (C * (2 * context + 1), rows, cols) channels, modality-major (2.5D input; ends repeat the edge slice)."""
    n = slices.shape[1]
    if context == 0:
        return slices[:, index]
    neighbours = np.clip(np.arange(index - context, index + context + 1), 0, n - 1)
    stack = slices[:, neighbours]
    return stack.reshape(-1, *stack.shape[2:])


def centre_slice(channels, context: int):
    """The centre slice's channels of a `with_context` stack (..., C * (2 * context + 1), rows, cols):
    numpy arrays and torch tensors alike (what SAM sees in phase 1)."""
    shape = tuple(channels.shape)
    return channels.reshape(*shape[:-3], -1, 2 * context + 1, *shape[-2:])[..., context, :, :]


def from_slices(slices: np.ndarray, plane: str) -> np.ndarray:
    """The inverse of `to_slices`."""
    if plane == "axial":
        return slices
    if plane == "coronal":
        return np.moveaxis(np.flip(slices, axis=-2), -3, -2)
    if plane == "sagittal":
        return np.moveaxis(np.flip(slices, axis=-2), -3, -1)
    raise SamlessError(f"unknown plane {plane!r}; use one of {tuple(SLICE_AXIS_SITK)}.")
