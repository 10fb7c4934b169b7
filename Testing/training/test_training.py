"""Training with the real segment_anything classes at random weights (small configs), end to end."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from safetensors.torch import load_file

from conftest import synthetic_head
from samless.cli import main
from samless.errors import SamlessError
from samless.package import MODEL_PATH_ENV, PLANES, load_package
from samless.pipeline import Segmenter, SegmentOptions
from samless.preprocess import prepare, to_slices
from samless.training.checkpoint import load_checkpoint_info, save_checkpoint
from samless.training.data import AugmentConfig, PreparedCase, SliceDataset, crop, epoch_plan, patch_origin
from samless.training.export import training_runs
from samless.training.split import split_cases
from samless.training.train import TrainConfig, Trainer, autocast_settings, make_loss, train


def small_config(split, out, phase: int, **overrides) -> TrainConfig:
    settings = dict(phase=phase, split=str(split), out=str(out), input_size=128, embed_size=64, epochs=1,
                    samples_per_epoch=8, batch_size=4, workers=0, device="cpu", val_max_cases=1,
                    sam_type="vit_tiny", seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def train_until_power_cut(config: TrainConfig, monkeypatch) -> None:
    """Run `config` and kill it in epoch 1, after epoch 0's checkpoint was written."""
    real_epoch = Trainer.train_epoch

    def crash_in_epoch_1(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt("power cut")
        return real_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", crash_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(Trainer, "train_epoch", real_epoch)


def run_cli(*args, prelude: str = "") -> subprocess.CompletedProcess:
    """`samless ...` in a fresh interpreter (optionally after `prelude`, e.g. blocking an import)."""
    script = f"{prelude}\nimport sys\nfrom samless.cli import main\nsys.exit(main({[str(a) for a in args]!r}))"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)


def train_steps(trainer: Trainer, batch: dict, steps: int) -> list[float]:
    """`steps` optimizer steps of `trainer` on one batch; the loss before each."""
    losses = []
    for _ in range(steps):
        loss = trainer.loss(batch)
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def count_encoder_calls(trainer: Trainer) -> list[int]:
    """The batch size of each run of SAM's image encoder from now on (the cache should spare it)."""
    calls, encode = [], trainer.teacher.encode
    trainer.teacher.encode = lambda x: calls.append(len(x)) or encode(x)
    return calls


@pytest.fixture(scope="module")
def phase1_run(small_split, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "phase1"
    train(small_config(small_split, out, 1, val_every=0))
    return out


@pytest.fixture(scope="module")
def phase2_run(small_split, phase1_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "phase2"
    train(small_config(small_split, out, 2, init=str(phase1_run / "checkpoints" / "last"), epochs=2))
    return out


def test_phase1_trains_only_the_learner_and_its_loss_falls(small_split, tmp_path):
    # The embedding cache runs SAM's encoder once; the decoder and the learner run every step.
    trainer = Trainer(small_config(small_split, tmp_path / "run", 1, optimizer="adamw", lr=1e-2, augment={"off": 1},
                                   embedding_cache=str(tmp_path / "emb"), batch_size=2))
    trainer.load_data()
    batch = next(iter(trainer.loader(0)))
    assert batch["mask"].sum() > 0  # lesion slices are in the batch
    sam_before = copy.deepcopy(trainer.teacher.state_dict())
    learner_before = copy.deepcopy(trainer.net.learner.state_dict())
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in trainer.net.learner.parameters()}
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    losses = train_steps(trainer, batch, 12)
    # Against SAM's random decoder the fall is steady rather than steep.
    assert losses[-1] < 0.92 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 9, losses
    for name, tensor in trainer.teacher.state_dict().items():
        assert torch.equal(tensor, sam_before[name]), f"SAM changed: {name}"
    changed = [n for n, t in trainer.net.learner.state_dict().items() if not torch.equal(t, learner_before[n])]
    assert changed


def test_embedding_cache_gives_the_same_loss_and_skips_the_encoder(small_split, tmp_path):
    trainer = Trainer(small_config(small_split, tmp_path / "run", 1, embedding_cache=str(tmp_path / "emb")))
    trainer.load_data()
    batch = next(iter(trainer.loader(0)))
    trainer.net.eval()
    calls = count_encoder_calls(trainer)
    with torch.no_grad():
        first = trainer.loss(batch)  # computes and stores
        again = trainer.loss(batch)  # reads
        cache, trainer.cache = trainer.cache, None
        uncached = trainer.loss(batch)
    assert calls[0] == len(batch["image"]) and len(calls) == 2  # the second pass never ran the encoder
    assert cache.filled == len({(int(c), int(s), int(v)) for c, s, v in
                                zip(batch["case"], batch["slice"], batch["variant"])})
    assert torch.equal(first, again) and torch.allclose(first, uncached, rtol=0, atol=1e-6)


def test_phase1_on_three_planes_caches_each_plane_apart(small_split, tmp_path):
    # SAM sees each plane's slices; one case's axial slice 0 and coronal slice 0 are different inputs.
    trainer = Trainer(small_config(small_split, tmp_path / "run", 1, three_plane=True,
                                   embedding_cache=str(tmp_path / "emb")))
    trainer.load_data()
    cases = {case.id for case in split_cases(small_split, "train", ["FLAIR"], 0)}
    assert set(trainer.cache.n_slices) == {f"{c}:{p}" for c in cases for p in PLANES}
    for data in trainer.train_data:  # each plane's slice count is the isotropic volume's extent along it
        assert trainer.cache.n_slices[data.id] == data.mask.shape[0]
    first = trainer.train_data[0]
    sizes = {p: trainer.cache.n_slices[f"{first.id.split(':')[0]}:{p}"] for p in PLANES}
    assert len(set(sizes.values())) > 1, sizes  # the head is not a cube: the planes really differ
    batch = next(iter(trainer.loader(0)))
    trainer.net.eval()
    calls = count_encoder_calls(trainer)
    with torch.no_grad():
        first_loss, again = trainer.loss(batch), trainer.loss(batch)
    assert len(calls) == 1 and torch.equal(first_loss, again)  # the second pass read the cache
    taken = {(trainer.train_data[int(c)].id, int(s), int(v)) for c, s, v in
             zip(batch["case"], batch["slice"], batch["variant"])}
    assert trainer.cache.filled == len(taken)
    case = next(iter(cases))
    free = next(s for s in range(min(sizes.values())) if not {(f"{case}:{p}", s, 0) for p in PLANES} & taken)
    trainer.cache.put(f"{case}:axial", free, 0, np.ones((256, 64, 64), np.float16))
    assert trainer.cache.get(f"{case}:axial", free, 0) is not None
    assert trainer.cache.get(f"{case}:coronal", free, 0) is None  # not the axial slice's embedding


def test_phase2_runs_without_segment_anything(small_split, phase1_run, tmp_path):
    out = tmp_path / "p2"
    init = phase1_run / "checkpoints" / "last"
    proc = run_cli("train", "phase2", "--split", small_split, "--out", out, "--init", init,
                   "--epochs", 1, "--samples-per-epoch", 8, "--batch-size", 4, "--workers", 0, "--device", "cpu",
                   "--val-max-cases", 1, "--config", _yaml(tmp_path, input_size=128, embed_size=64),
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
    assert code == 1 and "loss must be one of dice_ce, dice_ce_slice, not 'focal'" in err
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
    on = _yaml(tmp_path, cpu_bf16="true", three_plane="true", soft_labels="true", amp="false",
               finetune_learner="false", augment="{'off': 1, 'affine': 0.5}")
    assert main([*base, "--config", on]) == 0  # the config's settings stand where no flag is given
    assert main([*base, "--config", on, "--no-cpu-bf16", "--no-three-plane", "--no-soft-labels", "--amp",
                 "--no-freeze-learner", "--augment"]) == 0
    assert main([*base, "--cpu-bf16", "--three-plane", "--no-amp", "--freeze-learner", "--no-augment"]) == 0
    hand_written = _yaml(tmp_path, augment="{off: 1, affine: 0.25}")  # YAML 1.1 reads a bare `off` as false
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
    assert load_package(package_dir).card["architecture"]["input_size"] == 128  # inference: whole windows
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
    return _split_variant(small_split, tmp_path, edit)


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
        _misaligned(tmp_path, "soft_mask")(split)
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
            "--config", _yaml(tmp_path, input_size=64, embed_size=16)]
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
    phases = load_package(tmp_path / "ft-pkg").card["provenance"]["phases"]
    assert [p["run"] for p in phases] == ["pkg", "ft"] and phases[1]["init"] == "pkg"
    assert phases[0]["package"] == "phase2" and phases[0]["source"] == str(shelf / "pkg")
    assert phases[0]["weights_sha256"] == package.card["files"]["weights.safetensors"]["sha256"]
    assert phases[0]["provenance"] == package.card["provenance"]


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
    assert package.card["inputs"]["context_slices"] == 1 and package.card["architecture"]["in_channels"] == 3
    flair = sitk.ReadImage(str(split_cases(small_split, "test", ["FLAIR"])[0].images[0]))
    by_torch = Segmenter(package, backend="torch", device="cpu").segment([flair])
    by_onnx = Segmenter(package, backend="onnx").segment([flair])
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
    assert package.card["inputs"]["planes"] == list(PLANES)
    assert package.card["schema_version"] == 2  # samless versions from before fusion refuse it
    assert package.card["provenance"]["phases"][-1]["three_plane"] is True
    flair_path = split_cases(small_split, "test", ["FLAIR"])[0].images[0]
    segmenter = Segmenter(package, backend="torch", device="cpu")
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


def test_context_slices_in_phase_1_give_sam_the_centre_slice(small_split, tmp_path):
    out = tmp_path / "p1ctx"
    train(small_config(small_split, out, 1, context_slices=1, val_every=1))  # validation runs learner + SAM
    log = (out / "log.csv").read_text().splitlines()
    assert "val_dice" in log[0] and len(log) == 2


def checkpoint_network(run):
    """The single-slice network of a phase-2 run, in eval mode."""
    from samless.modeling import build_model
    from samless.training.checkpoint import load_checkpoint_info, load_model_weights

    checkpoint = run / "checkpoints" / "last"
    net = build_model(load_checkpoint_info(checkpoint)["card"]["architecture"])
    net.load_state_dict(load_model_weights(checkpoint))
    return net.eval()


def _yaml(folder, **settings) -> str:
    path = folder / "extra.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
    return str(path)


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
                "--val-max-cases", "1", "--config", _yaml(tmp_path, input_size=128, embed_size=64), *extra]

    assert _conv_output_dtypes(args(tmp_path / "full")) == {torch.float32}
    assert _conv_output_dtypes(args(tmp_path / "bf16", "--cpu-bf16")) == {torch.bfloat16}
    run = tmp_path / "bf16"
    assert yaml.safe_load((run / "config.yaml").read_text())["cpu_bf16"] is True
    weights = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float32}
    log = (run / "log.csv").read_text().splitlines()
    assert np.isfinite(float(log[1].split(",")[log[0].split(",").index("train_loss")]))


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(small_split, tmp_path, monkeypatch, capsys):
    settings = dict(epochs=2, val_every=1)
    train(small_config(small_split, tmp_path / "straight", 2, **settings))

    crashed = small_config(small_split, tmp_path / "crashed", 2, **settings)
    train_until_power_cut(crashed, monkeypatch)
    with pytest.raises(SamlessError, match="--resume"):
        train(crashed)  # refuses to start over a run silently
    last = tmp_path / "crashed" / "checkpoints" / "last"
    before = {p.name: p.read_bytes() for p in last.iterdir()}
    # Resumed from the command line: flags changing what it computes are refused, each named...
    assert main(["train", "phase2", "--out", str(tmp_path / "crashed"), "--resume", "--lr", "0.5",
                 "--cpu-bf16", "--context-slices", "1"]) == 1  # (another network would not even load)
    error = capsys.readouterr().err
    assert "lr 0.01 -> 0.5" in error and "cpu_bf16 False -> True" in error and "context_slices 0 -> 1" in error
    assert {p.name: p.read_bytes() for p in last.iterdir()} == before
    # ... so is a split file with other contents; the same one moved elsewhere is not (the run's data moved).
    moved = small_split.with_name(f"moved-{tmp_path.name}.json")
    moved.write_text(small_split.read_text().replace("\n", "\n "))
    assert main(["train", "phase2", "--out", str(tmp_path / "crashed"), "--resume", "--split", str(moved)]) == 1
    assert f"split {str(small_split)!r} -> {str(moved)!r}" in capsys.readouterr().err
    moved.write_bytes(small_split.read_bytes())
    # --out alone continues it with its own settings (config.yaml); where and how it runs may change.
    assert main(["train", "phase2", "--out", str(tmp_path / "crashed"), "--resume", "--val-max-cases", "1",
                 "--split", str(moved)]) == 0

    a = load_file(str(tmp_path / "straight" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (tmp_path / "straight" / "log.csv").read_text().count("\n") == 3
    assert (tmp_path / "crashed" / "log.csv").read_text().count("\n") == 3


def test_training_in_chunks_reproduces_the_uninterrupted_run(small_split, tmp_path):
    settings = dict(epochs=2, val_every=1)
    train(small_config(small_split, tmp_path / "straight", 2, **settings))
    chunked = small_config(small_split, tmp_path / "chunked", 2, **settings)
    train(chunked, stop_after=1)  # a session's worth: one epoch, checkpointed
    log = (tmp_path / "chunked" / "log.csv").read_text().splitlines()
    assert len(log) == 2 and log[1].startswith("0,")
    train(chunked, resume=True)  # the next session: the rest, on the same schedule
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "chunked" / "checkpoints" / "last" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (tmp_path / "chunked" / "log.csv").read_text().count("\n") == 3


def test_torchrun_two_processes_on_cpu(small_split, tmp_path):
    out = tmp_path / "ddp"
    config = _yaml(tmp_path, input_size=128, embed_size=64, val_max_cases=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "samless",
         "train", "phase2", "--split", str(small_split), "--out", str(out), "--config", config, "--epochs", "1",
         "--samples-per-epoch", "16", "--batch-size", "4", "--workers", "0", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["best", "last"]
    state = json.loads((out / "checkpoints" / "last" / "state.json").read_text())
    assert state["info"]["epoch"] == 0
    assert (out / "log.csv").read_text().count("\n") == 2  # one epoch, logged once (rank 0)


def test_export_then_segment_round_trip(phase2_run, small_split, tmp_path):
    package_dir = tmp_path / "pkg"
    (tmp_path / "best.json").write_text(json.dumps({"threshold": 0.4, "min_lesion_mm3": 7.0}))  # as `samless tune`
    assert main(["export", str(phase2_run / "checkpoints" / "best"), "-o", str(package_dir),
                 "--name", "test-export", "--postprocessing", str(tmp_path / "best.json")]) == 0
    package = load_package(package_dir)
    card = package.card
    assert card["name"] == "test-export"
    assert card["postprocessing"] == {"threshold": 0.4, "min_lesion_mm3": 7.0, "connectivity": "full"}
    phase1, phase2 = card["provenance"]["phases"]
    assert (phase1["phase"], phase1["run"], phase2["phase"], phase2["init"]) == (1, "phase1", 2, "phase1")
    assert "random weights" in phase1["sam_checkpoint"]
    assert card["architecture"]["input_size"] == 128
    assert "val_dice" in card["metrics"]["validation"]

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
    (entry,) = package.card["provenance"]["phases"]
    assert entry["run"] == "soup"
    assert package.card["provenance"]["settings"]["split"] == str(small_split)  # the members' data, no one's run
    assert [[r["run"] for r in chain] for chain in entry["average_of"]] == [["phase1", "phase2"],
                                                                            ["phase1", "phase2", "other"]]
    flair = small_split.parent / json.loads(small_split.read_text())["test"][0]["flair"]
    result = Segmenter(package, backend="torch").segment([sitk.ReadImage(str(flair))])
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
    assert package_chain[0]["weights_sha256"] == package.card["files"]["weights.safetensors"]["sha256"]
    assert package_chain[0]["provenance"] == package.card["provenance"]
    assert main(["train", "average", str(tmp_path / "pkg"), str(tmp_path / "pkg"), "-o", str(tmp_path / "p2")]) == 1
    assert not (tmp_path / "p2").exists()  # packages alone: no split file for the export to read


def test_phase1_from_a_trained_network_keeps_its_aggregator_for_phase2(phase2_run, small_split, tmp_path):
    """Teacher guidance as a fine-tune: phase 1 from a phase-2 network trains its learner only, and phase 2
    then starts from the whole network (its trained aggregator too), with the chain in the card."""
    start = phase2_run / "checkpoints" / "last"
    p1 = train(small_config(small_split, tmp_path / "p1", 1, init=str(start), val_every=0, sam_type="vit_tiny"))
    before, after = load_file(str(start / "model.safetensors")), load_file(str(p1 / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("aggregator."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("learner."))
    p2 = Trainer(small_config(small_split, tmp_path / "p2", 2, init=str(p1)))
    assert p2.aggregator_trained
    state = p2.net.state_dict()
    assert all(torch.equal(state[k].contiguous(), after[k]) for k in after if k.startswith("aggregator."))
    assert [r.get("phase") for r in training_runs(p1)] == [1, 2, 1]  # phase 1 -> phase 2 (its init) -> this


def test_export_records_the_split_as_trained_even_after_the_split_file_moved(phase2_run, small_split, tmp_path):
    split = small_split.parent / "split-to-move.json"  # beside the cases, which it names relative to itself
    shutil.copy(small_split, split)
    run = train(small_config(split, tmp_path / "run", 2, init=str(phase2_run / "checkpoints" / "last"), seed=3,
                             val_every=0))
    split.rename(tmp_path / "moved.json")
    assert main(["export", str(run), "-o", str(tmp_path / "pkg")]) == 0
    recorded = load_checkpoint_info(run)["split_sha256"]
    assert recorded and load_package(tmp_path / "pkg").card["provenance"]["split_sha256"] == recorded
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


@pytest.mark.parametrize("case", ["one", "phase1", "other network", "other planes", "other fold", "other split",
                                  "onto a member", "package of another fold", "run folder", "package with no split"])
def test_average_refuses_what_cannot_be_averaged(case, phase1_run, phase2_run, small_split, tmp_path, capsys):
    best = str(phase2_run / "checkpoints" / "best")
    if case == "one":
        members, message = [best], "at least two"
    elif case == "phase1":
        members, message = [best, str(phase1_run / "checkpoints" / "last")], "phase-1 checkpoint"
    elif case == "package with no split":  # exported when its split file was gone: only "" recorded
        assert main(["export", best, "-o", str(tmp_path / "pkg")]) == 0
        card = json.loads((tmp_path / "pkg" / "model.json").read_text())
        card["provenance"]["split_sha256"] = ""
        (tmp_path / "pkg" / "model.json").write_text(json.dumps(card))
        members, message = [best, str(tmp_path / "pkg")], "does not record its split file"
    elif case == "run folder":  # the run, not one of its checkpoints
        members, message = [best, str(phase2_run)], f"give {phase2_run / 'checkpoints' / 'best'} or"
    elif case == "onto a member":  # --overwrite must not write the mean over one of its own members
        shutil.copytree(phase2_run / "checkpoints" / "best", tmp_path / "soup" / "checkpoints" / "best")
        members, message = [str(tmp_path / "soup" / "checkpoints" / "best"), best], "one of the checkpoints"
    else:
        other = tmp_path / "other"
        settings = {"other network": dict(context_slices=1), "other planes": dict(three_plane=True)
                    }.get(case, dict(fold=1))
        split = small_split
        if case == "other split":  # the same cases, other bytes: another split file, named as such
            split, settings = small_split.with_name(f"other-{tmp_path.name}.json"), {}
            split.write_text(small_split.read_text().replace("\n", "\n "))
        train(small_config(split, other, 2, val_every=0, **settings))
        members = [best, str(other / "checkpoints" / "last")]
        message = {"other network": f"{members[1]} differs from {best} in its architecture (in_channels 3 vs 1)",
                   "other planes": "in its inputs (planes ['axial', 'coronal', 'sagittal'] vs ['axial'])",
                   "other split": f"another split file than {best} ({split} vs {small_split})",
                   }.get(case, f"trained on another fold than {best} (fold 1 vs fold 0)")
        if case == "package of another fold":
            assert main(["export", members[1], "-o", str(tmp_path / "pkg")]) == 0
            members[1] = str(tmp_path / "pkg")
    before = (tmp_path / "soup").exists() and load_file(str(tmp_path / "soup" / "checkpoints" / "best" /
                                                          "model.safetensors"))
    assert main(["train", "average", *members, "-o", str(tmp_path / "soup"), "--overwrite"]) == 1
    assert message in capsys.readouterr().err
    if before:  # the member is untouched
        after = load_file(str(tmp_path / "soup" / "checkpoints" / "best" / "model.safetensors"))
        assert all(torch.equal(before[k], after[k]) for k in before)
    else:
        assert not (tmp_path / "soup").exists()


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


def test_real_vit_b_architecture_phase1_step():
    """SAM ViT-B as published (random weights): one learner step through its encoder and decoder."""
    from samless.modeling import NetConfig, build_model
    from samless.training.sam import SAMTeacher, build_sam
    from samless.training.train import make_loss

    torch.manual_seed(0)
    teacher = SAMTeacher(build_sam("vit_b"), in_channels=1)
    assert teacher.sam.image_encoder.patch_embed.proj.weight.shape == (768, 1, 16, 16)
    net = build_model(NetConfig(backbone="hardnet39ds", input_size=128, embed_size=64))
    image = torch.rand(1, 1, 128, 128) * 2
    mask = (torch.rand(1, 1, 128, 128) > 0.9).float()
    emb = teacher.encode(image)
    assert emb.shape == (1, 256, 64, 64)
    loss = make_loss(1)(teacher.decode(emb, net.learner(image), 128), mask)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.learner.parameters())


# --- SAM checkpoints -------------------------------------------------------------------------------

def test_sam_checkpoints_load_safely(tmp_path):
    from samless.training.sam import build_sam

    reference = build_sam("vit_tiny")
    good = tmp_path / "sam_tiny.pth"
    torch.save(reference.state_dict(), good)
    loaded = build_sam("vit_tiny", good)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name])

    with pytest.raises(SamlessError, match="does not exist"):
        build_sam("vit_tiny", tmp_path / "missing.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(SamlessError, match="not a readable SAM checkpoint"):
        build_sam("vit_tiny", tmp_path / "text.pth")
    wrong = {k: v[..., :1] if v.ndim and k.endswith("weight") else v for k, v in reference.state_dict().items()}
    torch.save(wrong, tmp_path / "other_size.pth")
    with pytest.raises(SamlessError, match="different SAM size"):
        build_sam("vit_tiny", tmp_path / "other_size.pth")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_with_code_is_refused(tmp_path):
    """torch.load(weights_only=True): a checkpoint that would run code when unpickled is rejected."""
    from samless.training.sam import build_sam

    torch.save({"image_encoder.x": _Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(SamlessError, match="not a readable SAM checkpoint"):
        build_sam("vit_tiny", tmp_path / "evil.pth")


# --- splits ----------------------------------------------------------------------------------------

def _split_variant(small_split, tmp_path, edit) -> str:
    split = json.loads(small_split.read_text())
    for fold in [v for k, v in split.items() if k.startswith("fold")]:
        for subset in fold.values():
            for sample in subset:
                for key in ("flair", "mask"):
                    sample[key] = str(small_split.parent / sample[key])
    edit(split)
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split))
    return path


def _blank_masks(tmp_path):
    def edit(split):
        for fold in [v for k, v in split.items() if k.startswith("fold")]:
            for sample in fold["train"]:
                empty = tmp_path / f"empty_{os.path.basename(os.path.dirname(sample['mask']))}.nii.gz"
                mask = sitk.ReadImage(sample["mask"]) * 0
                sitk.WriteImage(mask, str(empty))
                sample["mask"] = str(empty)
    return edit


def _misaligned(tmp_path, key="mask"):
    def edit(split):
        sample = split["fold0"]["train"][0]
        mask = sitk.ReadImage(sample["mask"])
        mask.SetOrigin([o + 2.0 for o in mask.GetOrigin()])
        sitk.WriteImage(mask, str(tmp_path / "shifted.nii.gz"))
        sample[key] = str(tmp_path / "shifted.nii.gz")
    return edit


@pytest.mark.parametrize("make_edit, message", [
    (lambda t: lambda s: s["fold0"]["train"][0].update(flair="/nowhere/flair.nii.gz"), "does not exist"),
    (_misaligned, "differ in origin"),
    (_blank_masks, "masks are empty"),
    (lambda t: lambda s: s["fold0"]["train"][1].update(pd="x.nii.gz"), "unknown modality key"),
    (lambda t: lambda s: s["fold0"]["train"][0].pop("mask"), "lacks mask"),
    (lambda t: lambda s: s.pop("fold0"), "no fold0"),
])
def test_bad_splits_name_the_offending_case(small_split, tmp_path, capsys, make_edit, message):
    path = _split_variant(small_split, tmp_path, make_edit(tmp_path))
    code = main(["train", "phase2", "--split", str(path), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--device", "cpu", "--workers", "0", "--samples-per-epoch", "4", "--batch-size", "2",
                 "--config", _yaml(tmp_path, input_size=64, embed_size=16)])
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
    from samless.training.split import make_split, split_cases

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


def test_torchrun_phase1_shares_the_embedding_cache(small_split, tmp_path):
    out, cache = tmp_path / "ddp1", tmp_path / "emb"
    config = _yaml(tmp_path, input_size=128, embed_size=64, sam_type="vit_tiny", val_every=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "samless",
         "train", "phase1", "--split", str(small_split), "--out", str(out), "--config", config, "--epochs", "1",
         "--samples-per-epoch", "8", "--batch-size", "2", "--workers", "0", "--device", "cpu",
         "--sam-random-weights", "--embedding-cache", str(cache)],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "last" / "model.safetensors").exists()
    flags = [np.fromfile(p, np.uint8) for p in cache.glob("*.flags")]
    assert flags and sum(int(f.sum()) for f in flags) > 0  # both ranks wrote into the shared cache
    assert json.loads((cache / "cache.json").read_text())["identity"]["sam_type"] == "vit_tiny"


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
