"""The typed model card: read, validated and written back (no torch needed)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from samless.card import CARD_NAME, ModelCard, NetConfig, Postprocessing
from samless.errors import SamlessError

BUNDLED = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "samless-demo" / CARD_NAME


def bundled_json() -> dict:
    return json.loads(BUNDLED.read_text(encoding="utf-8"))


def test_the_bundled_card_reads_and_writes_back_unchanged():
    data = bundled_json()
    card = ModelCard.from_json(data)
    assert card.to_json() == data
    assert card.inputs.channels == card.architecture.in_channels == 3  # FLAIR with a neighbour a side
    assert card.postprocessing.borders and card.postprocessing.borders_by_default
    assert card.files["model.onnx"].sha256 == data["files"]["model.onnx"]["sha256"]


def test_an_older_card_gets_what_it_leaves_out_and_keeps_what_samless_does_not_know():
    old = {"schema_version": 1, "name": "old", "architecture": {"backbone": "hardnet39ds", "input_size": 256},
           "inputs": {"modalities": ["FLAIR"], "slicing_axis": "axial", "planes": ["axial"], "spacing_mm": [1, 1]},
           "normalization": {"method": "foreground_percentile", "lower_percentile": 1.0, "upper_percentile": 50.0},
           "postprocessing": {"threshold": 0.5, "min_lesion_mm3": 3.0},
           "files": {"model.onnx": {"sha256": "ab" * 32}}, "demo": True, "training_data": "48 phantoms"}
    card = ModelCard.from_json(old)
    assert (card.inputs.orientation, card.inputs.context_slices) == ("LPS", 0)
    assert card.normalization.clip == (0.0, 4.0) and card.postprocessing.connectivity == "full"
    assert card.postprocessing.borders is None and card.files["model.onnx"].bytes is None
    assert card.extra == {"demo": True, "training_data": "48 phantoms"}
    again = card.to_json()
    assert again["demo"] is True and again["inputs"]["orientation"] == "LPS" and again["schema_version"] == 1
    assert ModelCard.from_json(again) == card


def test_opt_in_borders_and_tuned_settings_round_trip():
    post = Postprocessing.from_json({"threshold": 0.4, "min_lesion_mm3": 6,
                                     "borders": {"rim_fraction": 0.7, "reach_mm": 4, "default": False}})
    assert post.borders == {"rim_fraction": 0.7, "reach_mm": 4} and not post.borders_by_default
    assert post.to_json()["borders"]["default"] is False
    assert Postprocessing.from_json(post.to_json()) == post
    tuned = post.updated({"threshold": 0.3, "borders": {"rim_fraction": 0.5}, "validation": {"dice": 0.7}})
    assert (tuned.threshold, tuned.min_lesion_mm3, dict(tuned.borders)) == (0.3, 6, {"rim_fraction": 0.5})
    assert tuned.borders_by_default  # a tuning's borders replace the card's, opt-in flag included


def test_a_three_plane_card_needs_schema_2():
    card = ModelCard.from_json(bundled_json())
    fused = card.replace(inputs=dataclasses.replace(card.inputs, planes=("axial", "coronal", "sagittal")))
    assert (card.schema_version, fused.schema_version) == (1, 2)
    assert fused.to_json()["schema_version"] == 2


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["inputs"].update(colour="red"), "inputs in model.json has a setting"),
    (lambda c: c["normalization"].update(gamma=2), "has a setting this samless does not know"),
    (lambda c: c["architecture"].update(backbone="resnet"), "bad architecture"),
    (lambda c: c.update(files=[]), "files in model.json must be an object"),
    (lambda c: c.update(files={}), "neither weights.safetensors nor model.onnx"),
])
def test_bad_cards_say_what_is_wrong(edit, message):
    data = copy.deepcopy(bundled_json())
    edit(data)
    with pytest.raises(SamlessError, match=message):
        ModelCard.from_json(data, "pkg")


def test_a_checkpoint_card_lists_no_files_yet():
    card = ModelCard(name="run", architecture=NetConfig(backbone="hardnet39ds", input_size=256))
    data = card.to_json()
    assert data["files"] == {}
    assert ModelCard.from_json(data, require_files=False) == card
    with pytest.raises(SamlessError, match="neither"):
        ModelCard.from_json(data)
    with pytest.raises(SamlessError, match="must hold a JSON object"):
        ModelCard.from_json([data])
