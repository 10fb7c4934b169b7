"""The LGA-like classical baseline on generated phantoms, through `samless evaluate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("nilearn")

from samless.cli import main  # noqa: E402
from samless.training.baseline import lga_baseline, phantom_white_matter  # noqa: E402
from samless.training.metrics import case_metrics  # noqa: E402
from samless.training.phantom import generate_case, generate_dataset  # noqa: E402


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("ph") / "set"
    generate_dataset(out, 3, seed=5, protocol="3d", lesion_load="high", folds=2, test_fraction=0.34, scale=2,
                     progress=False)
    return out


def test_white_matter_map_comes_from_the_same_case(phantoms):
    case_dir = phantoms / "case000"
    meta = json.loads((case_dir / "phantom.json").read_text())
    again = generate_case(meta["seed"], meta["protocol"], lesion_load=meta["lesion_load"], scale=meta["scale"])
    saved = sitk.ReadImage(str(case_dir / "mask.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(again.mask), sitk.GetArrayFromImage(saved))
    wm = phantom_white_matter(case_dir)
    assert wm.GetSize() == saved.GetSize()
    lesion = sitk.GetArrayFromImage(saved) > 0
    assert np.mean(sitk.GetArrayFromImage(wm)[lesion] > 0.3) > 0.9  # lesions sit in white matter


def test_baseline_finds_bright_white_matter_lesions(phantoms):
    case_dir = phantoms / "case001"
    label = lga_baseline(sitk.ReadImage(str(case_dir / "flair.nii.gz")), phantom_white_matter(case_dir))
    metrics = case_metrics(label, case_dir / "mask.nii.gz")
    assert metrics["dice"] > 0.4 and metrics["lesion_tpr"] > 0.4, metrics


def test_evaluate_runs_the_baseline_and_reports_by_protocol(phantoms, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--split", str(phantoms / "split.json"), "--baseline", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    (name,) = summary["methods"]
    assert "baseline" in name and list(summary["by_group"][name]) == ["3d"]
    assert summary["methods"][name]["dice"]["mean"] > 0.3
