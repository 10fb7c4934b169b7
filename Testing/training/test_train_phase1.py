"""Phase 1: the prompt learner trained under SAM's guidance (real segment_anything classes at random
weights), its embedding cache, and SAM checkpoints loaded safely."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_helpers import count_encoder_calls, train_steps, yaml_config

from conftest import small_config
from samless.errors import SamlessError
from samless.package import PLANES
from samless.training.export import training_runs
from samless.training.split import split_cases
from samless.training.train import Trainer, make_loss, train


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

def test_context_slices_in_phase_1_give_sam_the_centre_slice(small_split, tmp_path):
    out = tmp_path / "p1ctx"
    train(small_config(small_split, out, 1, context_slices=1, val_every=1))  # validation runs learner + SAM
    log = (out / "log.csv").read_text().splitlines()
    assert "val_dice" in log[0] and len(log) == 2

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

def test_real_vit_b_architecture_phase1_step():
    """SAM ViT-B as published (random weights): one learner step through its encoder and decoder."""
    from samless.modeling import NetConfig, build_model
    from samless.training.sam import SAMTeacher, build_sam

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

def test_torchrun_phase1_shares_the_embedding_cache(small_split, tmp_path):
    out, cache = tmp_path / "ddp1", tmp_path / "emb"
    config = yaml_config(tmp_path, input_size=128, embed_size=64, sam_type="vit_tiny", val_every=0)
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
