"""Bad files never become silent results: truncated files, NaN/Inf voxels in NIfTI, volumes too small for
a brain, T1/T2 given as FLAIR, and bad option values. Each is refused with exit code 1 (2 for options),
one line saying what was wrong and what to do, no output file, and the input untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from samless.cli import main
from samless.contrast import assess_contrast
from samless.demo import sample_folder

SAMPLE = sample_folder() / "flair.nii.gz"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "ljubljana-ms"
COLIN27 = Path("/usr/share/mricron/templates")  # Debian's mricron-data (apt-get install mricron-data)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(source: Path, tmp_path: Path, capsys, model: Path, *extra: str, code: int = 1) -> str:
    """Run `samless segment` on `source`; check it fails cleanly and return its one error line."""
    before = digest(source)
    out = tmp_path / "out"
    assert main(["segment", str(source), "-o", str(out / "x.nii.gz"), "--model", str(model),
                 "--progress", "none", *extra]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert not out.exists() or not any(out.rglob("*"))  # nothing written, not even a temporary file
    assert digest(source) == before
    return err[0]


def cut(source: Path, path: Path, fraction: float) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def sample_as(tmp_path: Path, suffix: str, compress: bool = True) -> Path:
    path = tmp_path / f"whole{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(SAMPLE)), str(path), compress)
    return path


# --- 1. truncated files -------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, compress, fraction", [
    (".nii.gz", True, 1 / 3),  # an interrupted download of the usual file
    (".nii", False, 1 / 2),
    (".nii", False, 0.999),  # a few bytes short is just as wrong
    (".nrrd", True, 1 / 2),
    (".nrrd", False, 1 / 2),
    (".mha", True, 1 / 2),
])
def test_truncated_files_are_refused(tiny_package, tmp_path, capsys, suffix, compress, fraction):
    whole = sample_as(tmp_path, suffix, compress)
    assert main(["segment", str(whole), "-o", str(tmp_path / "ok.nii.gz"), "--model", str(tiny_package),
                 "--progress", "none"]) == 0  # the whole file is fine
    capsys.readouterr()
    line = refused(cut(whole, tmp_path / f"cut{suffix}", fraction), tmp_path, capsys, tiny_package)
    assert "truncated" in line and "copy it again" in line


def test_a_cut_nifti_reads_without_error_in_simpleitk_which_is_why_we_check(tmp_path):
    """The reason for our own check: SimpleITK fills the missing voxels with zeros and says nothing."""
    part = cut(sample_as(tmp_path, ".nii.gz"), tmp_path / "cut.nii.gz", 1 / 3)
    voxels = sitk.GetArrayFromImage(sitk.ReadImage(str(part)))
    assert voxels.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE))).shape
    assert (voxels[-10:] == 0).all()


# --- 2. NaN and Inf in NIfTI (written by nibabel, which keeps them) --------------------------------

def nifti_with(tmp_path: Path, value: float, name: str, nifti2: bool = False, endian: str = "<") -> Path:
    nib = pytest.importorskip("nibabel")
    arr = np.asarray(nib.load(str(SAMPLE)).get_fdata(), dtype=endian + "f4")
    arr[90, 100, 30] = value
    arr[91, 100, 30] = value
    cls, header = (nib.Nifti2Image, nib.Nifti2Header) if nifti2 else (nib.Nifti1Image, nib.Nifti1Header)
    path = tmp_path / name
    nib.save(cls(arr, nib.load(str(SAMPLE)).affine, header(endianness=endian)), str(path))
    return path


@pytest.mark.parametrize("value, name, nifti2, endian", [
    (np.nan, "nan.nii.gz", False, "<"),
    (np.inf, "inf.nii.gz", False, "<"),
    (-np.inf, "minus_inf.nii", False, "<"),
    (np.nan, "nan_big_endian.nii", False, ">"),
])
def test_non_finite_voxels_in_nifti_are_refused(tiny_package, tmp_path, capsys, value, name, nifti2, endian):
    path = nifti_with(tmp_path, value, name, nifti2, endian)
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()  # SimpleITK hides them
    line = refused(path, tmp_path, capsys, tiny_package)
    assert "2 NaN or infinite voxels" in line


def test_finite_nifti_from_another_writer_is_segmented(tiny_package, tmp_path, capsys):
    path = nifti_with(tmp_path, 123.0, "fine.nii", endian=">")
    assert main(["segment", str(path), "-o", str(tmp_path / "x.nii.gz"), "--model", str(tiny_package),
                 "--progress", "none"]) == 0


def test_nifti2_which_simpleitk_cannot_read_is_named(tiny_package, tmp_path, capsys):
    line = refused(nifti_with(tmp_path, 1.0, "two.nii.gz", nifti2=True), tmp_path, capsys, tiny_package)
    assert "is NIfTI-2" in line and "NIfTI-1" in line


# --- 3. too small to hold a brain -------------------------------------------------------------------

@pytest.mark.parametrize("size, spacing", [((3, 3, 3), (1.0, 1.0, 1.0)), ((40, 40, 30), (1.0, 1.0, 1.0)),
                                           ((200, 200, 5), (1.0, 1.0, 14.0))])
def test_volumes_too_small_for_a_brain_are_refused(tiny_package, tmp_path, capsys, size, spacing):
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.random(tuple(reversed(size))).astype(np.float32))
    image.SetSpacing(spacing)
    path = tmp_path / "tiny.nii.gz"
    sitk.WriteImage(image, str(path))
    line = refused(path, tmp_path, capsys, tiny_package)
    assert "too small to hold a brain" in line


# --- 4. options are checked before anything is read ---------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("--threshold", "2"), ("--threshold", "0"), ("--threshold", "nan"), ("--threshold", "half"),
    ("--min-lesion-mm3", "-1"), ("--min-lesion-mm3", "inf"), ("--threads", "0"), ("--batch-size", "-3"),
    ("--batch-size", "2.5"),
])
def test_bad_option_values_are_refused_before_reading_anything(tmp_path, capsys, option, value):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:  # neither the input nor the model exists: they are never looked at
        main(["segment", str(tmp_path / "missing.nii.gz"), "-o", str(out / "x.nii.gz"), "--model",
              str(tmp_path / "no-model"), option, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option in err[0] and value in err[0] and "--help" in err[0], err
    assert not out.exists()


# --- 5. an image that is not a FLAIR ----------------------------------------------------------------

def real_images() -> dict[str, tuple[Path, str]]:
    """Real scans of known contrast found on this machine: name -> (path, contrast)."""
    found = {}
    p26 = SHARED / "cross_sectional" / "patient26"
    for m in ("flair", "t1", "t2"):
        found[f"patient26 {m}"] = (p26 / f"{m}.nii.gz", m)
    long = SHARED / "longitudinal" / "patient01"
    for s in (1, 2):
        for m, c in (("FLAIR", "flair"), ("T1W", "t1"), ("T2W", "t2")):
            found[f"longitudinal study{s} {m}"] = (long / f"study{s}_{m}.nii.gz", c)
    for path in sorted((SHARED / "clinical_flair").glob("*.nii.gz")):
        found[f"clinical {path.name}"] = (path, "flair")
    found["Colin27 T1 (with skull)"] = (COLIN27 / "ch2.nii.gz", "t1")
    found["Colin27 T1 (skull-stripped)"] = (COLIN27 / "ch2bet.nii.gz", "t1")
    found["bundled sample (phantom)"] = (SAMPLE, "flair")
    return found


@pytest.mark.parametrize("name", sorted(real_images()))
def test_real_scans_are_told_apart_by_contrast(name):
    path, contrast = real_images()[name]
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data, or Debian's mricron-data for Colin27)")
    assert assess_contrast(sitk.ReadImage(str(path))).looks_like == contrast


def test_the_contrast_verdict_ignores_scale_offset_and_skull_stripping():
    """The sample rescaled x1000, shifted, and skull-stripped with a slightly negative background stays FLAIR."""
    image = sitk.Cast(sitk.ReadImage(str(SAMPLE)), sitk.sitkFloat32)
    voxels = sitk.GetArrayFromImage(image)
    variants = {"x1000": voxels * 1000.0, "x0.01 + 5": voxels * 0.01 + 5.0}
    # A crude skull-strip: keep what lies deep inside the head, the rest a little below zero.
    head = sitk.BinaryFillhole(sitk.Cast(image > float(np.percentile(voxels, 60) * 0.3), sitk.sitkUInt8))
    inside = sitk.GetArrayFromImage(sitk.BinaryErode(head, [12, 12, 4])) > 0
    variants["stripped"] = np.where(inside, voxels, -0.02 * voxels.max())
    for name, arr in variants.items():
        variant = sitk.GetImageFromArray(arr.astype(np.float32))
        variant.CopyInformation(image)
        assert assess_contrast(variant).looks_like == "flair", name


def test_t1_or_t2_given_as_flair_is_refused_unless_told_to_go_on(tiny_package, tmp_path, capsys):
    candidates = [(p, c) for p, c in real_images().values() if c != "flair" and p.exists()]
    if not candidates:
        pytest.skip("no real T1/T2 scan here (../shared/data, Debian's mricron-data)")
    for path, contrast in candidates[:2]:
        line = refused(path, tmp_path, capsys, tiny_package)
        assert f"looks {contrast.upper()}-weighted, not FLAIR" in line and "--skip-contrast-check" in line
    path = candidates[0][0]
    out = tmp_path / "forced.nii.gz"
    assert main(["segment", str(path), "-o", str(out), "--model", str(tiny_package), "--progress", "none",
                 "--skip-contrast-check"]) == 0
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(path)).GetSize()
