"""Export to a model package, the mean of runs, and the provenance chain they record."""

from __future__ import annotations

import json
import shutil

import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from conftest import small_config
from samless.cli import main
from samless.errors import SamlessError
from samless.package import load_package
from samless.pipeline import Segmenter
from samless.training.checkpoint import load_checkpoint_info, save_checkpoint
from samless.training.export import training_runs
from samless.training.train import train


def test_export_then_segment_round_trip(phase2_run, small_split, tmp_path):
    package_dir = tmp_path / "pkg"
    (tmp_path / "best.json").write_text(json.dumps({"threshold": 0.4, "min_lesion_mm3": 7.0}))  # as `samless tune`
    assert main(["export", str(phase2_run / "checkpoints" / "best"), "-o", str(package_dir),
                 "--name", "test-export", "--postprocessing", str(tmp_path / "best.json")]) == 0
    package = load_package(package_dir)
    card = package.card
    assert card.name == "test-export"
    assert card.postprocessing.to_json() == {"threshold": 0.4, "min_lesion_mm3": 7.0, "connectivity": "full"}
    phase1, phase2 = card.provenance["phases"]
    assert (phase1["phase"], phase1["run"], phase2["phase"], phase2["init"]) == (1, "phase1", 2, "phase1")
    assert "random weights" in phase1["sam_checkpoint"]
    assert card.architecture.input_size == 128
    assert "val_dice" in card.metrics["validation"]

    split = json.loads(small_split.read_text())
    flair = small_split.parent / split["test"][0]["flair"]
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(flair), "-o", str(out), "--model", str(package_dir), "--progress", "none"]) == 0
    label, image = sitk.ReadImage(str(out)), sitk.ReadImage(str(flair))
    assert label.GetSize() == image.GetSize()

    # The exported network is the trained one: same weights as the checkpoint.
    trained = load_file(str(phase2_run / "checkpoints" / "best" / "model.safetensors"))
    for name, tensor in package.state_dict().items():
        assert torch.equal(tensor, trained[name]), name


def test_export_refuses_a_phase1_checkpoint(phase1_run, tmp_path, capsys):
    assert main(["export", str(phase1_run / "checkpoints" / "last"), "-o", str(tmp_path / "pkg")]) == 1
    assert "aggregator was never trained" in capsys.readouterr().err
    assert not (tmp_path / "pkg").exists()


def test_average_of_two_runs_is_the_mean_network_and_exports_with_both_chains(phase2_run, small_split, tmp_path):
    other = tmp_path / "other"
    train(small_config(small_split, other, 2, init=str(phase2_run / "checkpoints" / "last"), seed=5, val_every=0))
    members = [phase2_run / "checkpoints" / "best", other / "checkpoints" / "best"]
    assert main(["train", "average", *map(str, members), "-o", str(tmp_path / "soup")]) == 0
    soup = tmp_path / "soup" / "checkpoints" / "best"
    a, b, mean = (load_file(str(c / "model.safetensors")) for c in (*members, soup))
    assert mean.keys() == a.keys()
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])]
    assert moved  # the second run did change the network
    for name in a:
        expected = (a[name].double() + b[name].double()) / 2 if a[name].is_floating_point() else a[name]
        assert torch.allclose(mean[name].double(), expected.double(), atol=1e-6), name

    assert main(["export", str(soup), "-o", str(tmp_path / "pkg")]) == 0
    package = load_package(tmp_path / "pkg")
    (entry,) = package.card.provenance["phases"]
    assert entry["run"] == "soup"
    assert package.card.provenance["settings"]["split"] == str(small_split)  # the members' data, no one's run
    assert [[r["run"] for r in chain] for chain in entry["average_of"]] == [["phase1", "phase2"],
                                                                            ["phase1", "phase2", "other"]]
    flair = small_split.parent / json.loads(small_split.read_text())["test"][0]["flair"]
    result = Segmenter.from_package(package, backend="torch").segment([sitk.ReadImage(str(flair))])
    assert result.label.GetSize() == sitk.ReadImage(str(flair)).GetSize()

    code = main(["train", "average", *map(str, members), "-o", str(tmp_path / "soup")])
    assert code == 1  # an existing result is not replaced without --overwrite
    assert main(["train", "average", *map(str, members), "-o", str(tmp_path / "soup"), "--overwrite"]) == 0
    # Training on from the mean must go to another folder: the first validation would replace the mean.
    before = (soup / "model.safetensors").read_bytes()
    with pytest.raises(SamlessError, match="already holds checkpoints"):
        train(small_config(small_split, tmp_path / "soup", 2, init=str(soup)))
    assert (soup / "model.safetensors").read_bytes() == before


def test_average_takes_a_model_package_beside_checkpoints(phase2_run, small_split, tmp_path):
    # A float16 package of the phase-2 run (described, with a tuned threshold) and a run fine-tuned from it.
    (tmp_path / "best.json").write_text(json.dumps({"threshold": 0.3, "min_lesion_mm3": 5.0}))
    assert main(["export", str(phase2_run / "checkpoints" / "last"), "-o", str(tmp_path / "pkg"), "--half",
                 "--description", "the package's own words", "--postprocessing", str(tmp_path / "best.json")]) == 0
    tuned = train(small_config(small_split, tmp_path / "tuned", 2, init=str(tmp_path / "pkg"), seed=5,
                               val_every=0))
    assert main(["train", "average", str(tmp_path / "pkg"), str(tuned), "-o", str(tmp_path / "soup")]) == 0
    # The mean is a new network: the package's description and tuned defaults are not carried over.
    card = load_checkpoint_info(tmp_path / "soup" / "checkpoints" / "best")["card"]
    assert "description" not in card and card["postprocessing"]["threshold"] == 0.5
    package = load_package(tmp_path / "pkg")
    a, b = package.state_dict(), load_file(str(tuned / "model.safetensors"))
    mean = load_file(str(tmp_path / "soup" / "checkpoints" / "best" / "model.safetensors"))
    for name in a:
        expected = (a[name].double() + b[name].double()) / 2 if a[name].is_floating_point() else a[name]
        assert mean[name].dtype == b[name].dtype and torch.allclose(mean[name].double(), expected.double(),
                                                                    atol=1e-6), name
    (entry,) = training_runs(tmp_path / "soup" / "checkpoints" / "best")
    package_chain, tuned_chain = entry["average_of"]
    assert [r["run"] for r in package_chain] == ["pkg"] and [r["run"] for r in tuned_chain] == ["pkg", "tuned"]
    assert package_chain[0]["weights_sha256"] == package.card.files["weights.safetensors"].sha256
    assert package_chain[0]["provenance"] == package.card.provenance
    assert main(["train", "average", str(tmp_path / "pkg"), str(tmp_path / "pkg"), "-o", str(tmp_path / "p2")]) == 1
    assert not (tmp_path / "p2").exists()  # packages alone: no split file for the export to read

def test_export_records_the_split_as_trained_even_after_the_split_file_moved(phase2_run, small_split, tmp_path):
    split = small_split.parent / "split-to-move.json"  # beside the cases, which it names relative to itself
    shutil.copy(small_split, split)
    run = train(small_config(split, tmp_path / "run", 2, init=str(phase2_run / "checkpoints" / "last"), seed=3,
                             val_every=0))
    split.rename(tmp_path / "moved.json")
    assert main(["export", str(run), "-o", str(tmp_path / "pkg")]) == 0
    recorded = load_checkpoint_info(run)["split_sha256"]
    assert recorded and load_package(tmp_path / "pkg").card.provenance["split_sha256"] == recorded
    # So the package still averages with a network trained on the same split.
    assert main(["train", "average", str(tmp_path / "pkg"), str(phase2_run / "checkpoints" / "last"), "-o",
                 str(tmp_path / "soup")]) == 0


def test_average_means_floats_keeps_step_counters_and_refuses_other_integers():
    from samless.training.average import _mean

    a = {"w": torch.tensor([1.0, 2.0]), "bn.num_batches_tracked": torch.tensor(7), "table": torch.tensor([1, 2])}
    b = {"w": torch.tensor([3.0, 6.0]), "bn.num_batches_tracked": torch.tensor(9), "table": torch.tensor([1, 2])}
    mean = _mean([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and int(mean["bn.num_batches_tracked"]) == 7
    with pytest.raises(SamlessError, match="table"):
        _mean([a, {**b, "table": torch.tensor([1, 3])}])


def _trained_apart(case, settings, message):
    """A case whose second member is a run trained apart, with `settings` (and `message` naming its fault)."""
    def build(phase1_run, phase2_run, small_split, tmp_path):
        best = str(phase2_run / "checkpoints" / "best")
        other, split = tmp_path / "other", small_split
        if case == "other split":  # the same cases, other bytes: another split file, named as such
            split = small_split.with_name(f"other-{tmp_path.name}.json")
            split.write_text(small_split.read_text().replace("\n", "\n "))
        train(small_config(split, other, 2, val_every=0, **settings))
        members = [best, str(other / "checkpoints" / "last")]
        if case == "package of another fold":
            assert main(["export", members[1], "-o", str(tmp_path / "pkg")]) == 0
            members[1] = str(tmp_path / "pkg")
        return members, message.format(best=best, other=members[1], split=split, small_split=small_split)
    return build


def _package_with_no_split(phase1_run, phase2_run, small_split, tmp_path):
    """Exported when its split file was gone: only "" recorded."""
    best = str(phase2_run / "checkpoints" / "best")
    assert main(["export", best, "-o", str(tmp_path / "pkg")]) == 0
    card = json.loads((tmp_path / "pkg" / "model.json").read_text())
    card["provenance"]["split_sha256"] = ""
    (tmp_path / "pkg" / "model.json").write_text(json.dumps(card))
    return [best, str(tmp_path / "pkg")], "does not record its split file"


def _onto_a_member(phase1_run, phase2_run, small_split, tmp_path):
    """--overwrite must not write the mean over one of its own members."""
    shutil.copytree(phase2_run / "checkpoints" / "best", tmp_path / "soup" / "checkpoints" / "best")
    return [str(tmp_path / "soup" / "checkpoints" / "best"), str(phase2_run / "checkpoints" / "best")], \
        "one of the checkpoints"


# what cannot be averaged: (phase1_run, phase2_run, small_split, tmp_path) -> (members, what the error says)
NOT_AVERAGED = {
    "one": lambda p1, p2, split, tmp: ([str(p2 / "checkpoints" / "best")], "at least two"),
    "phase1": lambda p1, p2, split, tmp: ([str(p2 / "checkpoints" / "best"), str(p1 / "checkpoints" / "last")],
                                          "phase-1 checkpoint"),
    "other network": _trained_apart("other network", dict(context_slices=1),
                                    "{other} differs from {best} in its architecture (in_channels 3 vs 1)"),
    "other planes": _trained_apart("other planes", dict(three_plane=True),
                                   "in its inputs (planes ['axial', 'coronal', 'sagittal'] vs ['axial'])"),
    "other fold": _trained_apart("other fold", dict(fold=1), "trained on another fold than {best} (fold 1 vs fold 0)"),
    "other split": _trained_apart("other split", {}, "another split file than {best} ({split} vs {small_split})"),
    "onto a member": _onto_a_member,
    "package of another fold": _trained_apart("package of another fold", dict(fold=1),
                                              "trained on another fold than {best} (fold 1 vs fold 0)"),
    "run folder": lambda p1, p2, split, tmp: (  # the run, not one of its checkpoints
        [str(p2 / "checkpoints" / "best"), str(p2)], f"give {p2 / 'checkpoints' / 'best'} or"),
    "package with no split": _package_with_no_split,
}


@pytest.mark.parametrize("case", list(NOT_AVERAGED))
def test_average_refuses_what_cannot_be_averaged(case, phase1_run, phase2_run, small_split, tmp_path, capsys):
    members, message = NOT_AVERAGED[case](phase1_run, phase2_run, small_split, tmp_path)
    before = (tmp_path / "soup").exists() and load_file(str(tmp_path / "soup" / "checkpoints" / "best" /
                                                          "model.safetensors"))
    assert main(["train", "average", *members, "-o", str(tmp_path / "soup"), "--overwrite"]) == 1
    assert message in capsys.readouterr().err
    if before:  # the member is untouched
        after = load_file(str(tmp_path / "soup" / "checkpoints" / "best" / "model.safetensors"))
        assert all(torch.equal(before[k], after[k]) for k in before)
    else:
        assert not (tmp_path / "soup").exists()


def test_provenance_follows_the_whole_init_chain(tmp_path):
    # scratch -> a -> b -> c, as `samless train phase2 --init` links runs; then a's checkpoint is deleted.
    def run(name, init, epochs, **config):
        path = tmp_path / name / "checkpoints" / "best"
        save_checkpoint(path, torch.nn.Linear(2, 2), None, phase=2, epoch=epochs - 1,
                        config={"init": str(init) if init else "", "epochs": epochs, **config})
        return path

    a = run("a", None, 36, context_slices=0)
    b = run("b", a, 48, context_slices=1, loss="dice_ce")
    c = run("c", b, 40, context_slices=1, loss="dice_ce_slice", patch_size=128, sampling="case", cpu_bf16=True)
    runs = training_runs(c)
    assert [(r["run"], r["init"], r["epochs"]) for r in runs] == [("a", "scratch", 36), ("b", "a", 48), ("c", "b", 40)]
    assert (runs[0]["patch_size"], runs[2]["patch_size"], runs[2]["loss"]) == (None, 128, "dice_ce_slice")
    assert [r["sampling"] for r in runs] == ["slice", "slice", "case"]  # older configs lack it: they drew by slice
    assert [r["loss"] for r in runs] == ["dice_ce", "dice_ce", "dice_ce_slice"]  # a's predates --loss
    assert [r["cpu_bf16"] for r in runs] == [False, False, True]
    moved = tmp_path / "kept" / "final"  # a checkpoint copied out of its run folder keeps a useful name
    shutil.copytree(c, moved)
    assert [r["run"] for r in training_runs(moved)] == ["a", "b", "final"]

    looped = run("looped", None, 3)  # a checkpoint overwritten by a run it started: a cycle
    save_checkpoint(looped, torch.nn.Linear(2, 2), None, phase=2, epoch=2, config={"init": str(looped), "epochs": 3})
    assert "appears twice" in training_runs(looped)[0]["note"]

    shutil.rmtree(tmp_path / "a")
    runs = training_runs(c)
    assert [r["run"] for r in runs] == ["a", "b", "c"]
    assert "no longer on disk" in runs[0]["note"]
