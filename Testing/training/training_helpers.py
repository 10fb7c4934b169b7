"""Helpers shared by the training tests: small configs, runs cut short, the CLI in a fresh interpreter, split
variants. (The trained runs themselves are session fixtures in Testing/conftest.py, trained once.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import SimpleITK as sitk

from samless.training.checkpoint import load_checkpoint_info
from samless.training.train import TrainConfig, Trainer, train


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


def checkpoint_network(run):
    """The single-slice network of a phase-2 run, in eval mode."""
    from samless.modeling import build_model
    from samless.training.checkpoint import load_model_weights

    checkpoint = run / "checkpoints" / "last"
    net = build_model(load_checkpoint_info(checkpoint)["card"]["architecture"])
    net.load_state_dict(load_model_weights(checkpoint))
    return net.eval()


def yaml_config(folder, **settings) -> str:
    path = folder / "extra.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in settings.items()))
    return str(path)

def split_variant(small_split, tmp_path, edit) -> str:
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


def blank_masks(tmp_path):
    def edit(split):
        for fold in [v for k, v in split.items() if k.startswith("fold")]:
            for sample in fold["train"]:
                empty = tmp_path / f"empty_{os.path.basename(os.path.dirname(sample['mask']))}.nii.gz"
                mask = sitk.ReadImage(sample["mask"]) * 0
                sitk.WriteImage(mask, str(empty))
                sample["mask"] = str(empty)
    return edit


def misaligned(tmp_path, key="mask"):
    def edit(split):
        sample = split["fold0"]["train"][0]
        mask = sitk.ReadImage(sample["mask"])
        mask.SetOrigin([o + 2.0 for o in mask.GetOrigin()])
        sitk.WriteImage(mask, str(tmp_path / "shifted.nii.gz"))
        sample[key] = str(tmp_path / "shifted.nii.gz")
    return edit

