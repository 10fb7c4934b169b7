"""Reading, checking and atomically writing images with SimpleITK."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samless.errors import SamlessError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Voxel sizes outside this range (mm) are not brain MRI: most likely a header error.
SPACING_RANGE_MM = (0.05, 15.0)


def image_suffix(path: str | os.PathLike) -> str:
    """The image extension of `path` ('.nii.gz' counts as one), or '' if it has none we know."""
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def strip_suffix(path: str | os.PathLike) -> str:
    """The file name of `path` without its image extension."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else Path(name).stem


def is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a NIfTI/NRRD/MHA file or a folder holding one DICOM series."""
    path = Path(path)
    if not path.exists():
        raise SamlessError(f"{path} does not exist; check the path.")
    if path.is_dir():
        return _read_dicom_series(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        raise SamlessError(
            f"{path} is not an image SimpleITK can read; give a NIfTI, NRRD or MHA file or a DICOM folder."
        ) from None


def _read_dicom_series(folder: Path) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise SamlessError(f"{folder} is a folder with no DICOM series; give an image file or a DICOM folder.")
    if len(series) > 1:
        raise SamlessError(
            f"{folder} holds {len(series)} DICOM series ({', '.join(series)}); "
            "put the FLAIR series in a folder of its own."
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    try:
        return reader.Execute()
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1]
        raise SamlessError(f"could not read the DICOM series in {folder}: {detail}") from None


def check_volume(image: sitk.Image, name: str) -> np.ndarray:
    """Check that `image` is a usable 3D scalar MR volume; return its voxels as float32 (z, y, x).

    `name` says which input this is, for the error message.
    """
    dim = image.GetDimension()
    if dim != 3:
        size = "x".join(str(s) for s in image.GetSize())
        hint = "give one 3D volume (split the series first)" if dim > 3 else "give a 3D volume, not a single slice"
        raise SamlessError(f"{name} is {dim}D ({size}); {hint}.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SamlessError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector image); "
            "give a scalar grey-level MR volume."
        )
    if min(image.GetSize()) < 2:
        raise SamlessError(f"{name} has a single slice ({image.GetSize()}); give a 3D volume.")
    lo, hi = SPACING_RANGE_MM
    spacing = image.GetSpacing()
    if any(not (lo <= s <= hi) for s in spacing):
        raise SamlessError(
            f"{name} has voxel spacing {tuple(round(s, 4) for s in spacing)} mm, outside {lo}-{hi} mm; "
            "the header is probably wrong: fix the spacing in the file."
        )
    voxels = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(voxels).all():
        bad = int((~np.isfinite(voxels)).sum())
        raise SamlessError(f"{name} has {bad} NaN or infinite voxels; fix or replace them (e.g. with 0) first.")
    if voxels.max() == voxels.min():
        raise SamlessError(
            f"{name} is constant (every voxel is {voxels.flat[0]}); it holds no image: check the file."
        )
    return voxels.astype(np.float32)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on failure remove it.

    Readers never see a half-written file, and a failed run leaves nothing behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{image_suffix(path) or path.suffix}",
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes owner-only files; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_image(image: sitk.Image, path: str | os.PathLike) -> None:
    """Write `image` atomically, compressed."""
    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)


def csv_text(rows: list[dict], fields: Sequence[str] | None = None) -> str:
    """Rows of dicts as CSV text (columns: `fields`, or the keys of every row in first-seen order)."""
    fields = list(fields) if fields is not None else list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
