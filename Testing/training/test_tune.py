"""`samless tune`: post-processing chosen on validation cases, one network run per case."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import IntensityBackend
from samless.borders import BorderGrowth
from samless.cli import main
from samless.errors import SamlessError
from samless.package import load_package
from samless.pipeline import Segmenter, SegmentOptions, load_inputs
from samless.training.metrics import case_metrics
from samless.training.split import split_cases
from samless.training.tune import read_postprocessing, tune


def test_tune_scores_every_setting_and_picks_the_best(tiny_package, small_split, tmp_path, capsys):
    out = tmp_path / "tune"
    args = ["tune", "--split", str(small_split), "--model", str(tiny_package), "--out", str(out),
            "--thresholds", "0.3,0.5", "--min-lesion-mm3", "0,50", "--backend", "onnx"]
    assert main(args) == 0
    assert "best on 2 val cases" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "grid.csv").open(encoding="utf-8")))
    assert [(float(r["threshold"]), float(r["min_lesion_mm3"])) for r in rows] == [(0.3, 0), (0.3, 50), (0.5, 0),
                                                                                     (0.5, 50)]
    best = json.loads((out / "best.json").read_text(encoding="utf-8"))
    scores = [float(r["score"]) for r in rows]
    assert best["validation"]["score"] == pytest.approx(max(scores))

    # The grid's numbers are what a full segmentation with that setting gives.
    package = load_package(tiny_package)
    segmenter = Segmenter.from_package(package, backend="onnx")
    options = SegmentOptions(threshold=best["threshold"], min_lesion_mm3=best["min_lesion_mm3"])
    cases = split_cases(small_split, "val", ["FLAIR"])
    assert best["cases"] == [c.id for c in cases]
    dice = [case_metrics(segmenter.segment(load_inputs(c.images, ["FLAIR"]), options).label, c.mask)["dice"]
            for c in cases]
    assert best["validation"]["dice"] == pytest.approx(float(np.nanmean(dice)), abs=1e-6)
    assert read_postprocessing(out / "best.json") == {"threshold": best["threshold"],
                                                      "min_lesion_mm3": best["min_lesion_mm3"]}

    assert main(args) == 1  # results exist: not overwritten without --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_bad_tune_inputs_are_refused(tmp_path, tiny_package, small_split, capsys):
    with pytest.raises(SamlessError, match="make it with `samless tune`"):
        read_postprocessing(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"threshold": 0.5}')
    with pytest.raises(SamlessError, match="not a `samless tune` result"):
        read_postprocessing(tmp_path / "bad.json")
    (tmp_path / "far.json").write_text('{"threshold": 1.5, "min_lesion_mm3": 0}')
    with pytest.raises(SamlessError, match="threshold must lie in"):
        read_postprocessing(tmp_path / "far.json")
    assert main(["tune", "--split", str(small_split), "--model", str(tiny_package), "--out", str(tmp_path / "t"),
                 "--thresholds", "0,0.5"]) == 1
    assert "thresholds must lie in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_tune_chooses_border_growth_and_best_json_carries_it(tiny_package, small_split, tmp_path, capsys):
    out = tmp_path / "tune"
    args = ["tune", "--split", str(small_split), "--model", str(tiny_package), "--out", str(out), "--thresholds",
            "0.5", "--min-lesion-mm3", "0", "--rim-fractions", "0.5,0.9", "--reach-mm", "1,3", "--backend", "onnx"]
    assert main(args) == 0
    assert "borders to" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "grid.csv").open(encoding="utf-8")))
    assert [(float(r["rim_fraction"]), float(r["reach_mm"])) for r in rows] == [(0.5, 1), (0.5, 3), (0.9, 1), (0.9, 3)]
    best = max(rows, key=lambda r: float(r["score"]))
    post = read_postprocessing(out / "best.json")
    assert post["borders"]["rim_fraction"] == float(best["rim_fraction"])
    assert post["borders"]["reach_mm"] == float(best["reach_mm"])
    assert main(args[:-6] + ["--rim-fractions", "0.5", "--overwrite"]) == 1  # one without the other
    assert "go together" in capsys.readouterr().err


def test_the_border_grid_scores_what_a_package_with_those_borders_gives(tiny_package, small_split, tmp_path):
    # A network that finds the phantoms' lesions (bright voxels), so the scores are not all zero.
    package = load_package(tiny_package)
    cases = split_cases(small_split, "val", ["FLAIR"])
    growths = [BorderGrowth(rim_fraction=0.3, reach_mm=2.0), BorderGrowth(rim_fraction=0.9, reach_mm=1.0)]
    best = tune(package, cases, tmp_path / "tune", backend=IntensityBackend(), thresholds=(0.2, 0.6),
                min_sizes=(0.0, 20.0), borders=growths)
    assert best["dice"] > 0.5
    package.card = package.card.replace(
        postprocessing=package.card.postprocessing.updated(read_postprocessing(tmp_path / "tune" / "best.json")))
    segmenter = Segmenter(package.card, IntensityBackend())  # the card's threshold, size and borders
    dice = [case_metrics(segmenter.segment(load_inputs(c.images, ["FLAIR"])).label, c.mask)["dice"] for c in cases]
    assert best["dice"] == pytest.approx(float(np.nanmean(dice)), abs=1e-6)
