"""`samless followup`: lesion classes on constructed masks, the registration against a known motion, and the
command end to end on the bundled sample (a lesion taken out of the baseline must come back as new)."""

from __future__ import annotations

import csv
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SAMPLE, moved, sample_change_pair
from samless.cli import main
from samless.errors import SamlessError
from samless.followup import (
    ChangeRules,
    change_label,
    classify,
    confirm_changes,
    difference_evidence,
    register_rigid,
    registration_warnings,
)


def blobs(shape, spheres, spacing=(1.0, 1.0, 1.0)) -> sitk.Image:
    """A uint8 mask of spheres ((z, y, x) centre in voxels, radius in voxels)."""
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    arr = np.zeros(shape, np.uint8)
    for (cz, cy, cx), r in spheres:
        arr[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r * r] = 1
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    return img


def classes(rows, timepoint):
    return sorted((tuple(round(c) for c in r["centroid_mm"][::-1]), r["class"]) for r in rows
                  if r["timepoint"] == timepoint)


def test_classify_each_kind_of_change():
    shape = (40, 60, 120)
    baseline = blobs(shape, [((20, 30, 10), 4),    # stays
                             ((20, 30, 30), 3),    # grows to radius 5: (5/3)^3 = 4.6x
                             ((20, 30, 50), 5),    # shrinks to radius 3
                             ((20, 30, 70), 4),    # disappears
                             ((20, 25, 90), 3), ((20, 35, 90), 3)])  # two that merge into one of the same volume
    followup = blobs(shape, [((20, 30, 10), 4), ((20, 30, 30), 5), ((20, 30, 50), 3),
                             ((20, 30, 110), 4),   # new
                             ((5, 10, 110), 1),    # new but tiny (7 voxels < 14 mm^3): not called new
                             ((20, 30, 90), 4)])   # the merged pair: 268 voxels, no bigger than the two's 2 x 123
    rows = classify(followup, baseline, ChangeRules())
    assert classes(rows, "followup") == [((5, 10, 110), "stable"), ((20, 30, 10), "stable"),
                                         ((20, 30, 30), "enlarging"), ((20, 30, 50), "stable"),
                                         ((20, 30, 90), "stable"), ((20, 30, 110), "new")]
    assert classes(rows, "baseline") == [((20, 25, 90), "persisting"), ((20, 30, 10), "persisting"),
                                         ((20, 30, 30), "persisting"), ((20, 30, 50), "shrinking"),
                                         ((20, 30, 70), "disappeared"), ((20, 35, 90), "persisting")]
    merged = next(r for r in rows if r["timepoint"] == "followup" and round(r["centroid_mm"][0]) == 90)
    assert merged["volume_baseline_mm3"] == pytest.approx(2 * 123, rel=0.05)  # both halves credited to it
    label = sitk.GetArrayFromImage(change_label(followup, rows))
    assert label[20, 30, 110] == 2 and label[20, 30, 30] == 3 and label[20, 30, 10] == 1 and label[20, 30, 70] == 0
    # a stricter growth rule turns the enlarging lesion stable; a looser match joins nothing new
    strict = classify(followup, baseline, ChangeRules(growth_fraction=4.0))
    assert "enlarging" not in {r["class"] for r in strict}


def test_a_change_must_show_in_the_difference_image():
    """Lesions the baseline's segmentation missed, or drew smaller, are stable unless the images changed there."""
    shape, rng = (40, 60, 120), np.random.default_rng(0)
    head = blobs(shape, [((20, 30, 60), 18)])  # a 'brain' of value 1 in air
    def scan(spheres):
        arr = 100.0 * sitk.GetArrayFromImage(head) + 180.0 * sitk.GetArrayFromImage(blobs(shape, spheres))
        img = sitk.GetImageFromArray((arr + rng.normal(0, 3, shape)).astype(np.float32))
        return img
    a, b, c, d = ((20, 30, 45), 3), ((20, 30, 75), 3), ((20, 22, 60), 2), ((20, 38, 60), 2)
    before_image = scan([a, c, d])                        # b is not there yet; c and d are small
    after_image = scan([a, b, c, ((20, 38, 60), 4)])      # b appears, d grows; a and c stay as they were
    after = blobs(shape, [a, b, ((20, 22, 60), 4), ((20, 38, 60), 4)])  # c only drawn bigger at follow-up
    before = blobs(shape, [c, d])                          # a was missed by the baseline's segmentation
    rules = ChangeRules()
    rows = classify(after, before, rules)
    assert sorted(r["class"] for r in rows if r["timepoint"] == "followup") == ["enlarging", "enlarging", "new",
                                                                                "new"]
    evidence = difference_evidence(after_image, before_image, before_image.GetSpacing())
    confirm_changes(rows, after, before, evidence, rules)
    found = {tuple(round(v) for v in r["centroid_mm"][::-1]): r for r in rows if r["timepoint"] == "followup"}
    assert found[(20, 30, 45)]["class"] == "stable" and found[(20, 30, 75)]["class"] == "new"   # a, b
    assert found[(20, 22, 60)]["class"] == "stable" and found[(20, 38, 60)]["class"] == "enlarging"  # c, d
    assert found[(20, 30, 75)]["evidence_mm3"] > 50 > found[(20, 30, 45)]["evidence_mm3"]
    # the check off: the segmentations alone decide
    off = classify(after, before, ChangeRules(evidence_sd=0))
    assert sorted(r["class"] for r in off if r["timepoint"] == "followup").count("stable") == 0


def test_rules_refuse_bad_values():
    with pytest.raises(SamlessError, match="growth_fraction"):
        classify(blobs((8, 8, 8), []), blobs((8, 8, 8), []), ChangeRules(growth_fraction=-1))
    with pytest.raises(SamlessError, match="evidence_fraction"):
        classify(blobs((8, 8, 8), []), blobs((8, 8, 8), []), ChangeRules(evidence_fraction=1.5))


def test_registration_recovers_a_known_motion():
    followup = sitk.ReadImage(str(SAMPLE / "flair.nii.gz"))
    baseline, motion = moved(followup)
    reg = register_rigid(followup, baseline)
    points = [followup.TransformContinuousIndexToPhysicalPoint([x, y, z])
              for x in (60, 120, 180) for y in (60, 120, 180) for z in (10, 25, 40)]
    errors = [np.linalg.norm(np.subtract(reg.transform.TransformPoint(p), motion.TransformPoint(p))) for p in points]
    assert max(errors) < 0.5, errors
    assert reg.correlation > 0.95 and registration_warnings(reg, False) == []


def test_registration_of_an_unrelated_volume_is_refused_or_flagged():
    followup = sitk.ReadImage(str(SAMPLE / "flair.nii.gz"))
    arr = sitk.GetArrayFromImage(followup)
    noise = sitk.GetImageFromArray(np.random.default_rng(0).permutation(arr.ravel()).reshape(arr.shape))
    noise.CopyInformation(followup)
    reg = register_rigid(followup, noise)
    with pytest.raises(SamlessError, match="different patients"):
        registration_warnings(reg, allow_poor=False)
    assert "do not trust" in registration_warnings(reg, allow_poor=True)[0]


@pytest.fixture(scope="module")
def sample_pair(tmp_path_factory):
    """`sample_change_pair` written to files: both paths and the new lesion's centre (follow-up index, z y x)."""
    folder = tmp_path_factory.mktemp("pair")
    base, image, centre = sample_change_pair()
    paths = folder / "baseline.nii.gz", folder / "followup.nii.gz"
    sitk.WriteImage(base, str(paths[0]))
    sitk.WriteImage(image, str(paths[1]))
    return paths, centre


def test_followup_end_to_end(sample_pair, tmp_path, capsys):
    (baseline, followup), centre = sample_pair
    before = hashlib.sha256(baseline.read_bytes()).hexdigest()
    out = tmp_path / "change"
    assert main(["followup", str(baseline), str(followup), "-o", str(out), "--threads", "2", "--progress",
                 "none"]) == 0
    assert hashlib.sha256(baseline.read_bytes()).hexdigest() == before
    report = json.loads((out / "change.json").read_text())
    summary = report["summary"]
    assert summary["new_lesions"] == 1 and summary["enlarging_lesions"] == 0
    assert summary["stable_lesions"] >= 8 and summary["volume_change_ml"] > 0.3
    assert report["registration"]["correlation"] > 0.95 and report["warnings"] == []
    # read back by an independent reader: the new lesion where the painted-over lesion was
    change = np.asarray(nib.load(str(out / "change.nii.gz")).dataobj).transpose(2, 1, 0)
    assert change[centre] == 2 and set(np.unique(change)) <= {0, 1, 2, 3}
    grid = sitk.ReadImage(str(followup))
    for name in ("change", "baseline_registered", "followup_lesions", "baseline_lesions"):
        img = sitk.ReadImage(str(out / f"{name}.nii.gz"))
        assert img.GetSize() == grid.GetSize() and img.GetOrigin() == pytest.approx(grid.GetOrigin(), abs=1e-4)
    rows = list(csv.DictReader((out / "change.csv").open()))
    assert sum(r["class"] == "new" for r in rows) == 1 and len(rows) == len(report["lesions"])
    transform = sitk.ReadTransform(str(out / "baseline_to_followup.tfm"))
    assert transform.GetParameters() == pytest.approx(
        sitk.Euler3DTransform(transform).GetParameters())  # a plain rigid transform Slicer can read
    # an existing output folder is kept unless --overwrite
    assert main(["followup", str(baseline), str(followup), "-o", str(out), "--progress", "none"]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_followup_refuses_bad_requests(sample_pair, tmp_path, capsys):
    (baseline, followup), _ = sample_pair
    assert main(["followup", str(baseline), str(followup), "-o", str(tmp_path / "x.nii.gz")]) == 1
    assert "names a file" in capsys.readouterr().err
    assert main(["followup", str(baseline), str(followup), "-o", str(followup.parent)]) == 1
    assert "holds an input" in capsys.readouterr().err
    assert main(["followup", str(baseline), str(followup), "-o", str(tmp_path / "r"), "--evidence-fraction", "2"]) == 1
    assert "evidence_fraction = 2.0 must be at most 1" in capsys.readouterr().err and not (tmp_path / "r").exists()
    noise = tmp_path / "noise.nii.gz"
    img = sitk.ReadImage(str(followup))
    arr = sitk.GetArrayFromImage(img)
    other = sitk.GetImageFromArray(np.random.default_rng(1).permutation(arr.ravel()).reshape(arr.shape))
    other.CopyInformation(img)
    sitk.WriteImage(other, str(noise))
    out = tmp_path / "refused"
    assert main(["followup", str(noise), str(followup), "-o", str(out), "--skip-contrast-check",
                 "--progress", "none"]) == 1
    assert "--allow-poor-registration" in capsys.readouterr().err and not out.exists()
