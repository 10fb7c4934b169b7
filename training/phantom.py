"""Synthetic MS phantoms: brain FLAIR (optionally T1, T2) with exact lesion masks, built on real anatomy.

`samless phantom OUTDIR --n N --seed S ...` writes OUTDIR/<case>/flair.nii.gz + mask.nii.gz (+ t1, t2),
OUTDIR/split.json (MS-SAMLess folds + test) and OUTDIR/cases.csv. Each case is built in MNI space on the
ICBM152 2009 template shipped with nilearn (tissue maps -> FLAIR/T1/T2 contrast with partial volume and
texture; a synthetic skull, scalp and face around the skull-stripped template), with MS lesions drawn where
MS lesions are (periventricular Dawson's fingers, deep and juxtacortical white matter, infratentorial,
confluent clusters), then "acquired": subject shape and atrophy, head motion, an oblique 3D (1 mm) or 2D
(thick axial slices) grid, bias field, Rician noise and int16 scanner scaling. The mask is the lesion
probability resampled through the same transform and thresholded at 0.5, so it lies on the image grid.

Everything is deterministic per seed: case i of `--seed S` uses the seed in cases.csv, and
`generate_case(that_seed, ...)` rebuilds it exactly.

Resources/phantom_preview.png is the preview of
`samless phantom OUT --n 2 --seed 0 --protocol 3d --lesion-load high --folds 2 --test-fraction 0 --preview PNG`.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from samless.errors import SamlessError
from samless.imageio import csv_text, write_image, write_text
from samless.training.split import assign_folds

from .phantom_anatomy import anatomy
from .phantom_lesions import LESION_LOADS, LesionField, draw_lesions, pick_load
from .phantom_mri import (
    MODALITIES,
    PROTOCOLS,
    STORAGES,
    cortical_folds,
    draw_contrast,
    layer_thickness,
    lesion_rim_profile,
    lesion_values,
    plan_acquisition,
    resample,
    scanner_effects,
    synthesize,
    tissue_weights,
)
from .phantom_real_lesions import draw_real_lesions, real_mask_paths

__all__ = ["PhantomCase", "generate_case", "generate_dataset", "register_cli", "save_preview", "case_seed",
           "template_map", "MODALITIES", "PROTOCOLS", "LESION_LOADS"]

_STREAM = {"lesions": 1, "anatomy": 2, "acquisition": 3, "contrast": 10, "scanner": 20, "lesion_contrast": 30,
           "skull": 40, "real_lesions": 50, "folds": 60, "rims": 70, "protocol": 99}
SKULL_CHOICES = ("on", "off", "mixed")


@dataclass
class PhantomCase:
    """One synthetic subject. `images` and `mask` share one grid (size, spacing, origin, direction)."""

    images: dict[str, sitk.Image]  # lower-case modality -> int16 image
    mask: sitk.Image  # uint8, 1 = lesion
    soft_mask: sitk.Image  # float32 lesion partial-volume fraction 0..1 (`mask` is where it is >= 0.5)
    lesion_count: int  # connected lesions in `mask` (26-connectivity)
    lesion_volume_ml: float
    meta: dict  # JSON-serialisable description (seed, protocol, geometry, motion, contrasts, lesions)
    transform: sitk.Transform | None = field(default=None, repr=False)  # output point -> MNI (LPS) point
    scale: int = 1
    pose: sitk.Transform | None = field(default=None, repr=False)  # the head pose part of `transform` (rigid)


def case_seed(seed: int, index: int) -> int:
    """The seed of case `index` of a dataset made with `seed`."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(stream)])


def generate_case(seed: int, protocol: str = "3d", modalities: Sequence[str] = ("flair",), randomize: bool = False,
                  lesion_load: str = "mixed", *, motion: bool = True, scale: int = 1,
                  flair_lesion_contrast: tuple[float, float] | None = None, skull: bool = True,
                  real_masks: Sequence[str] = (), real_fraction: float = 0.6, sulci: bool = False,
                  lesion_rims: bool = False, lesions: LesionField | None = None,
                  subject_seed: int | None = None, storage: str = "mixed") -> PhantomCase:
    """Build one phantom. `scale=2` builds everything at 2 mm (voxel sizes doubled): quick data for tests.

    `flair_lesion_contrast` (lo, hi): each case's FLAIR lesions are drawn at lo..hi times white matter instead
    of the realistic default (real lesions range from barely to very hyperintense). `skull=False` strips the
    skull as a preprocessing tool would: the brain only, its mask a little too tight or loose, the rest 0 or
    slightly negative (winsorised); the lesion mask keeps only what lies in the stripped brain.

    `real_masks` (MNI-space lesion mask files): a case with lesions takes one of them as its lesions with
    probability `real_fraction` (`phantom_real_lesions`), else drawn ones. `sulci=True` folds the cortex
    (`phantom_mri.cortical_folds`). `lesion_rims=True` fades each lesion's contrast from its core to a
    fainter rim that its mask still includes (`phantom_mri.lesion_rim_profile`). `storage` (3d): axial or
    sagittal slices (mixed: sagittal one time in four).

    `lesions` (a canvas lesion field) replaces the drawn lesions, and `subject_seed` makes the subject (head
    size and shape, atrophy, folds, skull) that of another seed's case: a follow-up scan of that subject
    (`phantom_pairs`). The scanner, pose and contrast still come from `seed`."""
    modalities = tuple(m.lower() for m in modalities)
    bad = [m for m in modalities if m not in MODALITIES]
    if bad or not modalities or len(set(modalities)) != len(modalities):
        raise ValueError(f"modalities must be distinct names among {', '.join(MODALITIES)}; got {','.join(modalities)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    if lesion_load not in LESION_LOADS:
        raise ValueError(f"lesion load must be one of {', '.join(LESION_LOADS)}, not {lesion_load!r}")
    if scale not in (1, 2):
        raise ValueError(f"scale must be 1 (1 mm, the real thing) or 2 (2 mm, quick small data), not {scale!r}")
    A = anatomy(int(scale))
    subject = seed if subject_seed is None else subject_seed
    source = "given"
    if lesions is None:
        lesions, source = draw_case_lesions(A, seed, lesion_load, real_masks, real_fraction)
    tissue = cortical_folds(A, _rng(subject, _STREAM["folds"])) if sulci else None
    rng_anat = _rng(subject, _STREAM["anatomy"])
    layers = layer_thickness(rng_anat)
    weights = tissue_weights(A, layers, rng_anat)
    n_lesions = len(lesions.lesions)
    lesion_idx = np.flatnonzero(lesions.prob)
    profile, rims = None, None
    if lesion_rims and lesion_idx.size:
        profile, rims = lesion_rim_profile(lesions, lesion_idx, A.spacing, _rng(seed, _STREAM["rims"]))
    canvases, contrasts = [], {}
    for m in modalities:
        rng = _rng(seed, _STREAM["contrast"] + MODALITIES.index(m))
        p = draw_contrast(m, rng, randomize)
        if flair_lesion_contrast and m == "flair" and not randomize:
            p["lesion"] = float(_rng(seed, _STREAM["lesion_contrast"]).uniform(*flair_lesion_contrast)) * p["wm"]
        values = lesion_values(m, p, n_lesions, rng)
        canvases.append(synthesize(A, p, weights, lesions, lesion_idx, values, rng, randomize, tissue, profile))
        contrasts[m] = {k: round(v, 4) for k, v in p.items()}
    del weights, tissue
    acq = plan_acquisition(A, _rng(seed, _STREAM["acquisition"]), protocol, motion, lesions.load, int(scale),
                           None if subject_seed is None else _rng(subject_seed, _STREAM["acquisition"]), storage)
    out = resample(A, canvases + [lesions.prob], acq)
    del canvases
    ref = acq.reference
    fraction = np.clip(out[-1], 0.0, 1.0).astype(np.float32)
    kept = None if skull else stripped_brain(A, acq, _rng(seed, _STREAM["skull"]))
    if kept is not None:
        fraction *= kept
    mask_arr = (fraction >= 0.5).astype(np.uint8)
    mask, soft_mask = sitk.GetImageFromArray(mask_arr), sitk.GetImageFromArray(fraction)
    mask.CopyInformation(ref)
    soft_mask.CopyInformation(ref)
    images = {}
    for m, arr in zip(modalities, out[:-1]):
        rng = _rng(seed, _STREAM["scanner"] + MODALITIES.index(m))
        voxels = scanner_effects(arr, rng, randomize, contrasts[m]["wm"])
        if kept is not None:
            voxels = np.where(kept, voxels, np.int16(skull_background(voxels, _rng(seed, _STREAM["skull"] + 1))))
        img = sitk.GetImageFromArray(voxels)
        img.CopyInformation(ref)
        images[m] = img
    voxel_ml = float(np.prod(ref.GetSpacing())) / 1000.0
    count = 0
    if mask_arr.any():
        cc = sitk.ConnectedComponent(mask, True)
        count = int(sitk.GetArrayViewFromImage(cc).max())
    volume = float(mask_arr.sum()) * voxel_ml
    meta = {"seed": int(seed), "protocol": protocol, "modalities": list(modalities), "randomize": bool(randomize),
            "skull": bool(skull), "flair_lesion_contrast": list(flair_lesion_contrast or []),
            "motion": bool(motion), "scale": int(scale), "lesion_load": lesions.load, "lesion_source": source,
            "sulci": bool(sulci), "lesion_rims": rims,
            "lesions_drawn": n_lesions, "lesion_count": count, "lesion_volume_ml": round(volume, 4),
            **acq.meta, "layers_mm": {k: round(v, 2) for k, v in layers.items()}, "contrast": contrasts,
            "lesions": lesions.lesions}
    return PhantomCase(images, mask, soft_mask, count, volume, meta, acq.transform, int(scale), acq.pose)


def draw_case_lesions(A, seed: int, lesion_load: str, real_masks: Sequence[str] = (),
                      real_fraction: float = 0.6) -> tuple[LesionField, str]:
    """The lesions of case `seed` on the canvas, and whether they are drawn or a real mask's ("real")."""
    rng_real = _rng(seed, _STREAM["real_lesions"])
    if real_masks and rng_real.random() < real_fraction:
        lesion_load = pick_load(lesion_load, rng_real)
        if lesion_load != "none":
            return draw_real_lesions(A, rng_real, real_masks)
    return draw_lesions(A, _rng(seed, _STREAM["lesions"]), lesion_load), "drawn"


def stripped_brain(A, acq, rng: np.random.Generator) -> np.ndarray:
    """What a skull-stripping tool keeps, on the output grid: the brain mask, eroded or dilated by up to 2 mm."""
    brain = sitk.Resample(A.to_image(A.brain.astype(np.float32)), acq.reference, acq.transform, sitk.sitkLinear, 0.0,
                          sitk.sitkFloat32) >= 0.5
    radius = [int(round(float(rng.uniform(0.0, 2.0)) / s)) for s in acq.reference.GetSpacing()]
    if any(radius):
        brain = (sitk.BinaryErode if rng.random() < 0.5 else sitk.BinaryDilate)(brain, radius)
    return sitk.GetArrayFromImage(brain) > 0


def skull_background(voxels: np.ndarray, rng: np.random.Generator) -> int:
    """Outside the stripped brain: 0, or (winsorised, as some pipelines leave it) slightly negative."""
    return 0 if rng.random() < 0.7 else -int(rng.uniform(0.001, 0.02) * float(voxels.max()))


def template_map(case: PhantomCase, name: str) -> sitk.Image:
    """A static anatomy map (e.g. "wm", "gm", "csf", "brain", "allowed") of the template, on the case's grid.

    This maps the case back to MNI space: a voxel of the result holds the map's value at the template point
    that the voxel shows.
    """
    A = anatomy(case.scale)
    arr = getattr(A, name).astype(np.float32)
    return sitk.Resample(A.to_image(arr), case.mask, case.transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


# --- preview ------------------------------------------------------------------------------------------

def _richest_point(mask: np.ndarray, spacing) -> tuple[int, int, int]:
    if not mask.any():
        return tuple(int(n // 2) for n in mask.shape)
    size = [max(1, int(round(15.0 / s))) for s in spacing[::-1]]
    dens = ndi.uniform_filter(mask.astype(np.float32), size=size, mode="constant")
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(dens * (mask > 0))), mask.shape))


def _crop(fg: np.ndarray, margin: int = 4) -> tuple[slice, slice]:
    if not fg.any():
        return slice(None), slice(None)
    r, c = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    return (slice(max(int(r[0]) - margin, 0), int(r[-1]) + margin + 1),
            slice(max(int(c[0]) - margin, 0), int(c[-1]) + margin + 1))


def save_preview(case: PhantomCase, path: str | Path, title: str | None = None) -> Path:
    """PNG montage: axial/coronal/sagittal through the lesion-richest point, per modality, then FLAIR with
    lesion outlines in red (radiological convention: patient's right on the left)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    imgs = {m: sitk.DICOMOrient(img, "LPS") for m, img in case.images.items()}
    mask = sitk.GetArrayFromImage(sitk.DICOMOrient(case.mask, "LPS"))
    first = next(iter(imgs))
    sx, sy, sz = imgs[first].GetSpacing()
    k, j, i = _richest_point(mask, (sx, sy, sz))
    rows = [(m, False) for m in imgs] + [("flair" if "flair" in imgs else first, True)]
    views = [("axial", lambda a: a[k], sy / sx, "upper"), ("coronal", lambda a: a[:, j, :], sz / sx, "lower"),
             ("sagittal", lambda a: a[:, :, i], sz / sy, "lower")]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9.0, 3.1 * len(rows)), facecolor="black", squeeze=False)
    for r, (m, outline) in enumerate(rows):
        arr = sitk.GetArrayFromImage(imgs[m]).astype(np.float32)
        top = float(np.percentile(arr, 99.5)) or 1.0
        vmax = 2.1 * float(np.median(arr[arr > 0.15 * top]))  # ~2x the brain: lesions bright, not clipped
        for c, (name, cut, aspect, origin) in enumerate(views):
            ax = axes[r, c]
            view, vmask = cut(arr), cut(mask)
            rows_, cols_ = _crop(ndi.binary_opening(view > 0.12 * vmax, iterations=2))
            view, vmask = view[rows_, cols_], vmask[rows_, cols_]
            ax.imshow(view, cmap="gray", vmin=0, vmax=vmax, aspect=aspect, origin=origin, interpolation="bilinear")
            if outline and vmask.any():
                ax.contour(vmask, levels=[0.5], colors="red", linewidths=0.6)
            ax.set_axis_off()
            ax.set_title(f"{m.upper()} {name}" + (" + lesion mask" if outline else ""), color="white", fontsize=8)
    meta = case.meta
    spacing = "x".join(f"{s:.2f}" for s in meta["spacing_mm"])
    text = title or (f"synthetic phantom, seed {meta['seed']}: {meta['protocol'].upper()} FLAIR, {spacing} mm, "
                     f"{case.lesion_count} lesions, {case.lesion_volume_ml:.2f} mL ({meta['lesion_load']} load)")
    fig.suptitle(text, color="white", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=72, facecolor="black", format="png")
    plt.close(fig)
    from PIL import Image  # matplotlib's own dependency

    buf.seek(0)
    grey = np.linspace(0, 255, 62).astype(int)
    palette = Image.new("P", (1, 1))
    palette.putpalette([*np.repeat(grey, 3).tolist(), 255, 0, 0, 255, 255, 255] + [0, 0, 0] * 192)
    with Image.open(buf) as im:  # a fixed 64-colour palette (greys + red): a third of the size, same look
        im.convert("RGB").quantize(palette=palette, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


# --- datasets -------------------------------------------------------------------------------------------

_OURS = re.compile(r"(case|pair)\d+$")


def _prepare_outdir(outdir: Path, overwrite: bool) -> None:
    if outdir.exists() and not outdir.is_dir():
        raise FileExistsError(f"{outdir} exists and is not a folder; choose another OUTDIR.")
    if outdir.exists() and any(outdir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{outdir} exists and is not empty; pass --overwrite to replace it, or choose "
                                  "another OUTDIR.")
        for entry in outdir.iterdir():  # only what a previous run wrote
            if entry.is_dir() and _OURS.match(entry.name):
                shutil.rmtree(entry)
            elif entry.name in ("split.json", "cases.csv", "pairs.json"):
                entry.unlink()
    outdir.mkdir(parents=True, exist_ok=True)


def generate_dataset(outdir: str | Path, n: int, seed: int = 0, protocol: str = "mixed",
                     modalities: Sequence[str] = ("flair",), randomize: bool = False, lesion_load: str = "mixed",
                     folds: int = 5, test_fraction: float = 0.2, *, overwrite: bool = False,
                     preview: str | Path | None = None, motion: bool = True, scale: int = 1,
                     progress: bool = True, soft_masks: bool = False,
                     flair_lesion_contrast: tuple[float, float] | None = None, skull: str = "on",
                     real_lesions: str | Path | None = None, real_fraction: float = 0.6,
                     sulci: bool = False, lesion_rims: bool = False, rim_fraction: float = 1.0,
                     storage: str = "mixed") -> Path:
    """Write `n` phantoms to `outdir` with split.json and cases.csv; returns the split file's path.
    `soft_masks` also writes each lesion's partial-volume fraction (soft_mask.nii.gz, float32 0..1), which
    training can take as its target (`samless train --soft-labels`). `real_lesions`: a folder of MNI-space
    lesion masks, of which each case with lesions takes one with probability `real_fraction`. With
    `lesion_rims`, each case's lesions fade to a fainter rim with probability `rim_fraction`. `storage`: the
    slice order of 3d cases (axial, sagittal, or mixed: sagittal one time in four)."""
    from tqdm import tqdm

    outdir = Path(outdir)
    modalities = tuple(m.strip().lower() for m in modalities if m.strip())
    if n < 1:
        raise ValueError("--n must be at least 1.")
    if scale not in (1, 2):
        raise ValueError("--scale must be 1 or 2.")
    if protocol not in (*PROTOCOLS, "mixed"):
        raise ValueError(f"protocol must be 3d, 2d or mixed, not {protocol!r}.")
    if folds < 2:
        raise ValueError("--folds must be at least 2.")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError("--test-fraction must be in [0, 1).")
    if n - int(round(n * test_fraction)) < folds:
        raise ValueError(f"{n} cases leave fewer than {folds} outside the test set; raise --n or lower --folds.")
    bad = [m for m in modalities if m not in MODALITIES]
    if bad or not modalities or len(set(modalities)) != len(modalities):
        raise ValueError(f"--modalities takes distinct names among {','.join(MODALITIES)}, not {','.join(modalities)}.")
    if lesion_load not in LESION_LOADS:
        raise ValueError(f"--lesion-load must be one of {', '.join(LESION_LOADS)}.")
    if skull not in SKULL_CHOICES:
        raise ValueError(f"--skull must be one of {', '.join(SKULL_CHOICES)}, not {skull!r}.")
    if flair_lesion_contrast and not 0.0 < flair_lesion_contrast[0] <= flair_lesion_contrast[1]:
        raise ValueError(f"--flair-lesion-contrast takes LO,HI with 0 < LO <= HI, not {flair_lesion_contrast}.")
    if not 0.0 <= real_fraction <= 1.0:
        raise ValueError(f"--real-lesion-fraction must be in [0, 1], not {real_fraction}.")
    if not 0.0 <= rim_fraction <= 1.0:
        raise ValueError(f"--lesion-rim-fraction must be in [0, 1], not {rim_fraction}.")
    if storage not in STORAGES or (storage == "sagittal" and protocol != "3d"):
        raise ValueError(f"--storage must be one of {', '.join(STORAGES)}; sagittal needs --protocol 3d.")
    real_masks = real_mask_paths(real_lesions) if real_lesions else ()
    _prepare_outdir(outdir, overwrite)
    width = max(3, len(str(n - 1)))
    rows, samples = [], []
    for i in tqdm(range(n), desc="phantom", unit="case", disable=not progress):
        cid = f"case{i:0{width}d}"
        s = case_seed(seed, i)
        prot = protocol if protocol != "mixed" else str(_rng(s, _STREAM["protocol"]).choice(PROTOCOLS))
        with_skull = skull == "on" or (skull == "mixed" and _rng(s, _STREAM["skull"] + 2).random() < 0.5)
        case = generate_case(s, prot, modalities, randomize, lesion_load, motion=motion, scale=scale,
                             flair_lesion_contrast=flair_lesion_contrast, skull=with_skull,
                             real_masks=real_masks, real_fraction=real_fraction, sulci=sulci,
                             lesion_rims=lesion_rims and _rng(s, _STREAM["rims"] + 1).random() < rim_fraction,
                             storage=storage)
        folder = outdir / cid
        folder.mkdir(parents=True, exist_ok=True)
        sample = {}
        for m, img in case.images.items():
            write_image(img, folder / f"{m}.nii.gz")
            sample[m] = f"{cid}/{m}.nii.gz"
        write_image(case.mask, folder / "mask.nii.gz")
        sample["mask"] = f"{cid}/mask.nii.gz"
        if soft_masks:
            write_image(case.soft_mask, folder / "soft_mask.nii.gz")
            sample["soft_mask"] = f"{cid}/soft_mask.nii.gz"
        write_text(json.dumps(case.meta, indent=1) + "\n", folder / "phantom.json")
        samples.append(sample)
        rows.append({"id": cid, "seed": s, "protocol": prot,
                     "spacing": "x".join(f"{v:.3f}" for v in case.mask.GetSpacing()),
                     "size": "x".join(str(v) for v in case.mask.GetSize()),
                     "lesion_load": case.meta["lesion_load"], "lesion_count": case.lesion_count,
                     "lesion_volume_ml": f"{case.lesion_volume_ml:.4f}", "modalities": ",".join(modalities),
                     "randomize": int(randomize), "skull": int(with_skull),
                     "lesion_source": case.meta["lesion_source"]})
        if preview is not None and i == 0:
            save_preview(case, preview)
    split = assign_folds(samples, folds, test_fraction, seed)
    split_path = outdir / "split.json"
    write_text(json.dumps(split, indent=1) + "\n", split_path)
    write_text(csv_text(rows), outdir / "cases.csv")
    return split_path


# --- command line -----------------------------------------------------------------------------------------

def register_cli(subparsers, help_text: str = "write synthetic MS lesion phantoms") -> None:
    """Add the `phantom` sub-command to an argparse sub-parsers object."""
    p = subparsers.add_parser(
        "phantom", help=help_text,
        description="Synthetic MS lesion phantoms on the MNI152 anatomy, for training and testing. Writes "
                    "OUTDIR/<case>/{flair,t1,t2,mask,soft_mask}.nii.gz, OUTDIR/split.json and OUTDIR/cases.csv.")
    p.add_argument("outdir", metavar="OUTDIR", help="output folder (must be empty unless --overwrite)")
    p.add_argument("--n", type=int, default=10, help="number of cases (default 10)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed; case i uses a seed derived from (seed, i)")
    p.add_argument("--protocol", choices=("3d", "2d", "mixed"), default="mixed",
                   help="3d: 1 mm isotropic; 2d: thick (3-5 mm) axial slices; mixed: either per case (default)")
    p.add_argument("--storage", choices=STORAGES, default="mixed",
                   help="slice order of 3d cases: axial, sagittal (as 3D FLAIR is often acquired) or mixed "
                        "(default: sagittal one time in four)")
    p.add_argument("--modalities", default="flair", help="comma-separated among flair,t1,t2 (default flair)")
    p.add_argument("--randomize", action="store_true",
                   help="domain randomisation for training: random tissue contrasts, strong bias/noise, gamma")
    p.add_argument("--lesion-load", choices=LESION_LOADS, default="mixed", help="lesion burden (default mixed)")
    p.add_argument("--skull", choices=SKULL_CHOICES, default="on",
                   help="on: whole heads (default); off: skull-stripped brains (a slightly tight or loose mask, "
                        "background 0 or slightly negative); mixed: either per case")
    p.add_argument("--flair-lesion-contrast", type=_range, metavar="LO,HI",
                   help="draw each case's FLAIR lesions at LO..HI times white matter (e.g. 1.1,2.0: barely to very "
                        "hyperintense; default 1.45..1.95)")
    p.add_argument("--real-lesions", metavar="DIR",
                   help="a folder of real lesion masks in MNI space (e.g. consensus masks on the MNI152 1 mm grid): "
                        "a case with lesions takes one of them, mirrored or not and some lesions left out")
    p.add_argument("--real-lesion-fraction", type=float, default=0.6, metavar="P",
                   help="with --real-lesions: the share of cases with lesions that take a real mask (default 0.6)")
    p.add_argument("--sulci", action="store_true",
                   help="fold the cortex: thin dark sulci between bright gyri, as in one brain (the template is "
                        "an average of 152, its cortex smooth)")
    p.add_argument("--lesion-rims", action="store_true",
                   help="fade each lesion's contrast from its core to a fainter rim that its mask still includes, "
                        "as raters draw real lesions (per case: the rim keeps 40-100%% of the core's contrast)")
    p.add_argument("--lesion-rim-fraction", type=float, default=1.0, metavar="P",
                   help="with --lesion-rims: the share of cases whose lesions have rims (default 1: all)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds in split.json (default 5)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of cases held out as test (0.2)")
    p.add_argument("--no-motion", action="store_true", help="no head motion and axis-aligned grids")
    p.add_argument("--scale", type=int, choices=(1, 2), default=1,
                   help="2: build everything at 2 mm instead of 1 mm (quick, small data for tests)")
    p.add_argument("--soft-masks", action="store_true",
                   help="also write each case's lesion partial-volume fraction (soft_mask.nii.gz, 0..1), a soft "
                        "training target for `samless train --soft-labels`")
    p.add_argument("--preview", metavar="PATH", help="write a PNG montage of the first case")
    p.add_argument("--overwrite", action="store_true", help="replace the phantoms of an existing OUTDIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--pairs", action="store_true",
                   help="write follow-up pairs instead: OUTDIR/<pair>/{baseline,followup,change}.nii.gz (the same "
                        "subject in another pose, grid and contrast, with new, enlarging, shrinking and vanished "
                        "lesions; change: 1 stable, 2 new, 3 enlarging) and OUTDIR/pairs.json for "
                        "`samless evaluate --pairs`")
    p.set_defaults(func=_run)


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers), got {text!r}") from None
    if not 0.0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 0 < LO <= HI, got {text!r}")
    return lo, hi


def _run(args: argparse.Namespace) -> int:
    if args.pairs:
        from .phantom_pairs import generate_pairs_dataset

        try:
            path = generate_pairs_dataset(args.outdir, args.n, args.seed, args.protocol, args.lesion_load,
                                          skull=args.skull, sulci=args.sulci, real_lesions=args.real_lesions,
                                          flair_lesion_contrast=args.flair_lesion_contrast, scale=args.scale,
                                          overwrite=args.overwrite, progress=not args.quiet)
        except (SamlessError, ValueError, OSError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.n} phantom pair(s) to {Path(args.outdir)}; pair list {path}")
        return 0
    try:
        path = generate_dataset(args.outdir, args.n, args.seed, args.protocol, args.modalities.split(","),
                                args.randomize, args.lesion_load, args.folds, args.test_fraction,
                                overwrite=args.overwrite, preview=args.preview, motion=not args.no_motion,
                                scale=args.scale, progress=not args.quiet, soft_masks=args.soft_masks,
                                flair_lesion_contrast=args.flair_lesion_contrast, skull=args.skull,
                                real_lesions=args.real_lesions, real_fraction=args.real_lesion_fraction,
                                sulci=args.sulci, lesion_rims=args.lesion_rims, rim_fraction=args.lesion_rim_fraction,
                                storage=args.storage)
    except (SamlessError, ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.n} phantom(s) to {Path(args.outdir)}; split file {path}")
    return 0
