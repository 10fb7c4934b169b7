"""Phantom pairs for follow-up: a baseline and a follow-up scan of one synthetic subject, with known change.

The follow-up shows the same subject (head size and shape, atrophy, folds, skull: `generate_case`'s
`subject_seed`) in another head pose, on another scanner grid and contrast, and its lesions evolved on the
canvas: most stay as they were, some enlarge (grey dilation by 1.5-3 mm: at least half as much volume
again), some shrink (erosion) or disappear, and new ones appear away from the old. The truth is a label
map on the follow-up grid (1 stable, 2 new, 3 enlarging, as `samless followup` writes) and the rigid
transform from follow-up points to baseline points.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from samless.followup import ENLARGING, NEW, STABLE
from samless.imageio import write_image, write_text

from .phantom import (
    PROTOCOLS,
    SKULL_CHOICES,
    PhantomCase,
    _prepare_outdir,
    _rng,
    case_seed,
    draw_case_lesions,
    generate_case,
)
from .phantom_anatomy import Anatomy, anatomy
from .phantom_lesions import LesionField, draw_lesions
from .phantom_real_lesions import real_mask_paths

_PAIR_STREAM = {"fate": 70, "new": 71, "followup": 72}
# what becomes of each baseline lesion
FATES = (("stable", 0.6), ("enlarging", 0.2), ("shrinking", 0.1), ("disappeared", 0.1))


@dataclass
class PhantomPair:
    baseline: PhantomCase
    followup: PhantomCase
    change: sitk.Image  # uint8 on the follow-up grid: 1 stable, 2 new, 3 enlarging
    transform: sitk.Transform  # follow-up point -> baseline point (the true registration)
    meta: dict


def _ball(radius_vox: float) -> np.ndarray:
    r = int(np.ceil(radius_vox))
    z, y, x = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return (x * x + y * y + z * z) <= radius_vox * radius_vox + 1e-6


def evolve_lesions(A: Anatomy, base: LesionField, rng: np.random.Generator,
                   new_load: str = "low") -> tuple[LesionField, np.ndarray, list[str]]:
    """The follow-up's lesions on the canvas, the class of each (int8 canvas: 1 stable, 2 new, 3 enlarging,
    where the follow-up has lesion) and each baseline lesion's fate."""
    prob = np.zeros_like(base.prob)
    kind = np.zeros(base.prob.shape, np.int8)
    ids = np.zeros(base.ids.shape, np.int16)  # each lesion keeps its own intensity: old ids, then the new ones
    names, weights = zip(*FATES)
    fates = [str(rng.choice(names, p=weights)) for _ in range(int(base.ids.max()))]
    boxes = ndi.find_objects(base.ids)
    for k, (fate, box) in enumerate(zip(fates, boxes), start=1):
        if box is None or fate == "disappeared":
            continue
        margin = int(np.ceil(3.0 / A.spacing)) + 1
        box = tuple(slice(max(b.start - margin, 0), b.stop + margin) for b in box)
        p = np.where(base.ids[box] == k, base.prob[box], 0.0).astype(np.float32)
        if fate == "enlarging":
            p = ndi.grey_dilation(p, footprint=_ball(rng.uniform(1.5, 3.0) / A.spacing)) * A.allowed[box]
        elif fate == "shrinking":
            p = ndi.grey_erosion(p, footprint=_ball(rng.uniform(0.8, 1.5) / A.spacing))
        view, kview, iview = prob[box], kind[box], ids[box]
        win = p > view
        view[win] = p[win]
        kview[win] = ENLARGING if fate == "enlarging" else STABLE
        iview[win] = k
    # new lesions, kept 3 mm clear of every old one so that they are new beyond doubt
    fresh = draw_lesions(A, rng, new_load)
    clear = ~ndi.binary_dilation(base.prob > 0.02, structure=_ball(3.0 / A.spacing))
    p_new = np.where(clear, fresh.prob, 0.0)
    win = p_new > prob
    prob[win] = p_new[win]
    kind[win] = NEW
    ids[win] = np.where(fresh.ids[win] > 0, fresh.ids[win] + len(base.lesions), 0)
    kind[prob < 0.02] = 0
    ids[prob < 0.02] = 0
    return LesionField(prob, ids, base.lesions + fresh.lesions, base.load), kind, fates


def generate_pair(seed: int, protocols: tuple[str, str] = ("3d", "3d"), lesion_load: str = "medium", *,
                  scale: int = 1, skull: tuple[bool, bool] = (True, True), sulci: bool = False,
                  real_masks: Sequence[str] = (), new_load: str = "low",
                  flair_lesion_contrast: tuple[float, float] | None = None) -> PhantomPair:
    """One pair; everything is deterministic per `seed` (the follow-up's scanner uses its own stream)."""
    A = anatomy(int(scale))
    base_lesions, _ = draw_case_lesions(A, seed, lesion_load, real_masks)
    common = {"scale": scale, "sulci": sulci, "lesion_load": base_lesions.load,
              "flair_lesion_contrast": flair_lesion_contrast}
    baseline = generate_case(seed, protocols[0], skull=skull[0], lesions=base_lesions, **common)
    follow_lesions, kind, fates = evolve_lesions(A, base_lesions, _rng(seed, _PAIR_STREAM["fate"]), new_load)
    follow_seed = int(_rng(seed, _PAIR_STREAM["followup"]).integers(2 ** 31))
    followup = generate_case(follow_seed, protocols[1], skull=skull[1], lesions=follow_lesions, subject_seed=seed,
                             **common)
    change = change_truth(A, kind, followup)
    transform = sitk.CompositeTransform([baseline.pose.GetInverse(), followup.pose])  # follow-up pose first
    counts = np.bincount(lesion_classes(change), minlength=4)
    meta = {"seed": int(seed), "followup_seed": follow_seed, "protocols": list(protocols), "skull": list(skull),
            "fates": {f: fates.count(f) for f, _ in FATES}, "new_lesions": int(counts[NEW]),
            "enlarging_lesions": int(counts[ENLARGING]), "stable_lesions": int(counts[STABLE])}
    return PhantomPair(baseline, followup, change, transform, meta)


def change_truth(A: Anatomy, kind: np.ndarray, followup: PhantomCase) -> sitk.Image:
    """The class canvas carried onto the follow-up grid, one class per follow-up lesion (its majority)."""
    img = A.to_image(kind.astype(np.uint8))
    on_grid = sitk.GetArrayFromImage(sitk.Resample(img, followup.mask, followup.transform,
                                                   sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    lesions = sitk.GetArrayFromImage(sitk.ConnectedComponent(followup.mask, True))
    out = np.zeros(lesions.shape, np.uint8)
    for k, box in enumerate(ndi.find_objects(lesions), start=1):
        if box is None:
            continue
        inside = lesions[box] == k
        votes = np.bincount(on_grid[box][inside], minlength=4)[1:]
        out[box][inside] = int(np.argmax(votes)) + 1 if votes.any() else STABLE
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(followup.mask)
    return image


def lesion_classes(change: sitk.Image) -> list[int]:
    """The class of each lesion of a change label map (its lesions are connected components of one class)."""
    lab = sitk.GetArrayFromImage(sitk.ConnectedComponent(change > 0, True))
    arr = sitk.GetArrayViewFromImage(change)
    return [int(arr[box][lab[box] == k][0]) for k, box in enumerate(ndi.find_objects(lab), start=1) if box]


def generate_pairs_dataset(outdir: str | Path, n: int, seed: int = 0, protocol: str = "mixed",
                           lesion_load: str = "medium", *, skull: str = "on", sulci: bool = False,
                           real_lesions: str | Path | None = None,
                           flair_lesion_contrast: tuple[float, float] | None = None, scale: int = 1,
                           overwrite: bool = False, progress: bool = True) -> Path:
    """Write `n` pairs and OUTDIR/pairs.json (paths relative to it); returns the list's path. `protocol`
    mixed draws each timepoint's 3D or 2D protocol apart; `skull` mixed draws per pair (both timepoints alike)."""
    from tqdm import tqdm

    if n < 1:
        raise ValueError("--n must be at least 1.")
    if protocol not in (*PROTOCOLS, "mixed"):
        raise ValueError(f"protocol must be 3d, 2d or mixed, not {protocol!r}.")
    if skull not in SKULL_CHOICES:
        raise ValueError(f"--skull must be one of {', '.join(SKULL_CHOICES)}, not {skull!r}.")
    real_masks = real_mask_paths(real_lesions) if real_lesions else ()
    outdir = Path(outdir)
    _prepare_outdir(outdir, overwrite)
    width = max(3, len(str(n - 1)))
    pairs = []
    for i in tqdm(range(n), desc="phantom pairs", unit="pair", disable=not progress):
        s = case_seed(seed, i)
        rng = _rng(s, _PAIR_STREAM["followup"] + 1)
        protocols = tuple(protocol if protocol != "mixed" else str(rng.choice(PROTOCOLS)) for _ in range(2))
        with_skull = skull == "on" or (skull == "mixed" and rng.random() < 0.5)
        pair = generate_pair(s, protocols, lesion_load, scale=scale, skull=(with_skull, with_skull), sulci=sulci,
                             real_masks=real_masks, flair_lesion_contrast=flair_lesion_contrast)
        pid = f"pair{i:0{width}d}"
        folder = outdir / pid
        folder.mkdir(parents=True, exist_ok=True)
        files = {"baseline": pair.baseline.images["flair"], "followup": pair.followup.images["flair"],
                 "change": pair.change, "baseline_mask": pair.baseline.mask, "followup_mask": pair.followup.mask}
        entry = {"id": pid}
        for name, image in files.items():
            write_image(image, folder / f"{name}.nii.gz")
            entry[name] = f"{pid}/{name}.nii.gz"
        sitk.WriteTransform(pair.transform, str(folder / "truth_transform.tfm"))
        entry["transform"] = f"{pid}/truth_transform.tfm"
        write_text(json.dumps({**pair.meta, "baseline": pair.baseline.meta, "followup": pair.followup.meta},
                              indent=1) + "\n", folder / "pair.json")
        pairs.append({**entry, **pair.meta})
    path = outdir / "pairs.json"
    write_text(json.dumps({"seed": seed, "pairs": pairs}, indent=1) + "\n", path)
    return path
