"""The model package: round trip, verification, refusal of anything tampered with."""

from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile

import pytest
import torch

from samless.describe import describe
from samless.errors import SamlessError
from samless.package import (
    CARD_NAME,
    MODEL_PATH_ENV,
    ONNX_NAME,
    SCHEMA_VERSION,
    WEIGHTS_NAME,
    load_package,
    resolve_model,
)
from samless.package_write import save_package


def copy_of(package_dir, tmp_path):
    return shutil.copytree(package_dir, tmp_path / "copy")


def test_round_trip_restores_weights_and_card(tiny_package):
    package = load_package(tiny_package)
    card = json.loads((tiny_package / CARD_NAME).read_text())
    assert package.card.to_json() == card  # the typed card writes back exactly what it read
    assert card["schema_version"] == 1  # an axial model: older samless versions read it too
    assert set(card["files"]) == {WEIGHTS_NAME, ONNX_NAME}
    for key in ("architecture", "inputs", "normalization", "postprocessing", "license", "created"):
        assert key in card
    net = package.build_torch_model()
    state = package.state_dict()
    assert set(state) == set(net.state_dict())
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    # The rebuilt network computes the same thing twice (eval mode, no dropout).
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(net(x), package.build_torch_model()(x))


def test_zip_loads_like_the_folder(tiny_package, tmp_path):
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in tiny_package.iterdir():
            zf.write(path, f"tiny/{path.name}")
    assert load_package(archive).card == load_package(tiny_package).card


def test_tampered_weights_are_refused(tiny_package, tmp_path):
    copy = copy_of(tiny_package, tmp_path)
    data = bytearray((copy / WEIGHTS_NAME).read_bytes())
    data[-1] ^= 0xFF  # one flipped byte
    (copy / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(SamlessError, match=f"{WEIGHTS_NAME} does not match its sha256"):
        load_package(copy)


def test_tampered_onnx_is_refused(tiny_package, tmp_path):
    copy = copy_of(tiny_package, tmp_path)
    (copy / ONNX_NAME).write_bytes((copy / ONNX_NAME).read_bytes()[:-10])
    with pytest.raises(SamlessError, match="tampered"):
        load_package(copy)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("architecture"), "lacks architecture"),
        (lambda c: c.update(schema_version=SCHEMA_VERSION + 1), "newer than this samless"),
        (lambda c: c["files"][WEIGHTS_NAME].pop("sha256"), "no sha256"),
        (lambda c: c["inputs"].update(modalities=["FLAIR", "T1"]), "2 modalities"),
        (lambda c: c["inputs"].update(slicing_axis="oblique"), "slicing_axis"),
        (lambda c: c["inputs"].update(context_slices=1), "1 modalities x 3 slices"),
        (lambda c: c["inputs"].update(context_slices=-1), "context_slices must be"),
        (lambda c: c["inputs"].update(planes=["axial", "coronal"]), "planes must be"),
    ],
)
def test_bad_cards_are_refused(tiny_package, tmp_path, edit, message):
    copy = copy_of(tiny_package, tmp_path)
    card = json.loads((copy / CARD_NAME).read_text())
    edit(card)
    (copy / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(SamlessError, match=message):
        load_package(copy)


def test_missing_and_corrupt_files_are_refused(tiny_package, tmp_path):
    copy = copy_of(tiny_package, tmp_path)
    (copy / ONNX_NAME).unlink()
    with pytest.raises(SamlessError, match=f"lacks {ONNX_NAME}"):
        load_package(copy)
    (copy / CARD_NAME).write_text("{not json")
    with pytest.raises(SamlessError, match="not valid JSON"):
        load_package(copy)
    (copy / CARD_NAME).unlink()
    with pytest.raises(SamlessError, match="not a model package"):
        load_package(copy)
    (tmp_path / "junk.zip").write_bytes(b"PK not really")
    with pytest.raises(SamlessError, match="valid .zip"):
        load_package(tmp_path / "junk.zip")
    with pytest.raises(SamlessError, match="does not exist"):
        load_package(tmp_path / "nowhere")


def test_weights_that_do_not_fit_the_architecture_are_refused(tiny_package, tmp_path):
    copy = copy_of(tiny_package, tmp_path)
    card = json.loads((copy / CARD_NAME).read_text())
    card["architecture"]["backbone"] = "hardnet68"
    (copy / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(SamlessError, match="do not match the architecture"):
        load_package(copy).build_torch_model()


def test_no_pickle_in_a_package(tiny_package):
    for path in tiny_package.iterdir():
        assert not zipfile.is_zipfile(path), f"{path.name} is a zip (torch.save format)"
        assert not path.read_bytes().startswith(b"\x80"), f"{path.name} looks pickled"


def test_save_refuses_to_overwrite(tiny_package):
    package = load_package(tiny_package)
    with pytest.raises(SamlessError, match="exists"):
        save_package(package.build_torch_model(), package.card, tiny_package)


def test_a_saved_package_has_the_permissions_of_plain_files(tiny_package, tmp_path):
    # Others may read it (a shared model folder); safetensors and mkdtemp alone would make it owner-only.
    package = load_package(tiny_package)
    out = save_package(package.build_torch_model(), package.card, tmp_path / "copy")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_bundled_names_resolve_through_the_search_path(tiny_package, monkeypatch):
    monkeypatch.setenv(MODEL_PATH_ENV, str(tiny_package.parent))
    assert resolve_model("tiny") == tiny_package
    assert resolve_model(str(tiny_package)) == tiny_package
    with pytest.raises(SamlessError, match="tiny"):  # the message lists what is there
        resolve_model("no-such-model")


def test_describe_shows_the_card(tiny_package):
    text = describe(load_package(tiny_package))
    assert "tiny-test" in text and "hardnet39ds" in text and "FLAIR" in text and "Apache-2.0" in text


def test_describe_lists_the_runs_that_made_the_network(tiny_package):
    scratch = {"phase": 2, "run": "a", "epochs": 12, "init": "scratch", "context_slices": 0, "loss": "dice_ce"}
    tuned = {"phase": 2, "run": "b", "epochs": 40, "init": "old-pkg", "context_slices": 1, "cpu_bf16": True,
             "soft_labels": True, "three_plane": True}
    package_entry = {"run": "old-pkg", "package": "old", "weights_sha256": "ab" * 32,
                     "provenance": {"phases": [{"phase": 1, "run": "p1", "epochs": 5, "sam_type": "vit_b",
                                                "sam_checkpoint": "sam_vit_b.pth"}]}}
    package = load_package(tiny_package)
    package.card = package.card.replace(provenance={
        "training_data": "48 phantoms", "split_sha256": "cd" * 32, "fold": 0,
        "phases": [{"phase": 2, "run": "soup", "average_of": [[scratch], [package_entry, tuned],
                                                              [{"run": "c", "note": "checkpoint c is gone"}]]}]})
    lines = describe(package).splitlines()
    runs = lines[next(i for i, line in enumerate(lines) if line.startswith("runs")):]
    assert "trained on   : 48 phantoms (fold 0, split sha256 cdcdcdcdcdcd)" in lines
    assert runs == [
        "runs         : soup: the mean of 3 networks' weights:",
        "                 network 1:",
        "                   a: phase 2, 12 epochs from scratch (loss dice_ce)",
        "                 network 2:",
        "                   old-pkg: model package old (weights sha256 abababababab), itself made by:",
        "                     p1: phase 1, 5 epochs, SAM vit_b (sam_vit_b.pth)",
        "                   b: phase 2, 40 epochs from old-pkg (context_slices 1, bfloat16, soft labels, "
        "three planes)",
        "                 network 3:",
        "                   c: checkpoint c is gone",
    ]


def test_describe_lists_an_average_s_shared_history_once(tiny_package):
    run = {"phase": 2, "run": "a", "epochs": 12, "init": "scratch"}
    b = {"phase": 2, "run": "b", "epochs": 10, "init": "a"}
    package = load_package(tiny_package)
    package.card = package.card.replace(provenance={"phases": [{"phase": 2, "run": "soup", "average_of": [
        [run, b], [run, b, {**b, "run": "c", "init": "b"}], [run, b, {**b, "run": "d", "init": "b", "epochs": 4}]]}]})
    lines = describe(package).splitlines()
    assert lines[next(i for i, line in enumerate(lines) if line.startswith("runs")):] == [
        "runs         : soup: the mean of 3 networks' weights, all trained on from these 2 runs:",
        "                 a: phase 2, 12 epochs from scratch",
        "                 b: phase 2, 10 epochs from a",
        "                 network 1: b as it is",
        "                 network 2:",
        "                   c: phase 2, 10 epochs from b",
        "                 network 3:",
        "                   d: phase 2, 4 epochs from b",
    ]

def test_describe_reads_cards_from_before_runs_had_names(tiny_package):
    # Exports before the whole --init chain was recorded: no run names; a hand-edited card with an empty mean.
    package = load_package(tiny_package)
    package.card = package.card.replace(provenance={"phases": [
        {"phase": 1, "epochs": 200, "sam_type": "vit_b", "sam_checkpoint": "sam.pth"},
        {"phase": 2, "epochs": 50, "init": "runs/p1/checkpoints/best"},
        {"run": "odd", "average_of": []}]})
    lines = describe(package).splitlines()
    assert lines[next(i for i, line in enumerate(lines) if line.startswith("runs")):] == [
        "runs         : ?: phase 1, 200 epochs, SAM vit_b (sam.pth)",
        "               ?: phase 2, 50 epochs from runs/p1/checkpoints/best",
        "               odd: phase ?, ? epochs from ?",
    ]

def test_half_precision_package_is_smaller_and_both_backends_agree(tiny_package, head, tmp_path):
    import SimpleITK as sitk

    from samless.pipeline import Segmenter

    package = load_package(tiny_package)
    half = load_package(save_package(package.build_torch_model(), package.card, tmp_path / "half", half=True))
    assert half.card.weights_dtype == "float16"
    assert len(half.files[WEIGHTS_NAME]) < 0.6 * len(package.files[WEIGHTS_NAME])
    by_torch = Segmenter.from_package(half, backend="torch", device="cpu").segment([head[1]])
    by_onnx = Segmenter.from_package(half, backend="onnx").segment([head[1]])
    assert abs(sitk.GetArrayFromImage(by_torch.probability) - sitk.GetArrayFromImage(by_onnx.probability)).max() < 1e-4
