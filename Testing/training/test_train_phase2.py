"""Phase 2 without SAM: losses, sampling, patches, soft labels, initialisation, 2.5D and three-plane
training, mixed precision."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from safetensors.torch import load_file
from training_helpers import checkpoint_network, misaligned, run_cli, split_variant, train_until_power_cut, yaml_config

from conftest import small_config
from samless.cli import main
from samless.errors import SamlessError
from samless.package import MODEL_PATH_ENV, PLANES, load_package
from samless.pipeline import Segmenter, SegmentOptions
from samless.preprocess import prepare, to_slices
from samless.training.checkpoint import load_checkpoint_info
from samless.training.data import AugmentConfig, PreparedCase, SliceDataset, crop, epoch_plan, patch_origin
from samless.training.split import split_cases
from samless.training.train import TrainConfig, Trainer, autocast_settings, make_loss, train


def test_phase2_runs_without_segment_anything(small_split, phase1_run, tmp_path):
    out = tmp_path / "p2"
    init = phase1_run / "checkpoints" / "last"
    proc = run_cli("train", "phase2", "--split", small_split, "--out", out, "--init", init,
                   "--epochs", 1, "--samples-per-epoch", 8, "--batch-size", 4, "--workers", 0, "--device", "cpu",
                   "--val-max-cases", 1, "--config", yaml_config(tmp_path, input_size=128, embed_size=64),
                   "--loss", "dice_ce_slice",
                   prelude="import sys; sys.modules['segment_anything'] = None  # importing it now fails")
    assert proc.returncode == 0, proc.stderr
    assert (out / "checkpoints" / "best" / "model.safetensors").exists()
    log = (out / "log.csv").read_text().splitlines()
    assert len(log) == 2 and "val_dice" in log[0]
    assert yaml.safe_load((out / "config.yaml").read_text())["loss"] == "dice_ce_slice"


@pytest.mark.parametrize("phase", [1, 2])
def test_per_slice_dice_weighs_a_missed_small_lesion_like_a_missed_large_one(phase):
    # Slice 0: a large lesion found exactly; slice 1: a small lesion missed entirely.
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, 0, 4:20, 4:20] = 1
    mask[1, 0, 10:12, 10:12] = 1
    found = torch.where(mask[:1] > 0, 8.0, -8.0)
    missed = torch.full((1, 1, 32, 32), -8.0)
    lesion_logit = torch.cat([found, missed])
    pred = lesion_logit if phase == 1 else torch.cat([-lesion_logit, lesion_logit], dim=1)
    batch, per_slice = (float(make_loss(phase, kind)(pred, mask)) for kind in ("dice_ce", "dice_ce_slice"))
    # Pooled over the batch the 4 missed pixels barely move Dice; per slice they cost most of that slice's.
    assert batch < 0.05 and per_slice > 0.35


def test_lesion_weights_give_each_lesion_its_own_weight_by_size():
    from samless.training.train import lesion_weights

    mask = torch.zeros(2, 1, 32, 32)
    mask[0, 0, 2:22, 2:22] = 1  # 400 px: weight 1 (at most as large as the reference)
    mask[0, 0, 28:30, 28:30] = 1  # 4 px beside it: sqrt(100 / 4) = 5
    mask[1, 0, 5, 5] = 1  # 1 px: sqrt(100) = 10, the cap
    w = lesion_weights(mask)
    assert w.shape == mask.shape and float(w[0, 0, 0, 0]) == 1.0 and float(w[0, 0, 10, 10]) == 1.0
    assert float(w[0, 0, 29, 29]) == pytest.approx(5.0) and float(w[1, 0, 5, 5]) == pytest.approx(10.0)
    assert float(w[1, 0, 6, 6]) == 1.0


@pytest.mark.parametrize("phase", [1, 2])
def test_the_lesion_loss_charges_a_missed_small_lesion_more_than_the_slice_loss(phase):
    mask = torch.zeros(1, 1, 32, 32)
    mask[0, 0, 4:20, 4:20] = 1
    mask[0, 0, 26:28, 26:28] = 1
    found_big_only = torch.where((mask > 0) & (torch.arange(32) < 22), 8.0, -8.0)
    found_all = torch.where(mask > 0, 8.0, -8.0)

    def loss(kind, logit):
        pred = logit if phase == 1 else torch.cat([-logit, logit], dim=1)
        return float(make_loss(phase, kind)(pred, mask))

    # Found everything: the same small loss either way; the missed 4 px cost more once weighted per lesion.
    assert loss("dice_ce_lesion", found_all) == pytest.approx(loss("dice_ce_slice", found_all), abs=1e-3)
    slice_extra = loss("dice_ce_slice", found_big_only) - loss("dice_ce_slice", found_all)
    lesion_extra = loss("dice_ce_lesion", found_big_only) - loss("dice_ce_lesion", found_all)
    assert lesion_extra > 1.5 * slice_extra > 0


@pytest.mark.parametrize("kind", ["dice_ce", "dice_ce_slice"])
def test_phase2_loss_of_a_0_1_mask_is_monai_dice_ce_of_its_one_hot(kind):
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    logits, mask = torch.randn(3, 2, 16, 16), (torch.rand(3, 1, 16, 16) > 0.7).float()
    per_slice = kind == "dice_ce_slice"
    reference = DiceCELoss(softmax=True, to_onehot_y=True, include_background=not per_slice, batch=not per_slice,
                           smooth_nr=1.0 if per_slice else 1e-5, smooth_dr=1.0 if per_slice else 1e-5)
    assert float(make_loss(2, kind)(logits, mask)) == pytest.approx(float(reference(logits, mask)), abs=1e-6)


@pytest.mark.parametrize("phase, kind", [(1, "dice_ce_slice"), (2, "dice_ce_slice"), (2, "dice_ce")])
def test_soft_labels_give_cross_entropy_the_fraction_and_dice_its_half_or_more(phase, kind):
    from monai.losses import DiceLoss

    torch.manual_seed(0)
    logits = torch.randn(3, 2 if phase == 2 else 1, 16, 16)
    fraction = torch.rand(3, 1, 16, 16) * (torch.rand(3, 1, 16, 16) > 0.5)  # lesion shares 0..1, half of them 0
    hard = (fraction >= 0.5).float()
    per_slice = kind == "dice_ce_slice"
    options = dict(batch=not per_slice, smooth_nr=1.0 if per_slice else 1e-5, smooth_dr=1.0 if per_slice else 1e-5)
    if phase == 2:
        dice = DiceLoss(softmax=True, include_background=not per_slice, **options)
        expected = dice(logits, torch.cat([1 - hard, hard], 1)) + torch.nn.functional.cross_entropy(
            logits, torch.cat([1 - fraction, fraction], 1))
    else:
        dice = DiceLoss(sigmoid=True, **options)
        expected = dice(logits, hard) + torch.nn.functional.binary_cross_entropy_with_logits(logits, fraction)
    loss = make_loss(phase, kind)(logits, fraction)
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)
    assert float(loss) != pytest.approx(float(make_loss(phase, kind)(logits, hard)), abs=1e-3)


def test_an_unknown_loss_is_refused(small_split, tmp_path, capsys):
    code = main(["train", "phase2", "--split", str(small_split), "--out", str(tmp_path / "run"), "--loss", "focal"])
    err = capsys.readouterr().err
    assert code == 1 and "loss must be one of dice_ce, dice_ce_slice, dice_ce_lesion, not 'focal'" in err
    assert not (tmp_path / "run").exists()


def _slices_only(n_slices: int, lesion_slices: range) -> PreparedCase:
    """A case as epoch_plan sees it: only its slice counts matter."""
    positive = np.array(list(lesion_slices), dtype=np.int64)
    negative = np.setdiff1d(np.arange(n_slices), positive)
    return PreparedCase("c", np.zeros(0), np.zeros(0), positive, negative, (0, 0))


def test_case_sampling_weighs_a_thick_slice_scan_like_an_isotropic_one():
    # a 180-slice isotropic scan, a 40-slice thick-slice scan, a lesion-free 40-slice scan
    cases = [_slices_only(180, range(20, 120)), _slices_only(40, range(10, 20)), _slices_only(40, range(0))]
    by_case = epoch_plan(cases, 6000, 0.5, seed=3, epoch=1, sampling="case")
    by_slice = epoch_plan(cases, 6000, 0.5, seed=3, epoch=1, sampling="slice")
    for plan in (by_case, by_slice):  # lesion slices are drawn half the time, and only where there are lesions
        holds_lesion = np.array([s in cases[c].positive for c, s, _ in plan])
        assert abs(holds_lesion.mean() - 0.5) < 0.03
        assert not np.any(plan[:, 0][holds_lesion] == 2)
    lesion_rows = by_case[np.array([s in cases[c].positive for c, s, _ in by_case])]
    share = np.bincount(lesion_rows[:, 0], minlength=3) / len(lesion_rows)
    assert abs(share[0] - 0.5) < 0.04 and abs(share[1] - 0.5) < 0.04  # each lesion-holding case alike
    lesion_rows = by_slice[np.array([s in cases[c].positive for c, s, _ in by_slice])]
    share = np.bincount(lesion_rows[:, 0], minlength=3) / len(lesion_rows)
    assert abs(share[0] - 100 / 110) < 0.03  # by slice: the isotropic scan's 100 lesion slices outnumber 10
    assert np.array_equal(by_case, epoch_plan(cases, 6000, 0.5, seed=3, epoch=1, sampling="case"))  # seeded
    assert len({int(s) for c, s, _ in by_case if c == 0}) > 100  # every slice of a case can come up


def test_on_off_flags_override_a_config_either_way(small_split, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("samless.training.train.train",
                        lambda config, resume=False, stop_after=None: seen.append(config) or "best")
    base = ["train", "phase2", "--split", str(small_split), "--out", str(tmp_path / "run")]
    assert main(base) == 0  # the defaults
    on = yaml_config(tmp_path, cpu_bf16="true", three_plane="true", soft_labels="true", amp="false",
               finetune_learner="false", augment="{'off': 1, 'affine': 0.5}")
    assert main([*base, "--config", on]) == 0  # the config's settings stand where no flag is given
    assert main([*base, "--config", on, "--no-cpu-bf16", "--no-three-plane", "--no-soft-labels", "--amp",
                 "--no-freeze-learner", "--augment"]) == 0
    assert main([*base, "--cpu-bf16", "--three-plane", "--no-amp", "--freeze-learner", "--no-augment"]) == 0
    hand_written = yaml_config(tmp_path, augment="{off: 1, affine: 0.25}")  # YAML 1.1 reads a bare `off` as false
    assert main([*base, "--config", hand_written]) == 0
    assert main([*base, "--config", hand_written, "--no-augment"]) == 0
    default, configured, undone, flagged, bare, bare_off = (
        (c.cpu_bf16, c.three_plane, c.soft_labels, c.amp, c.finetune_learner, c.augment) for c in seen)
    assert default == (False, False, False, True, True, {})
    assert configured == (True, True, True, False, False, {"off": 1, "affine": 0.5})
    assert undone == (False, False, False, True, True, {"affine": 0.5})  # --augment keeps the config's settings
    assert flagged == (True, True, False, False, False, {"off": 1})
    assert bare[-1] == bare_off[-1] == {"off": 1, "affine": 0.25}  # --no-augment keeps them too
    assert seen[-1].augment_config() is None


def test_an_unknown_sampling_is_refused(small_split, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", "phase2", "--split", str(small_split), "--out", str(tmp_path / "run"), "--sampling", "x"])
    assert exited.value.code == 2 and "invalid choice: 'x'" in capsys.readouterr().err
    with pytest.raises(SamlessError, match="sampling must be one of case, slice, not 'lesion'"):
        TrainConfig(phase=2, split=str(small_split), out=str(tmp_path / "run"), sampling="lesion")
    assert not (tmp_path / "run").exists()


def test_a_config_from_before_the_sampling_setting_repeats_its_run(small_split, tmp_path):
    old = tmp_path / "config.yaml"
    old.write_text(yaml.safe_dump({"phase": 2, "split": str(small_split), "out": str(tmp_path / "run")}))
    assert TrainConfig.load(old).sampling == "slice"
    assert TrainConfig.load(old, sampling="case").sampling == "case"  # a flag still overrides it
    new = TrainConfig(phase=2, split=str(small_split), out=str(tmp_path / "run"))
    assert new.sampling == "case"
    old.write_text(yaml.safe_dump(dataclasses.asdict(new)))
    assert TrainConfig.load(old).sampling == "case"  # a current run's config.yaml names its own


def test_a_lesion_slice_patch_holds_one_of_its_lesion_pixels():
    rng = np.random.default_rng(0)
    mask = np.zeros((300, 300), np.uint8)
    mask[250:253, 20:23] = 1  # near the window's corner: the patch must still reach it

    def inside(top: int, left: int) -> bool:  # within the 256 px window at (10, 5)
        return 10 <= top <= 10 + 128 and 5 <= left <= 5 + 128

    for _ in range(100):
        top, left = patch_origin(mask, 10, 5, 256, 128, rng)
        assert inside(top, left) and crop(mask.astype(np.float32), top, left, 128).sum() > 0
    origins = {patch_origin(np.zeros_like(mask), 10, 5, 256, 128, rng) for _ in range(50)}
    assert len(origins) > 10 and all(inside(*o) for o in origins)


def test_patch_training_feeds_patches_and_the_network_still_segments_whole_slices(small_split, tmp_path):
    out = tmp_path / "patch"
    config = small_config(small_split, out, 2, embed_size=32, patch_size=64, epochs=1, val_every=1,
                          pos_fraction=1.0)
    trainer = Trainer(config)
    trainer.load_data()
    batch = next(iter(trainer.loader(0)))
    assert batch["image"].shape[-2:] == (64, 64) and batch["mask"].shape[-2:] == (64, 64)
    assert all(m.sum() > 0 for m in batch["mask"])  # lesion slices' patches keep their lesion
    train(config)
    assert yaml.safe_load((out / "config.yaml").read_text())["patch_size"] == 64
    package_dir = tmp_path / "pkg"
    assert main(["export", str(out / "checkpoints" / "best"), "-o", str(package_dir), "--name", "patch"]) == 0
    assert load_package(package_dir).card.architecture.input_size == 128  # inference: whole windows
    flair = small_split.parent / json.loads(small_split.read_text())["test"][0]["flair"]
    seg = tmp_path / "seg.nii.gz"
    assert main(["segment", str(flair), "-o", str(seg), "--model", str(package_dir), "--progress", "none"]) == 0
    assert sitk.ReadImage(str(seg)).GetSize() == sitk.ReadImage(str(flair)).GetSize()


def _with_soft_masks(small_split, tmp_path, fraction=0.75):
    """small_split's cases with a soft mask each: `fraction` inside the lesion, a third of it on a
    one-voxel rim around it (partial volume), 0 elsewhere."""
    def edit(split):
        for sample in [s for k, v in split.items() if k.startswith("fold") for s in v["train"] + v["val"]]:
            mask = sitk.ReadImage(sample["mask"]) > 0
            rim = sitk.BinaryDilate(mask, [1, 1, 1]) - mask
            soft = sitk.Cast(mask, sitk.sitkFloat32) * fraction + sitk.Cast(rim, sitk.sitkFloat32) * (fraction / 3)
            path = tmp_path / f"soft_{os.path.basename(os.path.dirname(sample['mask']))}.nii.gz"
            sitk.WriteImage(soft, str(path))
            sample["soft_mask"] = str(path)
    return split_variant(small_split, tmp_path, edit)


def test_soft_labels_train_towards_the_partial_volume_fraction(small_split, tmp_path):
    split = _with_soft_masks(small_split, tmp_path)
    out = tmp_path / "soft"
    config = small_config(split, out, 2, embed_size=32, epochs=1, val_every=1, pos_fraction=1.0, soft_labels=True,
                          augment={"off": 1})
    trainer = Trainer(config)
    trainer.load_data()
    batch = next(iter(trainer.loader(0)))
    soft = batch["mask"]  # the soft mask's values, resampled (linearly) from 0.9 x 1.1 mm to 1 mm pixels
    assert 0.74 <= float(soft.max()) <= 0.75 + 1e-6 and float(soft.min()) == 0
    assert ((soft > 0.05) & (soft < 0.7)).sum() > 0.2 * (soft >= 0.7).sum()  # partial volume at the borders
    hard = Trainer(dataclasses.replace(config, soft_labels=False, out=str(tmp_path / "hard")))
    hard.load_data()  # the same samples with their 0/1 masks
    hard_mask = next(iter(hard.loader(0)))["mask"]
    assert set(torch.unique(hard_mask).tolist()) == {0.0, 1.0}
    # Resampled alike, mask >= 0.5 where the soft mask (0.75 inside, 0.25 on the rim) is > 0.55, and only
    # where it is >= 0.375.
    assert bool((hard_mask[soft > 0.55] == 1).all()) and bool((soft[hard_mask == 1] >= 0.375 - 1e-6).all())
    with torch.no_grad():
        assert float(trainer.loss(batch)) != pytest.approx(float(hard.loss({**batch, "mask": hard_mask})))
    train(config)
    assert yaml.safe_load((out / "config.yaml").read_text())["soft_labels"] is True
    info = load_checkpoint_info(out / "checkpoints" / "best")
    assert info["config"]["soft_labels"] and 0 <= info["best"] <= 1  # validated on the 0/1 masks


def _soft_damage(damage: str, small_split, tmp_path) -> str:
    if damage == "none named":
        return str(small_split)
    if damage == "out of range":
        return str(_with_soft_masks(small_split, tmp_path, fraction=2.0))
    split_path = _with_soft_masks(small_split, tmp_path)
    split = json.loads(split_path.read_text())
    sample = split["fold0"]["train"][-1]
    if damage == "missing":
        sample["soft_mask"] = str(tmp_path / "nowhere.nii.gz")
    else:  # misaligned
        misaligned(tmp_path, "soft_mask")(split)
    split_path.write_text(json.dumps(split))
    return str(split_path)


@pytest.mark.parametrize("damage, message", [
    ("none named", "name none"),
    ("out of range", "holds values 0..2; a soft mask is a lesion fraction from 0 to 1"),
    ("missing", "nowhere.nii.gz does not exist"),
    ("misaligned", "soft mask shifted.nii.gz and its mask differ in origin"),
])
def test_soft_labels_need_a_sound_soft_mask_for_every_training_case(small_split, tmp_path, capsys, damage, message):
    split = _soft_damage(damage, small_split, tmp_path)
    args = ["train", "phase2", "--split", split, "--out", str(tmp_path / "run"), "--epochs", "1", "--device", "cpu",
            "--workers", "0", "--samples-per-epoch", "4", "--batch-size", "2", "--val-every", "0",
            "--config", yaml_config(tmp_path, input_size=64, embed_size=16)]
    assert main([*args, "--soft-labels"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "case" in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training
    # Without --soft-labels the soft masks are not used, so they may be absent or wrong.
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0


def test_soft_targets_are_interpolated_by_every_augmentation():
    soft = np.zeros((3, 96, 96), np.uint8)
    soft[1, 30:60, 30:60] = 64  # a lesion at 0.25 inside a rim ...
    soft[1, 36:54, 36:54] = 191  # ... around a core at 0.75
    mask = (soft >= 128).astype(np.uint8)
    case = PreparedCase("c", np.zeros((1, 3, 96, 96), np.float32), mask, np.array([1]), np.array([0, 2]), (0, 0),
                        soft)
    aug = AugmentConfig(flip=0.5, rot90=0.5, affine=1.0, intensity=0.0)
    plan = np.array([(0, 1, seed) for seed in range(8)])
    levels = {0.0, 64 / 255, 191 / 255}
    for soft_labels in (True, False):
        data = SliceDataset([case], plan, 64, aug, jitter=0, patch=32, soft_labels=soft_labels)
        targets = np.stack([data[i]["mask"][0].numpy() for i in range(len(data))])
        values = set(np.unique(targets).tolist())
        if soft_labels:  # fractions, resampled linearly by the affine: more values than the three given
            assert 0.7 < targets.max() <= 191 / 255 + 1e-6 and targets.min() == 0 and len(values - levels) > 10
        else:
            assert values == {0.0, 1.0}


@pytest.mark.parametrize("settings, message", [
    (dict(phase=1, patch_size=64), "patch_size is for phase 2 only"),
    (dict(phase=2, patch_size=80), "patch_size must be a multiple of 32 below the input size (128)"),
    (dict(phase=2, patch_size=128), "got 128"),
    (dict(phase=2, patch_size=64, embed_size=64), "stride 2"),  # the learner would resize to a fixed grid
])
def test_bad_patch_sizes_are_refused(small_split, tmp_path, settings, message):
    phase = settings.pop("phase")
    with pytest.raises(SamlessError, match=re.escape(message)):
        small_config(small_split, tmp_path / "run", phase, **settings)


def test_init_from_phase1_takes_the_learner_and_from_phase2_the_whole_network(phase1_run, phase2_run,
                                                                             small_split, tmp_path):
    def start(init) -> dict[str, torch.Tensor]:
        return Trainer(small_config(small_split, tmp_path / "run", 2, init=str(init / "checkpoints" / "last"),
                                    seed=5)
                       ).net.state_dict()

    def saved(run) -> dict[str, torch.Tensor]:
        return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))

    from_phase1, phase1 = start(phase1_run), saved(phase1_run)
    from_phase2, phase2 = start(phase2_run), saved(phase2_run)
    learner = [k for k in phase2 if k.startswith("learner.")]
    aggregator = [k for k in phase2 if k.startswith("aggregator.") and phase2[k].is_floating_point()]
    assert learner and aggregator
    assert all(torch.equal(from_phase1[k], phase1[k]) for k in learner)
    # Phase 1 never trained the aggregator: it starts fresh (seed 5), not as phase 1 left it (seed 0).
    assert not all(torch.equal(from_phase1[k], phase1[k]) for k in aggregator)
    assert all(torch.equal(from_phase2[k], phase2[k]) for k in learner + aggregator)
    with pytest.raises(SamlessError, match="same --model"):
        Trainer(small_config(small_split, tmp_path / "other", 2, init=str(phase2_run / "checkpoints" / "last"),
                             model="hardnet68_512"))


def test_init_from_a_model_package_fine_tunes_its_network(phase2_run, small_split, tmp_path, monkeypatch):
    # A float16 package of the phase-2 run, found by name as a bundled model is.
    shelf = tmp_path / "shelf"
    assert main(["export", str(phase2_run / "checkpoints" / "last"), "-o", str(shelf / "pkg"), "--half"]) == 0
    package = load_package(shelf / "pkg")
    monkeypatch.setenv(MODEL_PATH_ENV, str(shelf))
    config = small_config(small_split, tmp_path / "ft", 2, init="pkg", seed=5, epochs=2)
    start = Trainer(config).net.state_dict()
    weights = package.state_dict()
    assert weights and all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    for key, value in weights.items():  # exactly the package's network, in float32 for training
        assert start[key].dtype == (torch.float32 if value.is_floating_point() else value.dtype)
        assert torch.equal(start[key], value.to(start[key].dtype)), key

    # The run stops after its first epoch; the package is then deleted, and resuming neither needs it
    # (the weights come from the run's checkpoint) nor forgets it.
    train_until_power_cut(config, monkeypatch)
    shutil.rmtree(shelf / "pkg")
    best = train(config, resume=True)
    assert load_checkpoint_info(tmp_path / "ft" / "checkpoints" / "last")["epoch"] == 1

    # The fine-tuned network's card lists the package, its weights' sha256 and the package's own history.
    assert main(["export", str(best), "-o", str(tmp_path / "ft-pkg")]) == 0
    phases = load_package(tmp_path / "ft-pkg").card.provenance["phases"]
    assert [p["run"] for p in phases] == ["pkg", "ft"] and phases[1]["init"] == "pkg"
    assert phases[0]["package"] == "phase2" and phases[0]["source"] == str(shelf / "pkg")
    assert phases[0]["weights_sha256"] == package.card.files["weights.safetensors"].sha256
    assert phases[0]["provenance"] == package.card.provenance


@pytest.mark.parametrize("damage, message", [
    ("tamper", "does not match its sha256"),
    ("normalization", "normalization"),
    ("onnx_only", "no weights.safetensors"),
    ("context_slices", "pass --context-slices 1"),
    ("network", "is another network: decoder_channels 32 (this run 64)"),
])
def test_init_refuses_a_package_it_cannot_fine_tune(phase2_run, small_split, tmp_path, damage, message):
    folder = tmp_path / "pkg"
    assert main(["export", str(phase2_run / "checkpoints" / "last"), "-o", str(folder)]) == 0
    card = json.loads((folder / "model.json").read_text())
    if damage == "tamper":
        weights = bytearray((folder / "weights.safetensors").read_bytes())
        weights[-1] ^= 1
        (folder / "weights.safetensors").write_bytes(bytes(weights))
    elif damage == "normalization":  # fed other intensities than this run would feed it
        card["normalization"]["upper_percentile"] = 99.0
    elif damage == "context_slices":  # a 2.5D package cannot start a single-slice run
        card["inputs"]["context_slices"], card["architecture"]["in_channels"] = 1, 3
    elif damage == "network":
        card["architecture"]["decoder_channels"] = 32
    else:
        del card["files"]["weights.safetensors"]
        (folder / "weights.safetensors").unlink()
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(SamlessError, match=re.escape(message)):
        Trainer(small_config(small_split, tmp_path / "ft", 2, init=str(folder)))
    assert not (tmp_path / "ft" / "checkpoints").exists()


@pytest.mark.parametrize("aggregator", ["conv_upsample", "conv_upsample_detail"])
def test_context_slices_train_export_and_segment_as_2_5d(phase2_run, small_split, tmp_path, aggregator):
    # The single-slice ConvUpsample run starts either network: widened, and with a detail branch added.
    config = small_config(small_split, tmp_path / "run25", 2, context_slices=1, augment={"off": 1}, seed=3,
                          init=str(phase2_run / "checkpoints" / "last"), aggregator=aggregator)
    trainer = Trainer(config)
    trainer.load_data()
    batch = next(iter(trainer.loader(0)))
    assert batch["image"].shape[1:] == (3, 128, 128) and batch["sam_image"].shape[1:] == (1, 128, 128)
    for i in range(len(batch["image"])):  # channels: slice k-1, k, k+1 (no augmentation: the plain window)
        case = trainer.train_data[int(batch["case"][i])]
        k, n = int(batch["slice"][i]), case.channels.shape[1]
        for channel, neighbour in enumerate((max(k - 1, 0), k, min(k + 1, n - 1))):
            expected = crop(np.asarray(case.channels[0, neighbour]), *case.window, 128)
            np.testing.assert_array_equal(batch["image"][i, channel].numpy(), expected)
        np.testing.assert_array_equal(batch["sam_image"][i, 0].numpy(), batch["image"][i, 1].numpy())

    # Widened from the single-slice run, the network starts as exactly that network on the centre slice.
    single = checkpoint_network(phase2_run)
    x = batch["image"]
    with torch.no_grad():
        assert torch.allclose(trainer.net.eval()(x), single(x[:, 1:2]), atol=1e-6)

    best = train(config)
    if aggregator == "conv_upsample_detail":  # weights the plain aggregator has no place for: refused
        with pytest.raises(SamlessError, match="same --model"):
            Trainer(small_config(small_split, tmp_path / "back", 2, context_slices=1, init=str(best)))
    package_dir = tmp_path / "pkg25"
    assert main(["export", str(best), "-o", str(package_dir)]) == 0
    package = load_package(package_dir)
    assert package.card.inputs.context_slices == 1 and package.card.architecture.in_channels == 3
    flair = sitk.ReadImage(str(split_cases(small_split, "test", ["FLAIR"])[0].images[0]))
    by_torch = Segmenter.from_package(package, backend="torch", device="cpu").segment([flair])
    by_onnx = Segmenter.from_package(package, backend="onnx").segment([flair])
    p_torch, p_onnx = (sitk.GetArrayFromImage(r.probability) for r in (by_torch, by_onnx))
    assert p_torch.std() > 0
    np.testing.assert_allclose(p_torch, p_onnx, atol=1e-4)


def test_three_plane_training_draws_every_plane_and_its_package_fuses_them(phase2_run, small_split, tmp_path):
    config = small_config(small_split, tmp_path / "run3p", 2, three_plane=True, augment={"off": 1},
                          init=str(phase2_run / "checkpoints" / "last"))
    trainer = Trainer(config)
    trainer.load_data()
    cases = split_cases(small_split, "train", ["FLAIR"])
    assert [d.id for d in trainer.train_data] == [f"{c.id}:{p}" for c in cases for p in PLANES]
    # Each plane's slices are those of the isotropic volume that `samless segment` fuses over.
    prepared = prepare([sitk.ReadImage(str(cases[0].images[0]))], trainer.card, isotropic=True)
    assert len(set(prepared.grid.GetSpacing())) == 1
    for data, plane in zip(trainer.train_data, PLANES):
        np.testing.assert_array_equal(data.channels, to_slices(prepared.channels, plane))
    drawn = epoch_plan(trainer.train_data, 60, 0.5, seed=0, epoch=0)[:, 0]
    assert {trainer.train_data[i].id.split(":")[1] for i in drawn} == set(PLANES)
    # The cache holds each case's volume once; the three planes are views of it.
    cached = sorted(p.name for p in (tmp_path / "run3p" / "cache").iterdir())
    assert len(cached) == len(cases) and all(name.startswith(c.id + "-") for name, c in zip(cached, cases))
    again = Trainer(config)
    again.load_data()  # read back from the cache: the same slices
    for data, cached_data in zip(trainer.train_data, again.train_data):
        np.testing.assert_array_equal(cached_data.channels, data.channels)
        assert (cached_data.id, cached_data.window) == (data.id, data.window)

    package_dir = tmp_path / "pkg3p"
    assert main(["export", str(train(config)), "-o", str(package_dir)]) == 0
    package = load_package(package_dir)
    assert list(package.card.inputs.planes) == list(PLANES)
    assert package.card.schema_version == 2  # samless versions from before fusion refuse it
    assert package.card.provenance["phases"][-1]["three_plane"] is True
    flair_path = split_cases(small_split, "test", ["FLAIR"])[0].images[0]
    segmenter = Segmenter.from_package(package, backend="torch", device="cpu")
    by_default, fused, axial = (segmenter.segment([sitk.ReadImage(str(flair_path))], SegmentOptions(three_plane=f))
                                for f in (None, True, False))
    p_default, p_fused, p_axial = (sitk.GetArrayFromImage(r.probability) for r in (by_default, fused, axial))
    np.testing.assert_array_equal(p_default, p_fused)  # a three-plane model fuses unless told not to
    assert np.abs(p_fused - p_axial).max() > 1e-3
    out = tmp_path / "axial.nii.gz"
    assert main(["segment", str(flair_path), "-o", str(out), "--model", str(package_dir), "--backend", "torch",
                 "--no-three-plane", "--prob", "--progress", "none"]) == 0
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "axial_prob.nii.gz"))),
                               p_axial, atol=1e-6)

def test_mixed_precision_follows_the_device():
    def settings(device, **flags):
        return autocast_settings(TrainConfig(phase=2, split="s.json", out="run", **flags), device)

    assert settings("cuda:0") == {"device_type": "cuda", "dtype": torch.float16, "enabled": True}
    assert not settings("cuda:0", amp=False)["enabled"]
    assert settings("cpu", cpu_bf16=True) == {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": True}
    assert not settings("cpu")["enabled"]  # full precision on a CPU unless asked
    assert not settings("mps", cpu_bf16=True)["enabled"]
    with pytest.raises(SamlessError, match="cpu_bf16 is for phase 2"):
        TrainConfig(phase=1, split="s.json", out="run", cpu_bf16=True)  # SAM's embeddings stay float32


def _conv_output_dtypes(args: list) -> set:
    """Train in this process with `args` and collect the dtypes convolutions put out in training steps."""
    seen = set()

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d) and module.training:
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        assert main(args) == 0
    finally:
        handle.remove()
    return seen


def test_cpu_bf16_trains_in_bfloat16_and_keeps_float32_weights(small_split, tmp_path):
    def args(out, *extra):
        return ["train", "phase2", "--split", str(small_split), "--out", str(out), "--epochs", "1",
                "--samples-per-epoch", "8", "--batch-size", "4", "--workers", "0", "--device", "cpu",
                "--val-max-cases", "1", "--config", yaml_config(tmp_path, input_size=128, embed_size=64), *extra]

    assert _conv_output_dtypes(args(tmp_path / "full")) == {torch.float32}
    assert _conv_output_dtypes(args(tmp_path / "bf16", "--cpu-bf16")) == {torch.bfloat16}
    run = tmp_path / "bf16"
    assert yaml.safe_load((run / "config.yaml").read_text())["cpu_bf16"] is True
    weights = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float32}
    log = (run / "log.csv").read_text().splitlines()
    assert np.isfinite(float(log[1].split(",")[log[0].split(",").index("train_loss")]))
