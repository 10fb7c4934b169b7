"""Split files in the MS-SAMLess format, checked case by case.

    {"fold0": {"train": [sample, ...], "val": [...]}, ..., "test": [...]}

Each sample maps lower-case modality names (as the model package records them, e.g. "flair") and
"mask" to image paths, absolute or relative to the split file. A sample may also name a "soft_mask": the
lesion's partial-volume fraction (0..1) on the mask's grid, which `--soft-labels` trains towards.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samless.errors import SamlessError
from samless.imageio import image_suffix, refuse_existing, strip_suffix, write_text

MASK_KEY = "mask"
SOFT_MASK_KEY = "soft_mask"
GEOMETRY_TOLERANCE = 1e-3  # mm (spacing, origin) and cosine units (direction)


@dataclass(frozen=True)
class Case:
    """One subject: its modality images in model order, and its lesion mask."""

    id: str
    images: tuple[Path, ...]
    mask: Path
    soft_mask: Path | None = None  # partial-volume fraction 0..1, where the split gives one


def load_split(path: str | os.PathLike) -> dict:
    """The raw split dictionary."""
    path = Path(path)
    try:
        split = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SamlessError(f"split file {path} does not exist; make one with `samless train make-split`.") from None
    except json.JSONDecodeError as exc:
        raise SamlessError(f"split file {path} is not valid JSON ({exc}).") from None
    if not isinstance(split, dict) or not any(k.startswith("fold") for k in split):
        raise SamlessError(f"split file {path} has no fold0..N entries; see the training guide for the format.")
    return split


def split_cases(path: str | os.PathLike, subset: str, modalities: list[str], fold: int = 0) -> list[Case]:
    """The cases of `subset` ('train', 'val' or 'test') of `fold`, resolved and checked."""
    path = Path(path)
    split = load_split(path)
    if subset == "test":
        samples = split.get("test", [])
    else:
        key = f"fold{fold}"
        if key not in split:
            folds = sorted(k for k in split if k.startswith("fold"))
            raise SamlessError(f"split file {path} has no {key}; it has {', '.join(folds)}.")
        samples = split[key].get(subset, [])
    if not samples:
        raise SamlessError(f"split file {path}: the {subset} list of fold{fold} is empty.")
    return [_to_case(sample, i, subset, path.parent, modalities) for i, sample in enumerate(samples)]


def _to_case(sample: dict, index: int, subset: str, root: Path, modalities: list[str]) -> Case:
    wanted = [m.lower() for m in modalities]
    keys = {k.lower(): v for k, v in sample.items()} if isinstance(sample, dict) else {}
    name = f"{subset}[{index}]"
    first = keys.get(wanted[0], "")
    case_id = strip_suffix(first) if first else name
    if first and strip_suffix(first).lower() in wanted:  # files named flair.nii.gz: use the folder name
        case_id = Path(first).parent.name or case_id
    label = f"case {case_id} ({name})"
    unknown = sorted(set(keys) - set(wanted) - {MASK_KEY, SOFT_MASK_KEY, "id"})
    if unknown:
        raise SamlessError(f"{label}: unknown modality key(s) {', '.join(unknown)}; the model takes "
                           f"{', '.join(wanted)} and 'mask' (and optionally 'soft_mask').")
    missing = [k for k in [*wanted, MASK_KEY] if k not in keys]
    if missing:
        raise SamlessError(f"{label}: lacks {', '.join(missing)}.")
    files = [*wanted, MASK_KEY] + ([SOFT_MASK_KEY] if SOFT_MASK_KEY in keys else [])
    paths = {k: (root / keys[k]) if not Path(keys[k]).is_absolute() else Path(keys[k]) for k in files}
    for key, p in paths.items():
        if key != SOFT_MASK_KEY and not p.exists():  # soft masks: checked where they are used (--soft-labels)
            raise SamlessError(f"{label}: file {p} does not exist.")
    return Case(id=str(keys.get("id", case_id)), images=tuple(paths[k] for k in wanted), mask=paths[MASK_KEY],
                soft_mask=paths.get(SOFT_MASK_KEY))


def check_cases(cases: list[Case], require_lesions: bool = True) -> None:
    """Refuse cases whose images and mask disagree in geometry, and (training) a set whose masks are all empty."""
    any_lesion = not require_lesions
    for case in cases:
        reference = _header(case.mask)
        for path in case.images:
            _check_grid(case, path.name, _header(path), reference, "resample the mask onto the image grid")
        if not any_lesion:
            mask = sitk.ReadImage(str(case.mask))  # keep the image alive while its array view is read
            any_lesion = bool(sitk.GetArrayViewFromImage(mask).any())
    if not any_lesion:
        raise SamlessError(f"all {len(cases)} masks are empty; a lesion segmentation model needs lesions to learn "
                           "(check the mask paths and label values).")


def _check_grid(case: Case, name: str, header: dict, reference: dict, advice: str) -> None:
    for what in ("size", "spacing", "origin", "direction"):
        a, b = np.asarray(header[what], float), np.asarray(reference[what], float)
        if a.shape != b.shape or not np.allclose(a, b, atol=GEOMETRY_TOLERANCE):
            raise SamlessError(f"case {case.id}: {name} and its mask differ in {what} ({header[what]} vs "
                               f"{reference[what]}); {advice}.")


def check_soft_masks(cases: list[Case], split: str | os.PathLike) -> None:
    """Refuse soft-label training unless every case names a soft mask: on its mask's grid, values 0..1."""
    lacking = [case.id for case in cases if case.soft_mask is None]
    if lacking:
        more = f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
        raise SamlessError(f"--soft-labels trains towards each case's 'soft_mask', but {len(lacking)} training case(s) "
                           f"in {split} name none ({', '.join(lacking[:5])}{more}); add them to the split "
                           "(`samless phantom --soft-masks` writes them for phantoms) or train without --soft-labels.")
    for case in cases:
        if not case.soft_mask.exists():
            raise SamlessError(f"case {case.id}: soft mask {case.soft_mask} does not exist.")
        _check_grid(case, f"soft mask {case.soft_mask.name}", _header(case.soft_mask), _header(case.mask),
                    "resample the soft mask onto the mask's grid (linear interpolation)")
        soft = sitk.ReadImage(str(case.soft_mask))  # keep the image alive while its array view is read
        values = sitk.GetArrayViewFromImage(soft)
        low, high = float(values.min()), float(values.max())
        if not (np.isfinite([low, high]).all() and low >= -1e-3 and high <= 1 + 1e-3):
            raise SamlessError(f"case {case.id}: soft mask {case.soft_mask.name} holds values {low:g}..{high:g}; a "
                               "soft mask is a lesion fraction from 0 to 1.")


def _header(path: Path) -> dict:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise SamlessError(f"{path} is not an image SimpleITK can read.") from None
    return {"size": reader.GetSize(), "spacing": reader.GetSpacing(), "origin": reader.GetOrigin(),
            "direction": reader.GetDirection()}


def _case_files(folder: Path, keys: list[str]) -> dict[str, Path] | None:
    """The files of one case folder, by key, matching `flair.nii.gz` or `P1_T1_FLAIR.nii.gz` style names;
    a `soft_mask.nii.gz` or `P1_T1_SOFT_MASK.nii.gz` beside them is found too (not required)."""
    found: dict[str, Path] = {}
    for path in folder.iterdir():
        if not image_suffix(path):
            continue
        stem = strip_suffix(path).lower().replace("-", "_")
        token = SOFT_MASK_KEY if stem == SOFT_MASK_KEY or stem.endswith(f"_{SOFT_MASK_KEY}") else stem.split("_")[-1]
        if token in (*keys, SOFT_MASK_KEY):
            if token in found:
                return None  # ambiguous: two files for one key
            found[token] = path
    return found if all(k in found for k in keys) else None


def make_split(folder: str | os.PathLike, out: str | os.PathLike, modalities: list[str], folds: int = 5,
               test_fraction: float = 0.2, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a split file for a folder of cases, found at any depth (e.g. MSLesSeg's P1/T1/).

    A case is a folder holding one image per modality and a mask, named `<modality>.nii.gz` or
    `<anything>_<MODALITY>.nii.gz` (e.g. P1_T1_FLAIR.nii.gz, P1_T1_MASK.nii.gz).
    """
    folder, out = Path(folder), Path(out)
    refuse_existing([out], overwrite, "choose another --out")
    keys = [m.lower() for m in modalities] + [MASK_KEY]
    samples = []
    for case_dir in sorted(p for p in [folder, *folder.rglob("*")] if p.is_dir()):
        files = _case_files(case_dir, keys)
        if files:
            case_id = "_".join(case_dir.relative_to(folder).parts) or case_dir.name
            samples.append({"id": case_id, **{k: os.path.relpath(files[k], out.parent)
                                              for k in [*keys, SOFT_MASK_KEY] if k in files}})
    if len(samples) < folds + 1:
        raise SamlessError(f"{folder} holds {len(samples)} complete cases (folders with "
                           f"{', '.join(keys)} images); {folds} folds need more.")
    write_text(json.dumps(assign_folds(samples, folds, test_fraction, seed), indent=2) + "\n", out)
    return out


def assign_folds(samples: list[dict], folds: int, test_fraction: float, seed: int) -> dict:
    """Shuffle samples (seeded) into a test list and `folds` train/val folds; each non-test sample
    validates in exactly one fold."""
    order = random.Random(seed).sample(range(len(samples)), len(samples))
    n_test = int(round(test_fraction * len(samples)))
    if test_fraction > 0 and n_test == 0 and len(samples) > folds:
        n_test = 1
    test = [samples[i] for i in order[:n_test]]
    rest = [samples[i] for i in order[n_test:]]
    if len(rest) < folds:
        raise SamlessError(f"{folds} folds need at least {folds} cases outside the test set, but only {len(rest)} "
                           f"of {len(samples)} remain; add cases or lower the folds or test fraction.")
    split: dict = {}
    for k in range(folds):
        val = rest[k::folds]
        split[f"fold{k}"] = {"train": [s for i, s in enumerate(rest) if i % folds != k], "val": val}
    split["test"] = test
    return split
