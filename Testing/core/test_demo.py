"""`samless demo`: the bundled sample segmented end to end, with numbers and an overlay picture."""

from __future__ import annotations

import json

import SimpleITK as sitk

from samless.cli import main
from samless.demo import sample_folder


def test_demo_writes_everything_and_prints_the_numbers(tiny_package, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny_package), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for word in ("lesions found", "lesion volume", "Dice", "seconds"):
        assert word in text
    label = sitk.ReadImage(str(out / "sample_lesions.nii.gz"))
    assert label.GetSize() == sitk.ReadImage(str(sample_folder() / "flair.nii.gz")).GetSize()
    stats = json.loads((out / "sample_lesions.json").read_text())
    assert f"lesions found   : {stats['lesion_count']}" in text
    assert (out / "sample_overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run refuses to replace its outputs unless asked to.
    assert main(["demo", "--model", str(tiny_package), "--out", str(out)]) == 1
    assert main(["demo", "--model", str(tiny_package), "--out", str(out), "--overwrite"]) == 0
