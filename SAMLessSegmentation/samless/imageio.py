"""Reading, checking and atomically writing images with SimpleITK."""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samless.errors import SamlessError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Voxel sizes outside this range (mm) are not brain MRI: most likely a header error.
SPACING_RANGE_MM = (0.05, 15.0)
# An adult brain spans about 140 x 170 x 120 mm; a field of view under this on any axis cannot hold one
# (nor even most of one), and a volume with fewer voxels than this along an axis is no brain scan.
MIN_FIELD_OF_VIEW_MM = 60.0
MIN_VOXELS_PER_AXIS = 8


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
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise SamlessError(_read_failure(path)) from None
    if image_suffix(path) in (".nii", ".nii.gz"):
        _check_nifti_voxels(path)
    return image


def _read_failure(path: Path) -> str:
    """Why SimpleITK could not read `path`: a readable header over unreadable voxels is a cut-off file."""
    nifti = _nifti_header_size(_head(path)) if image_suffix(path) in (".nii", ".nii.gz") else None
    if nifti and nifti[1] == 540:
        return f"{path} is NIfTI-2, which SimpleITK cannot read; save it as NIfTI-1 (or NRRD) and try again."
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return f"{path} is not an image SimpleITK can read; give a NIfTI, NRRD or MHA file or a DICOM folder."
    return (f"{path} has a valid header but its voxels cannot be read: the file is truncated or corrupted "
            "(an interrupted copy or download?); copy it again from the source.")


def _open_bytes(path: Path):
    """`path` opened for reading bytes, through gzip for a .gz file."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _head(path: Path, n: int = 540) -> bytes:
    """The first `n` bytes of a file, decompressed if it is gzip ('' when unreadable)."""
    try:
        with _open_bytes(path) as f:
            return f.read(n)
    except (OSError, EOFError, zlib.error):
        return b""


def non_finite_message(name: str, count: int) -> str:
    return f"{name} has {count} NaN or infinite voxels; fix or replace them (e.g. with 0) first."


# NIfTI datatype code -> numpy kind of the floating-point types whose voxels can be NaN or infinite.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _check_nifti_voxels(path: Path) -> None:
    """Refuse a NIfTI file whose voxel data stops short of what its header promises, or holds NaN/Inf.

    SimpleITK's NIfTI reader says neither: it fills a cut-off file with zeros and turns NaN and Inf into
    0, so a third of a brain or a broken computation would be segmented as if whole.
    """
    try:
        with _open_bytes(path) as f:
            header = f.read(540)
            layout = _nifti_layout(header)
            if layout is None:  # not NIfTI-1 (SimpleITK read it some other way): nothing to check here
                return
            endian, code, n_bytes, offset = layout
            f.seek(offset)
            got, bad = _scan_voxels(f, n_bytes, _NIFTI_FLOATS.get(code), endian)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError):
        got, bad = -1, 0
    if got < n_bytes:
        raise SamlessError(
            f"{path} is truncated: its voxel data ends before the {n_bytes / 1e6:.1f} MB its header declares "
            "(an interrupted copy or download?); copy it again from the source."
        )
    if bad:
        raise SamlessError(non_finite_message(str(path), bad))


def _nifti_header_size(header: bytes) -> tuple[str, int] | None:
    """(byte order, 348 for NIfTI-1 or 540 for NIfTI-2) of a NIfTI header, or None if it is not one."""
    for endian in "<>":
        size = struct.unpack(endian + "i", header[:4])[0] if len(header) >= 4 else 0
        if size in (348, 540):
            return endian, size
    return None


def _nifti_layout(header: bytes) -> tuple[str, int, int, int] | None:
    """(byte order, datatype code, voxel bytes, voxel offset) of a NIfTI-1 header (the NIfTI SimpleITK reads)."""
    kind = _nifti_header_size(header)
    if kind is None or kind[1] != 348 or len(header) < 348:
        return None
    endian = kind[0]
    dims = struct.unpack(endian + "8h", header[40:56])
    code, bitpix = struct.unpack(endian + "2h", header[70:74])
    offset = int(struct.unpack(endian + "f", header[108:112])[0])
    n_dims = max(0, min(int(dims[0]), 7))
    n_voxels = math.prod(max(1, int(d)) for d in dims[1:n_dims + 1])
    return endian, int(code), n_voxels * max(1, int(bitpix)) // 8, max(offset, 348)


def _scan_voxels(f, n_bytes: int, float_kind: str | None, endian: str, chunk: int = 1 << 24) -> tuple[int, int]:
    """Read up to `n_bytes` of voxel data: how many bytes there were, and how many non-finite floats."""
    got = bad = 0
    itemsize = int(float_kind[1]) if float_kind else 1
    while got < n_bytes:
        block = f.read(min(chunk, n_bytes - got))
        if not block:
            break
        if float_kind:
            usable = len(block) - len(block) % itemsize
            bad += int((~np.isfinite(np.frombuffer(block[:usable], endian + float_kind))).sum())
        got += len(block)
    return got, bad


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


def check_volume(image: sitk.Image, name: str) -> None:
    """Check that `image` is a usable 3D scalar MR volume; `name` says which input it is, for the message."""
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
        raise SamlessError(non_finite_message(name, int((~np.isfinite(voxels)).sum())))
    if voxels.max() == voxels.min():
        raise SamlessError(
            f"{name} is constant (every voxel is {voxels.flat[0]}); it holds no image: check the file."
        )
    size = image.GetSize()
    extent = [n * s for n, s in zip(size, spacing)]
    if min(extent) < MIN_FIELD_OF_VIEW_MM or min(size) < MIN_VOXELS_PER_AXIS:
        raise SamlessError(
            f"{name} covers only {' x '.join(f'{e:.0f}' for e in extent)} mm ({'x'.join(map(str, size))} voxels): "
            f"too small to hold a brain (about 140 x 170 x 120 mm; at least {MIN_FIELD_OF_VIEW_MM:.0f} mm and "
            f"{MIN_VOXELS_PER_AXIS} voxels on every axis); give the whole head or brain, not a crop or thumbnail."
        )


def refuse_existing(paths: Sequence[str | os.PathLike], overwrite: bool,
                    instead: str = "choose another output") -> None:
    """Refuse, before any work, to replace outputs that exist, unless `overwrite` (--overwrite) says so."""
    existing = [Path(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise SamlessError(f"output {existing[0]}{more} exists; pass --overwrite to replace it, or {instead}.")


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
        _plain_permissions(tmp_path, 0o666)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; on success it takes `path`'s place, on failure it is removed.

    An older folder at `path` is moved aside before and removed after the swap, so a crash at any moment
    leaves the old folder or the new one whole, never a mix (model packages, training checkpoints).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        _plain_permissions(staging, 0o777)
        for entry in staging.rglob("*"):  # some writers (safetensors) make owner-only files too
            _plain_permissions(entry, 0o777 if entry.is_dir() else 0o666)
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)  # left by a crash between the two renames below
        if path.exists():
            os.replace(path, old)
        os.replace(staging, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _plain_permissions(path: Path, mode: int) -> None:
    """mkstemp and mkdtemp make owner-only entries; give the output what a plain open() or mkdir() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


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
