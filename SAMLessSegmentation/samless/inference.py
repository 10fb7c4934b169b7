"""Slice-wise batched inference over a prepared volume.

Slices with (almost) no head in them are skipped. Each slice is cut into input_size x input_size
windows centred on the head; a brain at 1 mm fits one window, a larger field of view is tiled with
overlap and averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

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


def predict_plane(channels: np.ndarray, foreground: np.ndarray, backend: Backend, plane: str, size: int,
                  batch_size: int = 8, tta: bool = False, progress: Progress | None = None,
                  context: int = 0) -> np.ndarray:
    """Lesion probability (z, y, x) from slices of one plane (each with `context` neighbours a side)."""
    slices = to_slices(channels, plane)  # (C, n, rows, cols)
    fg = to_slices(foreground, plane)
    n, rows, cols = fg.shape
    todo, windows = _slice_plan(fg, size)

    # Pad so every window lies inside the array; offsets map back.
    pad_r = max(0, -min(r for r, _ in windows)), max(0, max(r for r, _ in windows) + size - rows)
    pad_c = max(0, -min(c for _, c in windows)), max(0, max(c for _, c in windows) + size - cols)
    padded = np.pad(slices, ((0, 0), (0, 0), pad_r, pad_c))
    prob = np.zeros((n, rows + sum(pad_r), cols + sum(pad_c)), np.float32)
    hits = np.zeros_like(prob) if len(windows) > 1 else None

    jobs = [(k, r + pad_r[0], c + pad_c[0]) for k in todo for r, c in windows]
    flip = TTA_FLIP_AXIS.get(plane) if tta else None
    for done, batch_jobs in _batches(jobs, batch_size):
        batch = np.stack([with_context(padded[..., r:r + size, c:c + size], k, context) for k, r, c in batch_jobs])
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


def _slice_plan(fg: np.ndarray, size: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The slices holding head and the head-centred windows (row, col starts) run on each of them."""
    n, rows, cols = fg.shape
    per_slice = fg.reshape(n, -1).sum(axis=1)
    todo = np.nonzero(per_slice >= MIN_FOREGROUND_FRACTION * rows * cols)[0]
    r0, r1, c0, c1 = _bounding_box(fg.any(axis=0))
    return todo, [(r, c) for r in window_starts(r0, r1, size) for c in window_starts(c0, c1, size)]


def _batches(jobs: list, batch_size: int) -> Iterator[tuple[int, list]]:
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        yield i + len(chunk), chunk


def predict_volume(channels: np.ndarray, foreground: np.ndarray, backend: Backend, planes: list[str], size: int,
                   batch_size: int = 8, tta: bool = False, progress: Progress | None = None,
                   context: int = 0) -> np.ndarray:
    """Lesion probability (z, y, x), averaged over `planes` (three-plane fusion when several).

    Outside the head it is zero: lesions are bright, so they always lie in the head mask, and padding or
    air can never become a lesion.
    """
    # Progress counts over all planes, so a fused run reports one climb from 0 to its total.
    counts = [len(todo) * len(windows) for todo, windows in (_slice_plan(to_slices(foreground, plane), size)
                                                             for plane in planes)]
    summed, offset = None, 0
    for plane, count in zip(planes, counts):
        report = None if progress is None else (
            lambda stage, done, _, start=offset: progress(stage, start + done, sum(counts)))
        p = predict_plane(channels, foreground, backend, plane, size, batch_size, tta, report, context)
        summed = p if summed is None else summed + p
        offset += count
    summed /= len(planes)
    summed[~foreground] = 0.0
    return summed
