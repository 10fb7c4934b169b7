"""Which Python packages the background process still needs, and what must never be replaced.

The light path (ONNX Runtime on the CPU) needs a few small pip packages; GPU inference needs
PyTorch, which the PyTorch extension installs in the build that matches the GPU driver. numpy,
SimpleITK and vtk ship with Slicer: installing anything must not replace them, so installs are
constrained to the versions already there.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util

# import name -> requirement
LIGHT_REQUIREMENTS = {"onnxruntime": "onnxruntime>=1.17", "safetensors": "safetensors>=0.4", "tqdm": "tqdm>=4.60"}
TORCH_REQUIREMENTS = {"safetensors": "safetensors>=0.4", "tqdm": "tqdm>=4.60"}  # plus torch, from PyTorch extension
SHIPPED_WITH_SLICER = ("numpy", "SimpleITK", "vtk")


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing_requirements(device: str) -> list[str]:
    """pip requirements still missing for `device` (auto, cpu or gpu); torch is not among them."""
    needed = TORCH_REQUIREMENTS if device == "gpu" else LIGHT_REQUIREMENTS
    importlib.invalidate_caches()  # a pip install may have just added them
    return [requirement for module, requirement in needed.items() if not is_installed(module)]


def needs_torch(device: str) -> bool:
    return device == "gpu" and not is_installed("torch")


def constraints() -> list[str]:
    """Pins (`name==version`) that keep pip from replacing what Slicer ships."""
    pins = []
    for name in SHIPPED_WITH_SLICER:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue  # built into Slicer, not pip-installed (vtk); nothing we install asks for it
    return pins
