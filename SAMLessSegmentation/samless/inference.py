"""Slice-wise batched inference over a prepared volume.

Slices with (almost) no head in them are skipped. Each slice is cut into input_size x input_size
windows centred on the head; a brain at 1 mm fits one window, a larger field of view is tiled with
overlap and averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from samless.backends import Backend
from samless.preprocess import MIN_FOREGROUND_FRACTION, from_slices, to_slices, with_context

Progress = Callable[[str, int, int], None]
# Flip test-time augmentation mirrors left-right only: the one anatomically plausible flip.
TTA_FLIP_AXIS = {"axial": -1, "coronal": -1}


def window_starts(lo: int, hi: int, size: int) -> list[int]:
    """Starts of windows of `size` covering [lo, hi); the first may start below 0 (padding)."""
    extent = hi - lo
    if extent <= size:
        return [(lo + hi) // 2 - size // 2]
    count = math.ceil((extent - size) / (size * 0.75)) + 1  # at least a quarter of overlap
    return [int(round(s)) for s in np.linspace(lo, hi - size, count)]


def _bounding_box(mask2d: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask2d.any(axis=1)), np.nonzero(mask2d.any(axis=0))
    if rows[0].size == 0:
        return 0, mask2d.shape[0], 0, mask2d.shape[1]
    return rows[0][0], rows[0][-1] + 1, cols[0][0], cols[0][-1] + 1


@dataclass(frozen=True)
class SlicePlan:
    """What inference runs on one plane: the slices holding head, and the head-centred windows (row, col
    starts; some may start below 0 or end past the slice, which padding covers) run on each of them.
    Training samples the same slices and crops at the first window, so it sees what inference will."""

    shape: tuple[int, int, int]  # (slices, rows, cols)
    slices: np.ndarray
    windows: list[tuple[int, int]]
    size: int

    @classmethod
    def of(cls, foreground: np.ndarray, size: int) -> SlicePlan:
        """The plan for a head mask already cut into slices of one plane: (n, rows, cols)."""
        n, rows, cols = foreground.shape
        per_slice = foreground.reshape(n, -1).sum(axis=1)
        slices = np.nonzero(per_slice >= MIN_FOREGROUND_FRACTION * rows * cols)[0]
        r0, r1, c0, c1 = _bounding_box(foreground.any(axis=0))
        windows = [(r, c) for r in window_starts(r0, r1, size) for c in window_starts(c0, c1, size)]
        return cls((n, rows, cols), slices, windows, size)

    @property
    def jobs(self) -> int:
        return len(self.slices) * len(self.windows)

    def padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Rows and columns to pad (before, after) so that every window lies inside the slices."""
        _, rows, cols = self.shape
        starts_r, starts_c = [r for r, _ in self.windows], [c for _, c in self.windows]
        return ((max(0, -min(starts_r)), max(0, max(starts_r) + self.size - rows)),
                (max(0, -min(starts_c)), max(0, max(starts_c) + self.size - cols)))


class SliceInferer:
    """Lesion probability of a prepared volume, slice by slice in batches, averaged over planes (three-plane
    fusion when several). Settings in the constructor, data in the call (as MONAI's inferers)."""

    def __init__(self, size: int, batch_size: int = 8, tta: bool = False, context: int = 0):
        self.size, self.batch_size, self.tta, self.context = size, batch_size, tta, context

    def __call__(self, channels: np.ndarray, foreground: np.ndarray, backend: Backend, planes: list[str],
                 progress: Progress | None = None) -> np.ndarray:
        """(z, y, x) probability; zero outside the head: lesions are bright, so they always lie in the head
        mask, and padding or air can never become a lesion."""
        plans = {plane: SlicePlan.of(to_slices(foreground, plane), self.size) for plane in planes}
        total = sum(plan.jobs for plan in plans.values())  # progress climbs once over all planes
        summed, offset = None, 0
        for plane, plan in plans.items():
            report = None if progress is None else (
                lambda stage, done, _, start=offset: progress(stage, start + done, total))
            p = self.plane(channels, plane, plan, backend, report)
            summed = p if summed is None else summed + p
            offset += plan.jobs
        summed /= len(planes)
        summed[~foreground] = 0.0
        return summed

    def plane(self, channels: np.ndarray, plane: str, plan: SlicePlan, backend: Backend,
              progress: Progress | None = None) -> np.ndarray:
        """(z, y, x) probability from the slices of one plane (each with `context` neighbours a side)."""
        size = self.size
        n, rows, cols = plan.shape
        pad_r, pad_c = plan.padding()
        padded = np.pad(to_slices(channels, plane), ((0, 0), (0, 0), pad_r, pad_c))  # offsets map back
        prob = np.zeros((n, rows + sum(pad_r), cols + sum(pad_c)), np.float32)
        hits = np.zeros_like(prob) if len(plan.windows) > 1 else None
        jobs = [(k, r + pad_r[0], c + pad_c[0]) for k in plan.slices for r, c in plan.windows]
        flip = TTA_FLIP_AXIS.get(plane) if self.tta else None
        for done, batch_jobs in _batches(jobs, self.batch_size):
            batch = np.stack([with_context(padded[..., r:r + size, c:c + size], k, self.context)
                              for k, r, c in batch_jobs])
            out = backend.predict(batch)
            if flip is not None:
                out = (out + np.flip(backend.predict(np.flip(batch, axis=flip).copy()), axis=flip)) / 2
            for (k, r, c), p in zip(batch_jobs, out):
                prob[k, r:r + size, c:c + size] += p
                if hits is not None:
                    hits[k, r:r + size, c:c + size] += 1
            if progress:
                progress(f"inference ({plane})", done, len(jobs))
        if hits is not None:
            np.divide(prob, hits, out=prob, where=hits > 0)
        prob = prob[:, pad_r[0]:pad_r[0] + rows, pad_c[0]:pad_c[0] + cols]
        return np.ascontiguousarray(from_slices(prob, plane))


def _batches(jobs: list, batch_size: int) -> Iterator[tuple[int, list]]:
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        yield i + len(chunk), chunk
