"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder: model.safetensors, optim.safetensors (optimizer tensors and RNG states)
and state.json (epoch, optimizer/scheduler/scaler numbers, RNG states, config, best metric). It is
written beside its final place and renamed, so a crash never leaves a half-written checkpoint.
Checkpoints are training state, not model packages (`samless export` makes those).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from samless.card import ModelCard
from samless.errors import SamlessError
from samless.imageio import atomic_folder


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, numbers = {}, {}
    for pid, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                numbers[f"{pid}.{name}"] = value
    return tensors, {"numbers": numbers, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["numbers"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_py = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
                     "python": [version, list(internal), gauss_py]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_py = meta["python"]
    random.setstate((version, tuple(internal), gauss_py))


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any = None, scaler: Any = None, **info: Any) -> Path:
    """Write a checkpoint folder atomically (replacing an older one at `path`)."""
    path = Path(path)
    with atomic_folder(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        tensors, rng = rng_state()
        state: dict[str, Any] = {"info": info, "rng": rng}
        if optimizer is not None:
            optim_tensors, state["optimizer"] = _flatten_optimizer(optimizer.state_dict())
            tensors.update(optim_tensors)
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        save_file(tensors, str(tmp / "optim.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=float), encoding="utf-8")
    return path


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is meant as a training checkpoint (not, say, a model package): it holds state.json."""
    return (Path(path) / "state.json").is_file()


def load_checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """The `info` a checkpoint was saved with (epoch, config, metrics...)."""
    return _read_state(Path(path))["info"]


def checkpoint_card(path: str | os.PathLike, info: dict[str, Any] | None = None) -> ModelCard:
    """The model card a checkpoint was saved with (it lists no files: those come with the export)."""
    info = load_checkpoint_info(path) if info is None else info
    return ModelCard.from_json(info["card"], Path(path) / "state.json", require_files=False)


def _read_state(path: Path) -> dict[str, Any]:
    if not (path / "state.json").is_file() or not (path / "model.safetensors").is_file():
        raise SamlessError(f"{path} is not a samless training checkpoint (a folder with model.safetensors and "
                           "state.json).")
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


def load_model_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    _read_state(path)
    return load_file(str(path / "model.safetensors"))


def restore_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer=None, scheduler=None,
                       scaler=None, restore_rng: bool = True) -> dict[str, Any]:
    """Load everything saved back into the given objects; return the checkpoint's info."""
    path = Path(path)
    state = _read_state(path)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    tensors = load_file(str(path / "optim.safetensors"))
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        set_rng_state(tensors, state["rng"])
    return state["info"]
