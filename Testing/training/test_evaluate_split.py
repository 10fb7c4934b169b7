"""Evaluation of runs and packages, metrics on known masks, and split files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
from training_helpers import blank_masks, misaligned, split_variant, yaml_config

from conftest import synthetic_head
from samless.cli import main
from samless.training.split import split_cases


def test_evaluate_compares_phase1_with_sam_and_phase2_without(phase1_run, phase2_run, small_split, tmp_path):
    package_dir = tmp_path / "pkg"
    assert main(["export", str(phase2_run / "checkpoints" / "best"), "-o", str(package_dir)]) == 0
    out = tmp_path / "eval"
    # The phase-1 run's own teacher (vit_tiny, random weights) is used: no --sam-type needed.
    assert main(["evaluate", "--split", str(small_split), "--model", str(package_dir), "--phase1",
                 str(phase1_run / "checkpoints" / "last"), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    names = list(summary["methods"])
    assert len(names) == 2 and "no SAM" in names[0] and "with teacher vit_tiny" in names[1]
    for stats in summary["methods"].values():
        assert 0.0 <= stats["dice"]["mean"] <= 1.0 and stats["seconds"]["mean"] > 0
    rows = (out / "cases.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * len(json.loads(small_split.read_text())["test"])
    assert "lesion_f1" in (out / "summary.md").read_text()

@pytest.mark.parametrize("make_edit, message", [
    (lambda t: lambda s: s["fold0"]["train"][0].update(flair="/nowhere/flair.nii.gz"), "does not exist"),
    (misaligned, "differ in origin"),
    (blank_masks, "masks are empty"),
    (lambda t: lambda s: s["fold0"]["train"][1].update(pd="x.nii.gz"), "unknown modality key"),
    (lambda t: lambda s: s["fold0"]["train"][0].pop("mask"), "lacks mask"),
    (lambda t: lambda s: s.pop("fold0"), "no fold0"),
])
def test_bad_splits_name_the_offending_case(small_split, tmp_path, capsys, make_edit, message):
    path = split_variant(small_split, tmp_path, make_edit(tmp_path))
    code = main(["train", "phase2", "--split", str(path), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--device", "cpu", "--workers", "0", "--samples-per-epoch", "4", "--batch-size", "2",
                 "--config", yaml_config(tmp_path, input_size=64, embed_size=16)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and message in err[0], err
    if message not in ("masks are empty", "no fold0"):
        assert "case" in err[0]


def test_make_split_folds_and_relative_paths(small_split):
    split = json.loads(small_split.read_text())
    folds = [k for k in split if k.startswith("fold")]
    assert folds == ["fold0", "fold1"] and len(split["test"]) == 1
    all_cases = {s["flair"] for s in split["test"]} | {s["flair"] for s in split["fold0"]["train"]} | {
        s["flair"] for s in split["fold0"]["val"]}
    assert len(all_cases) == 5
    vals = [s["flair"] for f in folds for s in split[f]["val"]]
    assert len(vals) == len(set(vals)) == 4  # every non-test case validates exactly once
    for sample in split["test"]:
        assert not os.path.isabs(sample["flair"]) and (small_split.parent / sample["mask"]).exists()


def test_metrics_on_known_masks():
    from samless.training.metrics import case_metrics

    truth = np.zeros((20, 40, 40), np.uint8)
    truth[5:9, 5:9, 5:9] = 1  # lesion A: 64 voxels
    truth[12:14, 30:32, 30:32] = 1  # lesion B: 8 voxels
    pred = np.zeros_like(truth)
    pred[5:9, 5:9, 5:9] = 1  # A found exactly, B missed
    pred[15:17, 10:12, 10:12] = 1  # a false positive of 8 voxels
    t, p = sitk.GetImageFromArray(truth), sitk.GetImageFromArray(pred)
    m = case_metrics(p, t)
    assert m["dice"] == pytest.approx(2 * 64 / (72 + 72))
    assert m["lesion_tpr"] == 0.5 and m["lesion_precision"] == 0.5 and m["lesion_f1"] == 0.5
    assert m["false_positives"] == 1 and m["true_lesions"] == 2
    assert m["sensitivity"] == pytest.approx(64 / 72) and m["precision"] == pytest.approx(64 / 72)
    assert m["lesion_tpr_0-10mm3"] == 0.0 and m["lesion_tpr_10-100mm3"] == 1.0
    assert m["dice_10-100mm3"] == 1.0 and m["dice_0-10mm3"] == 0.0
    assert m["hd95_mm"] > 0 and m["abs_volume_diff_ml"] == 0.0
    same = case_metrics(t, t)
    assert same["dice"] == 1.0 and same["hd95_mm"] == 0.0 and same["lesion_f1"] == 1.0
    # A lesion-free scan: clean scores 1, a single false positive scores 0 (not NaN, which means drops it).
    empty = sitk.GetImageFromArray(np.zeros_like(truth))
    clean, speck = case_metrics(empty, empty), case_metrics(p, empty)
    assert (clean["dice"], clean["iou"], clean["lesion_f1"]) == (1.0, 1.0, 1.0)
    assert (speck["dice"], speck["iou"], speck["false_positives"]) == (0.0, 0.0, 2)


def test_make_split_finds_mslesseg_style_nested_cases(tmp_path):
    from samless.training.split import make_split

    image, truth = synthetic_head()
    for patient in ("P1", "P2"):
        for timepoint in ("T1", "T2"):
            folder = tmp_path / "train" / patient / timepoint
            folder.mkdir(parents=True)
            for name, img in (("FLAIR", image), ("T1", image), ("T2", image), ("MASK", truth)):
                sitk.WriteImage(img, str(folder / f"{patient}_{timepoint}_{name}.nii.gz"))
            if patient == "P1":  # a soft mask beside the mask is listed too, and is not a second mask
                sitk.WriteImage(sitk.Cast(truth, sitk.sitkFloat32), str(folder / f"P1_{timepoint}_SOFT_MASK.nii.gz"))
    split = make_split(tmp_path / "train", tmp_path / "split.json", ["FLAIR", "T1", "T2"], folds=2,
                       test_fraction=0.25)
    modalities = ["FLAIR", "T1", "T2"]
    cases = split_cases(split, "train", modalities, fold=0) + split_cases(split, "test", modalities)
    ids = {c.id for c in cases}
    assert ids <= {"P1_T1", "P1_T2", "P2_T1", "P2_T2"} and len(ids) == len(cases)
    for case in cases:
        assert [p.name.split("_")[-1] for p in case.images] == ["FLAIR.nii.gz", "T1.nii.gz", "T2.nii.gz"]
        assert case.mask.name.endswith("_MASK.nii.gz") and "SOFT" not in case.mask.name
        assert (case.soft_mask is not None) == case.id.startswith("P1")
        assert case.soft_mask is None or case.soft_mask.name == f"{case.id}_SOFT_MASK.nii.gz"
