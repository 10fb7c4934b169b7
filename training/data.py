"""Training data: volumes prepared exactly as at inference, slices sampled and augmented.

Every volume goes through `samless.preprocess.prepare` (the inference code path) and is cached as
.npy files, memory-mapped afterwards, so epochs after the first read no NIfTI at all.

A sample is fully determined by (case, slice, seed): augmentation draws from its own seeded RNG, so
runs are repeatable with any number of workers or ranks, and resume continues exactly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from samless.card import ModelCard
from samless.errors import SamlessError
from samless.imageio import check_volume, read_image
from samless.inference import SlicePlan
from samless.preprocess import (
    centre_slice,
    prepare,
    resample_onto,
    to_slices,
    with_context,
)
from samless.training.config import SAMPLING, AugmentConfig
from samless.training.split import Case

PREPARED_VERSION = 2  # bump when preparation changes, so caches rebuild (2: volumes, not one plane's slices)


@dataclass
class PreparedCase:
    id: str
    channels: np.ndarray  # (C, n, rows, cols) slices of the training plane, float32 (a memory-mapped view)
    mask: np.ndarray  # (n, rows, cols) uint8
    positive: np.ndarray  # slice indices with lesion
    negative: np.ndarray  # slice indices with head but no lesion
    window: tuple[int, int]  # (row, col) start of the head-centred input window
    soft: np.ndarray | None = None  # (n, rows, cols) uint8 lesion fraction x 255, where the case has a soft mask


def prepare_case(case: Case, card: ModelCard, cache_dir: Path | None, plane: str | None = None,
                 soft: bool = False) -> PreparedCase:
    """Load (or build and cache) one case on the model's grid, as slices of `plane`; with `soft`, its soft
    mask too (`check_soft_masks` has checked it). The cache holds the volume once, whatever the plane: each
    plane of a three-plane model is a view of it."""
    plane = plane or card.inputs.slicing_axis
    folder = cache_dir / _cache_key(case, card, soft) if cache_dir else None
    if folder is None:
        arrays = _build(case, card, soft)
    else:
        if not (folder / "done").exists():
            _store(folder, _build(case, card, soft))
        arrays = {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in ("channels", "mask", "fg", "soft")
                  if (folder / f"{n}.npy").exists()}
    return _finish(_sample_id(case, card, plane), card, **{k: to_slices(v, plane) for k, v in arrays.items()})


def _sample_id(case: Case, card: ModelCard, plane: str) -> str:
    """The case's id, with the plane where the model has several (each plane's slices are a case of their own)."""
    return f"{case.id}:{plane}" if card.inputs.three_plane else case.id


def _build(case: Case, card: ModelCard, soft: bool) -> dict[str, np.ndarray]:
    """The case on the model's grid as (z, y, x) volumes (channels first): image, lesion mask, head."""
    images = [read_image(p) for p in case.images]
    for path, image in zip(case.images, images):
        check_volume(image, f"case {case.id}: {path.name}")
    # A model of several planes sees isotropic volumes, as `samless segment` gives it for fusion.
    prepared = prepare(images, card, isotropic=card.inputs.three_plane)
    # The mask follows the same resampling, as a soft fraction thresholded at one half.
    mask = resample_onto(sitk.Cast(read_image(case.mask) > 0, sitk.sitkFloat32), prepared.grid) >= 0.5
    arrays = {"channels": prepared.channels, "mask": mask.astype(np.uint8),
              "fg": prepared.foreground.astype(np.uint8)}
    if soft:
        fraction = resample_onto(sitk.Cast(read_image(case.soft_mask), sitk.sitkFloat32), prepared.grid)
        arrays["soft"] = np.round(np.clip(fraction, 0.0, 1.0) * 255).astype(np.uint8)
    return arrays


def _store(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        tmp = folder / f".{name}.tmp.npy"
        np.save(tmp, array)
        tmp.replace(folder / f"{name}.npy")
    (folder / "done").touch()


def _cache_key(case: Case, card: ModelCard, soft: bool) -> str:
    files = [*case.images, case.mask, *([case.soft_mask] if soft else [])]
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    plain = card.to_json()
    inputs = {k: v for k, v in plain["inputs"].items() if k != "context_slices"}  # sampling, not preparation
    what = [PREPARED_VERSION, stats, inputs, plain["normalization"]]
    return f"{case.id}-{hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]}"


def _finish(case_id: str, card: ModelCard, channels, mask, fg, soft=None) -> PreparedCase:
    lesion = np.nonzero(mask.reshape(mask.shape[0], -1).any(axis=1))[0]
    plan = SlicePlan.of(fg, card.architecture.input_size)  # the slices and window inference would use
    return PreparedCase(case_id, channels, mask, lesion, np.setdiff1d(plan.slices, lesion), plan.windows[0], soft)


# --- sampling --------------------------------------------------------------------------------------



def epoch_plan(cases: list[PreparedCase], n_samples: int, pos_fraction: float, seed: int, epoch: int,
               sampling: str = "case") -> np.ndarray:
    """(case, slice, sample seed) rows for one epoch: lesion slices with probability `pos_fraction`.

    `sampling="case"` draws a case first (each equally often), then one of its slices, so a 40-slice
    thick-slice scan weighs as much as a 180-slice isotropic one, as in the per-case metrics;
    `"slice"` draws from all slices of all cases alike.
    """
    if sampling not in SAMPLING:
        raise SamlessError(f"sampling must be one of {', '.join(SAMPLING)}, not {sampling!r}.")
    rng = np.random.default_rng([seed, epoch])
    pos = _pool(cases, "positive", sampling)
    neg = _pool(cases, "negative", sampling)
    if not pos:
        pos_fraction = 0.0
    if not neg:
        pos_fraction = 1.0
    take_pos = rng.random(n_samples) < pos_fraction
    rows = []
    for is_pos in take_pos:
        pool = pos if is_pos else neg
        case, slices = pool[rng.integers(len(pool))]
        rows.append((case, slices[rng.integers(len(slices))]))
    seeds = rng.integers(0, 2**31 - 1, n_samples)
    return np.array([(c, s, z) for (c, s), z in zip(rows, seeds)], dtype=np.int64).reshape(-1, 3)


def _pool(cases: list[PreparedCase], kind: str, sampling: str) -> list[tuple[int, np.ndarray]]:
    """What one draw picks from: (case, its `kind` slices) per case, or one entry per slice."""
    if sampling == "case":
        return [(i, getattr(c, kind)) for i, c in enumerate(cases) if len(getattr(c, kind))]
    return [(i, np.array([s])) for i, c in enumerate(cases) for s in getattr(c, kind)]


# --- augmentation ----------------------------------------------------------------------------------

def geometric_variant(rng: np.random.Generator, aug: AugmentConfig | None) -> int:
    """Variant id = flip + 2 * quarter turns."""
    if aug is None:
        return 0
    flip = int(rng.random() < aug.flip)
    turns = int(rng.integers(1, 4)) if rng.random() < aug.rot90 else 0
    return flip + 2 * turns


def apply_variant(x: np.ndarray, variant: int) -> np.ndarray:
    """Flip (left-right) and turn the last two axes of `x` as `variant` says."""
    if variant % 2:
        x = np.flip(x, axis=-1)
    return np.ascontiguousarray(np.rot90(x, variant // 2, axes=(-2, -1)))


def _seeded(transforms: list, seed: int):
    from monai.transforms import Compose

    chain = Compose(transforms)
    chain.set_random_state(seed=int(seed) % (2**32))
    return chain


def random_affine(image: np.ndarray, mask: np.ndarray, aug: AugmentConfig, seed: int, soft: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A small random rotation/scale of image and mask (MONAI), seeded per sample; a soft mask is
    interpolated like the image, a hard one by nearest neighbour."""
    from monai.transforms import RandAffined

    mask_mode = "bilinear" if soft else "nearest"
    chain = _seeded([RandAffined(keys=("image", "mask"), prob=aug.affine, mode=("bilinear", mask_mode),
                                 rotate_range=np.deg2rad(aug.rotate_deg), scale_range=aug.scale,
                                 padding_mode="zeros")], seed)
    out = chain({"image": image, "mask": mask[None]})
    return np.asarray(out["image"], np.float32), np.asarray(out["mask"], np.float32)[0]


def random_intensity(image: np.ndarray, aug: AugmentConfig, seed: int) -> np.ndarray:
    """Contrast (gamma), bias field, intensity scale and noise (MONAI), seeded per sample."""
    from monai.transforms import RandAdjustContrast, RandBiasField, RandGaussianNoise, RandScaleIntensity

    p = aug.intensity
    chain = _seeded([RandAdjustContrast(prob=p, gamma=(0.7, 1.5)),
                     RandBiasField(prob=p * 0.5, coeff_range=(0.0, 0.2)),
                     RandScaleIntensity(prob=p, factors=0.1),
                     RandGaussianNoise(prob=p * 0.5, std=0.03)], seed + 1)
    return np.asarray(chain(image), np.float32)


def crop(x: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """The size x size window at (top, left) of the last two axes, zero-padded where it leaves `x`."""
    rows, cols = x.shape[-2:]
    out = np.zeros((*x.shape[:-2], size, size), dtype=np.float32)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + size, rows), min(left + size, cols)
    if r1 > r0 and c1 > c0:
        out[..., r0 - top:r1 - top, c0 - left:c1 - left] = x[..., r0:r1, c0:c1]
    return out


def patch_origin(mask: np.ndarray, top: int, left: int, size: int, patch: int, rng: np.random.Generator
                 ) -> tuple[int, int]:
    """(top, left) of a patch x patch part of the size x size window at (top, left): around a random lesion
    pixel of the window when it has one, anywhere in it otherwise."""
    window = crop(mask, top, left, size)
    rows, cols = np.nonzero(window)
    if rows.size:
        k = rng.integers(rows.size)
        r = rows[k] - patch // 2 + rng.integers(-patch // 4, patch // 4 + 1)
        c = cols[k] - patch // 2 + rng.integers(-patch // 4, patch // 4 + 1)
    else:
        r, c = rng.integers(0, size - patch + 1, 2)
    return top + int(np.clip(r, 0, size - patch)), left + int(np.clip(c, 0, size - patch))


class SliceDataset(torch.utils.data.Dataset):
    """Items of an epoch plan -> dict(image (C*(2K+1),S,S), mask (1,S,S), sam_image (C,S,S), variant, case,
    slice), K = `context` neighbouring slices a side (2.5D input, as `samless.inference` builds it).

    `sam_image` is the slice as SAM sees it in phase 1: the centre slice, the geometric variant only, never
    the intensity changes or the continuous affine, so its encoder embedding can be cached per (case,
    slice, variant).

    `patch` < `size` trains on patch x patch parts of the window (phase 2: the network is convolutional,
    and a 128 px patch costs a fifth of a 256 px window); a lesion slice's patch holds one of its lesion
    pixels, picked at random, so positives stay positive.

    `soft_labels` makes `mask` the lesion's partial-volume fraction (0..1, every case needs a soft mask)
    instead of 0/1: a border voxel then asks for its share of lesion, not for a hard side.
    """

    def __init__(self, cases: list[PreparedCase], plan: np.ndarray, size: int, aug: AugmentConfig | None,
                 jitter: int = 16, cache_friendly: bool = False, context: int = 0, patch: int = 0,
                 soft_labels: bool = False):
        self.cases, self.plan, self.size, self.aug, self.context = cases, plan, size, aug, context
        self.soft_labels = soft_labels
        self.jitter = 0 if cache_friendly or aug is None else jitter
        self.allow_affine = not cache_friendly
        self.patch = patch if 0 < patch < size else 0

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case_index, slice_index, seed = (int(v) for v in self.plan[index])
        case = self.cases[case_index]
        rng = np.random.default_rng(seed)
        dr, dc = rng.integers(-self.jitter, self.jitter + 1, 2) if self.jitter else (0, 0)
        top, left = case.window[0] + int(dr), case.window[1] + int(dc)
        size = self.size
        if self.patch:
            top, left = patch_origin(np.asarray(case.mask[slice_index]), top, left, size, self.patch, rng)
            size = self.patch
        image = crop(np.asarray(with_context(case.channels, slice_index, self.context)), top, left, size)
        if self.soft_labels:
            mask = crop(np.asarray(case.soft[slice_index], np.float32) / 255.0, top, left, size)
        else:
            mask = crop(np.asarray(case.mask[slice_index], np.float32), top, left, size)
        variant = geometric_variant(rng, self.aug)
        image, mask = apply_variant(image, variant), apply_variant(mask, variant)
        if self.aug is not None and self.allow_affine and self.aug.affine > 0:
            image, mask = random_affine(image, mask, self.aug, seed, soft=self.soft_labels)
        sam_image = centre_slice(image, self.context)
        if self.aug is not None:
            image = random_intensity(image, self.aug, seed)
        mask = np.clip(mask, 0.0, 1.0, dtype=np.float32) if self.soft_labels else (mask > 0.5).astype(np.float32)
        return {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask[None].copy()),
                "sam_image": torch.from_numpy(sam_image), "variant": variant, "case": case_index,
                "slice": slice_index}
