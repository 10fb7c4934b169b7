"""The `samless` command line end to end, and every bad input it must refuse cleanly."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import synthetic_head
from samless.cli import build_parser, main, segment_options
from samless.errors import SamlessError
from samless.options import SegmentOptions
from samless.package import CARD_NAME, WEIGHTS_NAME


def run_cli(*args, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "samless", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def files_in(folder) -> set[str]:
    return {p.name for p in folder.rglob("*")} if folder.exists() else set()


def test_segment_end_to_end_with_json_progress(tiny_package, head, tmp_path):
    flair, image, _ = head
    out = tmp_path / "out" / "sub1_lesions.nii.gz"
    before = hashlib.sha256(flair.read_bytes()).hexdigest()
    proc = run_cli("segment", flair, "-o", out, "--model", tiny_package, "--prob", "--stats",
                   "--progress", "json", "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "model" and kinds[1] == "start" and kinds[-1] == "done"
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0
    stages = [e["stage"] for e in events if e["event"] == "progress"]  # reading and writing move the bar too
    assert stages[0] == "reading" and stages[-1] == "writing" and 0.0 < fractions[1] < fractions[-2] < 1.0
    done = events[-1]
    assert hashlib.sha256(flair.read_bytes()).hexdigest() == before  # the input is untouched

    label = sitk.ReadImage(str(out))
    assert label.GetPixelID() == sitk.sitkUInt8
    assert label.GetSize() == image.GetSize() and label.GetDirection() == pytest.approx(image.GetDirection(), abs=1e-6)
    assert set(np.unique(sitk.GetArrayFromImage(label))) <= {0, 1}
    prob = sitk.ReadImage(str(out.with_name("sub1_lesions_prob.nii.gz")))
    assert prob.GetPixelID() == sitk.sitkFloat32
    stats = json.loads(out.with_name("sub1_lesions.json").read_text())
    rows = list(csv.DictReader(out.with_name("sub1_lesions.csv").open()))
    assert stats["lesion_count"] == len(rows) == done["lesion_count"]
    voxel_mm3 = float(np.prod(image.GetSpacing()))
    assert sum(float(r["volume_mm3"]) for r in rows) == pytest.approx(
        sitk.GetArrayFromImage(label).sum() * voxel_mm3, rel=1e-3)
    assert files_in(out.parent) == {"sub1_lesions.nii.gz", "sub1_lesions_prob.nii.gz", "sub1_lesions.json",
                                    "sub1_lesions.csv"}  # no temporary files left


def test_batch_folder_writes_a_summary_and_goes_on_after_a_bad_subject(tiny_package, tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    for i in range(2):
        sitk.WriteImage(synthetic_head(seed=i)[0], str(cases / f"case{i}.nii.gz"))
    sitk.WriteImage(sitk.Image([20, 20, 20], sitk.sitkFloat32), str(cases / "blank.nrrd"))
    out = tmp_path / "results"
    proc = run_cli("segment", cases, "-o", out, "--model", tiny_package, "--progress", "none")
    assert proc.returncode == 1
    assert "blank" in proc.stderr and "constant" in proc.stderr
    rows = {r["subject"]: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["case0"]["status"] == rows["case1"]["status"] == "ok"
    assert rows["blank"]["status"] == "error" and "constant" in rows["blank"]["error"]
    assert files_in(out) == {"summary.csv", "case0_lesions.nii.gz", "case1_lesions.nii.gz"}


def test_info_prints_the_card(tiny_package):
    proc = run_cli("info", tiny_package)
    assert proc.returncode == 0 and "tiny-test" in proc.stdout and "hardnet39ds" in proc.stdout
    assert json.loads(run_cli("info", tiny_package, "--json").stdout)["name"] == "tiny-test"


# --- bad input: exit 1, one line naming the problem, nothing written -------------------------------

def write(image: sitk.Image, path) -> str:
    sitk.WriteImage(image, str(path))
    return str(path)


def image_2d(tmp_path):
    return write(sitk.Image([32, 32], sitk.sitkFloat32) + 1, tmp_path / "slice.nii.gz")


def image_4d(tmp_path):
    return write(sitk.GetImageFromArray(np.random.rand(3, 8, 16, 16).astype(np.float32), isVector=False),
                 tmp_path / "series.nii.gz")


def image_with_nan(tmp_path):
    arr = sitk.GetArrayFromImage(synthetic_head()[0])
    arr[3, 10, 10] = np.nan
    return write(sitk.GetImageFromArray(arr), tmp_path / "nan.mha")  # NIfTI writing drops NaN


def image_constant(tmp_path):
    return write(sitk.Image([30, 30, 30], sitk.sitkFloat32) + 7, tmp_path / "flat.nii.gz")


def image_absurd_spacing(tmp_path):
    image = synthetic_head()[0]
    image.SetSpacing((1.0, 1.0, 80.0))
    return write(image, tmp_path / "spacing.nii.gz")


def not_an_image(tmp_path):
    (tmp_path / "notes.nii.gz").write_text("this is not an image")
    return str(tmp_path / "notes.nii.gz")


def two_modalities(tmp_path):
    a = write(synthetic_head()[0], tmp_path / "flair.nii.gz")
    return f"{a},{a}"


@pytest.mark.parametrize("make_input, message", [
    (image_2d, "is 2D"),
    (image_4d, "is 4D"),
    (image_with_nan, "NaN"),
    (image_constant, "constant"),
    (image_absurd_spacing, "spacing"),
    (not_an_image, "not an image"),
    (two_modalities, "needs 1 volume"),
])
def test_bad_images_are_refused(tiny_package, tmp_path, capsys, make_input, message):
    source = make_input(tmp_path)
    out = tmp_path / "out"
    assert main(["segment", source, "-o", str(out / "x.nii.gz"), "--model", str(tiny_package),
                 "--progress", "none"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert files_in(out) == set()


def corrupt_card(pkg):
    (pkg / CARD_NAME).write_text("{")


def tamper_weights(pkg):
    data = bytearray((pkg / WEIGHTS_NAME).read_bytes())
    data[100] ^= 1
    (pkg / WEIGHTS_NAME).write_bytes(bytes(data))


def drop_weights(pkg):
    (pkg / WEIGHTS_NAME).unlink()


@pytest.mark.parametrize("damage, message", [
    (corrupt_card, "not valid JSON"),
    (tamper_weights, "sha256"),
    (drop_weights, f"lacks {WEIGHTS_NAME}"),
    (shutil.rmtree, "not found"),
])
def test_bad_models_are_refused(tiny_package, head, tmp_path, capsys, damage, message):
    pkg = shutil.copytree(tiny_package, tmp_path / "pkg")
    damage(pkg)
    out = tmp_path / "out"
    assert main(["segment", str(head[0]), "-o", str(out / "x.nii.gz"), "--model", str(pkg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert files_in(out) == set()


def test_existing_output_is_kept_without_overwrite(tiny_package, head, tmp_path, capsys):
    out = tmp_path / "x.nii.gz"
    out.write_bytes(b"precious")
    args = ["segment", str(head[0]), "-o", str(out), "--model", str(tiny_package), "--progress", "none"]
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main([*args, "--overwrite"]) == 0
    assert sitk.ReadImage(str(out)).GetSize() == head[1].GetSize()


def test_unwritable_output_folder_is_refused(tiny_package, head, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    assert main(["segment", str(head[0]), "-o", str(blocker / "sub" / "x.nii.gz"), "--model",
                 str(tiny_package)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot create output folder" in err[0]


def test_output_may_not_overwrite_an_input(tiny_package, head, capsys):
    flair = head[0]
    before = flair.read_bytes()
    assert main(["segment", str(flair), "-o", str(flair), "--model", str(tiny_package), "--overwrite"]) == 1
    assert "also an input" in capsys.readouterr().err
    assert flair.read_bytes() == before


def test_failed_run_leaves_no_partial_file(tiny_package, head, tmp_path, monkeypatch, capsys):
    """A crash while writing (disk full, killed) must not leave a half-written label map."""
    import samless.imageio as imageio

    def failing_write(image, path, useCompression=True):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(imageio.sitk, "WriteImage", failing_write)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        main(["segment", str(head[0]), "-o", str(out / "x.nii.gz"), "--model", str(tiny_package),
              "--progress", "none"])
    assert files_in(out) == set()


@pytest.mark.parametrize("options", [
    SegmentOptions(),
    SegmentOptions(threshold=0.35, min_lesion_mm3=12.5, tta=True, three_plane=False, batch_size=4, backend="onnx",
                   device="cpu", threads=2, borders=False),
    SegmentOptions(three_plane=True, device="cuda", backend="torch", borders=True),
])
def test_options_and_their_flags_are_one_thing(options):
    """What `to_argv` writes, the parser reads back as the same options, for segment and followup alike (the
    Slicer module builds its background command this way)."""
    for command in (["segment", "in.nii.gz", "-o", "out.nii.gz"], ["followup", "a.nii.gz", "b.nii.gz", "-o", "o"]):
        args = build_parser().parse_args([*command, *options.to_argv()])
        assert segment_options(args) == options


def test_options_refuse_bad_values_when_made():
    for bad, what in (({"threshold": 1.0}, "threshold"), ({"min_lesion_mm3": -1}, "negative"),
                      ({"batch_size": 0}, "batch size"), ({"threads": 0}, "threads"), ({"device": "tpu"}, "device"),
                      ({"backend": "tf"}, "backend")):
        with pytest.raises(SamlessError, match=what):
            SegmentOptions(**bad)
