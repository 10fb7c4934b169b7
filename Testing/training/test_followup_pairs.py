"""Phantom follow-up pairs (one subject, two sessions, known change), registration accuracy on them, and
`samless evaluate --pairs` beside the subtraction of two segmentations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from samless.cli import main
from samless.followup import register_rigid
from samless.training.evaluate_pairs import change_detection, landmark_error_mm, rates, subtraction_change
from samless.training.phantom_pairs import generate_pair, lesion_classes


@pytest.fixture(scope="module")
def pair():
    return generate_pair(11, ("3d", "3d"), "medium", scale=2)


def test_a_pair_is_one_subject_in_two_sessions_with_known_change(pair):
    b, f = pair.baseline.meta, pair.followup.meta
    assert b["subject_scale"] == f["subject_scale"] and b["ventricle_widening_mm"] == f["ventricle_widening_mm"]
    assert b["head_rotation_deg"] != f["head_rotation_deg"] and b["seed"] != f["seed"]
    assert b["contrast"] != f["contrast"]  # another session, another scanner setting
    kinds = lesion_classes(pair.change)
    assert set(kinds) <= {1, 2, 3} and {1, 3} <= set(kinds)
    assert kinds.count(2) == pair.meta["new_lesions"] and kinds.count(3) == pair.meta["enlarging_lesions"]
    # the change map covers exactly the follow-up's lesions
    change = sitk.GetArrayFromImage(pair.change)
    assert np.array_equal(change > 0, sitk.GetArrayFromImage(pair.followup.mask) > 0)
    # an enlarging lesion is bigger at follow-up than where it was at baseline
    moved_base = sitk.GetArrayFromImage(sitk.Resample(pair.baseline.mask, pair.followup.mask, pair.transform,
                                                      sitk.sitkNearestNeighbor))
    grown = change == 3
    assert grown.sum() > 1.5 * (grown & (moved_base > 0)).sum()
    # new lesions lie where the baseline had none
    new = change == 2
    if new.any():
        assert (new & (moved_base > 0)).sum() < 0.05 * new.sum()


def test_pairs_are_deterministic():
    a, b = generate_pair(12, ("2d", "2d"), "low", scale=2), generate_pair(12, ("2d", "2d"), "low", scale=2)
    assert np.array_equal(sitk.GetArrayFromImage(a.followup.images["flair"]),
                          sitk.GetArrayFromImage(b.followup.images["flair"]))
    assert np.array_equal(sitk.GetArrayFromImage(a.change), sitk.GetArrayFromImage(b.change))


@pytest.mark.parametrize("seed, protocols", [(11, ("3d", "3d")), (6, ("2d", "3d"))])
def test_registration_finds_the_true_motion_between_sessions(seed, protocols, pair):
    p = pair if seed == 11 else generate_pair(seed, protocols, "medium", scale=2)
    follow = p.followup.images["flair"]
    start_error = landmark_error_mm(sitk.Euler3DTransform(), p.transform, follow)
    reg = register_rigid(follow, p.baseline.images["flair"])
    assert start_error > 5.0  # the heads did move
    assert landmark_error_mm(reg.transform, p.transform, follow) < 1.0  # half a 2 mm voxel


def test_change_detection_counts():
    truth = np.zeros((1, 10, 40), np.uint8)
    truth[0, 2:5, 2:5] = 2     # new, found
    truth[0, 2:5, 10:13] = 3   # enlarging, found as new
    truth[0, 2:5, 20:23] = 2   # new, missed
    truth[0, 6:9, 30:33] = 1   # stable
    pred = np.zeros_like(truth)
    pred[0, 3:5, 3:5] = 2
    pred[0, 2:5, 10:13] = 2
    pred[0, 6:9, 30:33] = 2    # a stable lesion called new: false positive
    t, p = sitk.GetImageFromArray(truth), sitk.GetImageFromArray(pred)
    counts = change_detection(t, p)
    assert counts == {"true_changes": 3, "found_changes": 3, "true_detected": 2, "true_detected_same_class": 1,
                      "found_true": 2, "false_positives": 1}
    r = rates(counts)
    assert r["sensitivity"] == pytest.approx(2 / 3) and r["precision"] == pytest.approx(2 / 3)
    none = change_detection(sitk.GetImageFromArray(truth * 0), sitk.GetImageFromArray(truth * 0))
    assert rates(none)["f1"] == 1.0
    # the subtraction method: what is lesion now and was not, in pieces of at least the minimum size
    follow = sitk.GetImageFromArray((truth > 0).astype(np.uint8))
    base = sitk.GetImageFromArray((truth == 1).astype(np.uint8))
    assert lesion_classes(subtraction_change(follow, base, 5.0)) == [2, 2, 2]
    assert lesion_classes(subtraction_change(follow, base, 10.0)) == []


def test_evaluate_pairs_cli(tmp_path, capsys):
    pairs = tmp_path / "pairs"
    assert main(["phantom", str(pairs), "--pairs", "--n", "2", "--seed", "4", "--scale", "2", "--protocol", "3d",
                 "--quiet"]) == 0
    listing = json.loads((pairs / "pairs.json").read_text())
    assert [p["id"] for p in listing["pairs"]] == ["pair000", "pair001"]
    out = tmp_path / "eval"
    assert main(["evaluate", "--pairs", str(pairs / "pairs.json"), "--model", "samless-demo", "--threads", "2",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    truth = sum(lesion_classes(sitk.ReadImage(str(pairs / p["change"]))).count(k)
                for p in listing["pairs"] for k in (2, 3))
    for method in ("samless-demo: samless followup", "samless-demo: segmentations only", "samless-demo: subtraction"):
        s = summary["methods"][method]
        assert s["pairs"] == 2 and s["true_changes"] == truth
        assert 0 <= s["true_detected"] <= truth and s["registration_error_mm_mean"] < 1.0
    assert (out / "pairs.csv").exists() and "subtraction" in (out / "summary.md").read_text()
    assert main(["evaluate", "--pairs", str(pairs / "pairs.json"), "--model", "samless-demo", "--out",
                 str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["evaluate", "--pairs", str(pairs / "pairs.json"), "--split", "x.json", "--model", "samless-demo",
                 "--out", str(tmp_path / "e2")]) == 1
    assert "one of them" in capsys.readouterr().err
