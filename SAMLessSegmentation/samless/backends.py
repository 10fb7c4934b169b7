"""Two ways to run the network, behind one interface: PyTorch (CPU/CUDA/MPS) and ONNX Runtime (CPU).

Both compute the same function, lesion probability per pixel, from the same model package.
ONNX Runtime is the light path: it needs no torch at all.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Protocol

import numpy as np

from samless.errors import SamlessError
from samless.options import BACKENDS, DEVICES
from samless.package import ModelPackage


class Backend(Protocol):
    name: str
    device: str

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, S, S) float32 images -> (N, S, S) float32 lesion probabilities."""


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


class ModuleBackend:
    """Any torch module mapping (N,C,S,S) images to (N,1,S,S) probabilities, e.g. a network in training.

    Validation and evaluation run in-memory networks through the very same pipeline as `samless segment`.
    """

    name = "torch"

    def __init__(self, module, device: str = "auto", threads: int | None = None):
        import torch

        self.device = pick_torch_device(device)
        if self.device == "cpu" and threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self._model = module.to(self.device).eval()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            return self._model(x)[:, 0].float().cpu().numpy()


class TorchBackend(ModuleBackend):
    """A model package's network on CPU, CUDA or MPS."""

    def __init__(self, package: ModelPackage, device: str = "auto", threads: int | None = None):
        from samless.modeling import LesionProbability

        super().__init__(LesionProbability(package.build_torch_model()), device, threads or default_threads())


class OnnxBackend:
    name = "onnx"
    device = "cpu"

    def __init__(self, package: ModelPackage, threads: int | None = None):
        import onnxruntime as ort

        if not package.has_onnx:
            raise SamlessError(f"model package {package.source} has no model.onnx; use --backend torch.")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(package.files["model.onnx"], options,
                                             providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def predict(self, batch: np.ndarray) -> np.ndarray:
        out = self._session.run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return out[:, 0]


def pick_torch_device(device: str = "auto") -> str:
    """'auto' -> cuda, then mps, then cpu; an explicit device must be available."""
    import torch

    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if device == "cuda" and not cuda:
        raise SamlessError("--device cuda was asked for but no CUDA GPU is usable here; use --device cpu or auto.")
    if device == "mps" and not mps:
        raise SamlessError("--device mps was asked for but Apple MPS is not available; use --device cpu or auto.")
    if device not in DEVICES:
        raise SamlessError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}.")
    return device


def create_backend(package: ModelPackage, backend: str = "auto", device: str = "auto",
                   threads: int | None = None) -> Backend:
    """The backend to run `package` with.

    'auto' prefers a GPU through PyTorch when there is one, else ONNX Runtime on the CPU (lighter and
    faster there), else PyTorch on the CPU.
    """
    if backend not in BACKENDS:
        raise SamlessError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}.")
    has_torch, has_ort = _has("torch"), _has("onnxruntime")
    if backend == "auto":
        wants_gpu = device in ("cuda", "mps") or (device == "auto" and has_torch and pick_torch_device() != "cpu")
        if wants_gpu or not (has_ort and package.has_onnx):
            backend = "torch"
        else:
            backend = "onnx"
    if backend == "onnx":
        if not has_ort:
            raise SamlessError("--backend onnx needs onnxruntime: pip install onnxruntime.")
        if device not in ("auto", "cpu"):
            raise SamlessError(f"the onnx backend runs on the CPU only; use --backend torch for --device {device}.")
        return OnnxBackend(package, threads)
    if not has_torch:
        raise SamlessError("the torch backend needs PyTorch: pip install torch (or use --backend onnx).")
    if "weights.safetensors" not in package.files:
        raise SamlessError(f"model package {package.source} has no weights.safetensors; use --backend onnx.")
    return TorchBackend(package, device, threads)
