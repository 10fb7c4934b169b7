"""Lesion borders: a found lesion grows into its fainter rim, and nothing else moves."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import IntensityBackend, dice, synthetic_head
from samless.borders import BorderGrowth
from samless.card import Postprocessing
from samless.errors import SamlessError
from samless.package import load_package
from samless.pipeline import Segmenter, SegmentOptions

SHAPE = (40, 40, 48)


def ball(centre, radius) -> np.ndarray:
    z, y, x = np.indices(SHAPE)
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2


def lesion_scene():
    """White matter at 1.0 (noisy), a lesion whose core (r 3) is at 1.8 and rim (r 3-5) at 1.4, half its
    contrast; a bright blob 14 mm away that the network did not call a lesion; the network's map: the core."""
    rng = np.random.default_rng(0)
    core, whole, blob = ball((20, 20, 16), 3), ball((20, 20, 16), 5), ball((20, 20, 32), 3)
    flair = 1.0 + rng.normal(0, 0.02, SHAPE)
    flair[whole] = 1.4 + rng.normal(0, 0.02, whole.sum())
    flair[core] = 1.8
    flair[blob] = 1.8
    probability = np.where(core, 0.95, 0.0).astype(np.float32)
    return flair.astype(np.float32), probability, core, whole, blob


def test_rim_at_half_contrast_joins_and_nothing_else_moves():
    flair, probability, core, whole, blob = lesion_scene()
    fg = np.ones(SHAPE, bool)
    grown = BorderGrowth(rim_fraction=0.4, reach_mm=3.0)(probability, flair, fg, (1.0, 1.0, 1.0), 0.4)
    assert dice(grown >= 0.4, whole) > 0.95  # the rim's voxels are at 50% of the core's contrast, over 40%
    assert np.all(grown >= probability)  # it only ever raises the map
    assert grown[blob].max() == 0.0  # no lesion where the network found none
    assert np.array_equal(probability, lesion_scene()[1])  # the input map is not modified

    strict = BorderGrowth(rim_fraction=0.6, reach_mm=3.0)(probability, flair, fg, (1.0, 1.0, 1.0), 0.4)
    assert dice(strict >= 0.4, core) > 0.95  # 50% contrast is short of 60%: the lesion stays its core
    assert dice(strict >= 0.3, whole) > 0.95  # a lower threshold (the sensitivity slider) takes the rim in


def test_reach_bounds_the_growth_and_a_flat_lesion_does_not_grow():
    flair, probability, core, whole, _ = lesion_scene()
    fg = np.ones(SHAPE, bool)
    near = BorderGrowth(rim_fraction=0.4, reach_mm=1.0)(probability, flair, fg, (1.0, 1.0, 1.0), 0.4) >= 0.4
    assert core.sum() < near.sum() < whole.sum()
    assert not (near & ~ball((20, 20, 16), 4.01)).any()  # one voxel of growth, along faces and diagonals

    flat = np.ones(SHAPE, np.float32)  # the network's lesion is no brighter than its surroundings
    same = BorderGrowth()(probability, flat, fg, (1.0, 1.0, 1.0), 0.4)
    np.testing.assert_array_equal(same, probability)


def test_smoothing_keeps_noise_from_joining_a_lesion_with_a_sharp_edge():
    rng = np.random.default_rng(1)
    core = ball((20, 20, 16), 4)
    flair = (1.0 + rng.normal(0, 0.2, SHAPE)).astype(np.float32)  # noisy tissue around a flat lesion
    flair[core] = 1.6
    probability = np.where(core, 0.95, 0.0).astype(np.float32)
    fg = np.ones(SHAPE, bool)
    noisy = BorderGrowth(rim_fraction=0.5, reach_mm=3.0)(probability, flair, fg, (1.0, 1.0, 1.0), 0.4) >= 0.4
    smooth = BorderGrowth(rim_fraction=0.5, reach_mm=3.0, smooth_mm=0.7)(probability, flair, fg, (1.0, 1.0, 1.0),
                                                                        0.4) >= 0.4
    assert (noisy & ~core).sum() > 40  # single noisy voxels at half the lesion's contrast join it
    assert (smooth & ~core).sum() < 0.25 * (noisy & ~core).sum()


def test_growth_stays_inside_the_head():
    flair, probability, core, whole, _ = lesion_scene()
    fg = np.ones(SHAPE, bool)
    fg[:, :, 19:] = False  # a head edge through the rim
    grown = BorderGrowth(rim_fraction=0.4, reach_mm=3.0)(probability, flair, fg, (1.0, 1.0, 1.0), 0.4)
    assert not (grown[:, :, 19:] > probability[:, :, 19:]).any()
    assert (grown[:, :, :19] >= 0.4).sum() > core[:, :, :19].sum()


@pytest.mark.parametrize("borders, message", [
    ({"rim_fraction": 1.5}, "rim_fraction"),
    ({"reach_mm": -1}, "reach_mm"),
    ({"shell_mm": [4, 2]}, "shell"),
    ({"smooth_mm": -1}, "smooth_mm"),
    ({"radius": 3}, "not understood"),
])
def test_bad_border_settings_in_a_card_are_refused(borders, message):
    with pytest.raises(SamlessError, match=message):
        BorderGrowth.from_card(Postprocessing.from_json({"threshold": 0.4, "borders": borders}))


def test_card_settings_round_trip_and_older_cards_grow_nothing():
    assert BorderGrowth.from_card(Postprocessing.from_json({"threshold": 0.4, "min_lesion_mm3": 6})) is None
    growth = BorderGrowth(rim_fraction=0.6, reach_mm=3.0)
    back = BorderGrowth.from_card(Postprocessing.from_json({"borders": json.loads(json.dumps(growth.to_json()))}))
    assert back == growth


def rimmed_head():
    """A 1 mm synthetic head whose lesions (~260, a bright core) have a 2 mm rim at ~180 (half the core's
    contrast over the brain's ~100); the truth is core and rim."""
    image, core = synthetic_head(size=(60, 70, 60), spacing=(1.0, 1.0, 1.0), origin=(-30.0, -35.0, -30.0),
                                 head_radii=(27.0, 32.0, 28.0))
    whole = sitk.BinaryDilate(core, [2, 2, 2], sitk.sitkBall)
    voxels = sitk.GetArrayFromImage(image)
    rim = (sitk.GetArrayFromImage(whole) > 0) & (sitk.GetArrayFromImage(core) == 0)
    voxels[rim] = 180.0
    out = sitk.GetImageFromArray(voxels)
    out.CopyInformation(image)
    return out, core, whole


def with_borders(tiny_package, folder, borders):
    package = shutil.copytree(tiny_package, folder)
    card = json.loads((package / "model.json").read_text())
    card["postprocessing"] = {**card["postprocessing"], "threshold": 0.5, "borders": borders}
    (package / "model.json").write_text(json.dumps(card))
    return load_package(package)


def test_the_pipeline_grows_borders_the_card_asks_for_and_relabel_keeps_them(tiny_package, tmp_path):
    image, core, whole = rimmed_head()
    core_a, whole_a = sitk.GetArrayFromImage(core), sitk.GetArrayFromImage(whole)
    plain = Segmenter(load_package(tiny_package).card, IntensityBackend())  # finds the bright cores only
    options = SegmentOptions(threshold=0.5, min_lesion_mm3=0)
    before = sitk.GetArrayFromImage(plain.segment([image], options).label)
    assert dice(before, core_a) > 0.8 and dice(before, whole_a) < 0.6

    grower = Segmenter(with_borders(tiny_package, tmp_path / "grow", {"rim_fraction": 0.4, "reach_mm": 3.0}).card,
                       IntensityBackend())
    result = grower.segment([image], options)
    after = sitk.GetArrayFromImage(result.label)
    assert dice(after, whole_a) > 0.85
    assert result.statistics["lesion_count"] == 2
    # the stored probability carries the borders: re-thresholding it needs no network and keeps them
    again = sitk.GetArrayFromImage(grower.relabel(result.probability, options).label)
    np.testing.assert_array_equal(again, after)
    stricter = sitk.GetArrayFromImage(grower.relabel(result.probability, SegmentOptions(threshold=0.9)).label)
    assert stricter.sum() < 0.7 * after.sum()


def test_a_model_whose_first_input_is_not_flair_cannot_grow_borders(tiny_package, tmp_path):
    package = shutil.copytree(tiny_package, tmp_path / "t1")
    card = json.loads((package / "model.json").read_text())
    card["inputs"]["modalities"] = ["T1"]
    card["postprocessing"]["borders"] = {"rim_fraction": 0.5}
    (package / "model.json").write_text(json.dumps(card))
    with pytest.raises(SamlessError, match="FLAIR first input"):
        Segmenter(load_package(package).card, IntensityBackend())


def test_a_speck_under_the_minimum_size_does_not_grow_into_a_lesion():
    flair, probability, core, whole, _ = lesion_scene()
    fg = np.ones(SHAPE, bool)
    grown = BorderGrowth(rim_fraction=0.4, reach_mm=3.0)(probability, flair, fg, (1.0, 1.0, 1.0), 0.4,
                                                         min_lesion_mm3=float(core.sum()) + 1)
    np.testing.assert_array_equal(grown, probability)


def test_opt_in_borders_grow_only_when_asked_and_the_run_says_which(tiny_package, tmp_path):
    image, _, whole = rimmed_head()
    whole_a = sitk.GetArrayFromImage(whole)
    package = with_borders(tiny_package, tmp_path / "optin", {"rim_fraction": 0.4, "reach_mm": 3.0, "default": False})
    segmenter = Segmenter(package.card, IntensityBackend())
    plain = segmenter.segment([image], SegmentOptions(min_lesion_mm3=0))
    assert plain.statistics["borders"] is None
    grown = segmenter.segment([image], SegmentOptions(min_lesion_mm3=0, borders=True))
    assert grown.statistics["borders"]["rim_fraction"] == 0.4
    assert dice(sitk.GetArrayFromImage(grown.label), whole_a) > dice(sitk.GetArrayFromImage(plain.label), whole_a) + 0.2

    without = Segmenter(load_package(tiny_package).card, IntensityBackend())
    with pytest.raises(SamlessError, match="no lesion border settings"):
        without.segment([image], SegmentOptions(borders=True))
    assert SegmentOptions(borders=False).to_argv() == ["--no-borders"]
    assert SegmentOptions(borders=True).to_argv() == ["--borders"]
