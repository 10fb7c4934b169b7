"""Checkpoints: a run resumed after a crash or trained in chunks repeats the uninterrupted one; two
processes under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import train_until_power_cut, yaml_config

from conftest import small_config
from samless.cli import main
from samless.errors import SamlessError
from samless.training.train import train


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
    config = yaml_config(tmp_path, input_size=128, embed_size=64, val_max_cases=1)
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
