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
MIN_TORCH = "2.2"  # as samless[torch] asks: the GPU path's exported networks and autocast need it


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing_requirements(device: str) -> list[str]:
    """pip requirements still missing for `device` (auto, cpu or gpu); torch is not among them."""
    needed = TORCH_REQUIREMENTS if device == "gpu" else LIGHT_REQUIREMENTS
    importlib.invalidate_caches()  # a pip install may have just added them
    return [requirement for module, requirement in needed.items() if not is_installed(module)]


def needs_torch(device: str) -> bool:
    return device == "gpu" and not is_installed("torch")


def torch_too_old(device: str) -> str | None:
    """What to do when the GPU path would run an installed torch older than MIN_TORCH (else None)."""
    if device != "gpu" or not is_installed("torch"):
        return None
    try:
        installed = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    if _release(installed) >= _release(MIN_TORCH):
        return None
    return (f"GPU inference needs PyTorch {MIN_TORCH} or newer; this Slicer has {installed}. Open the PyTorch "
            f"Utils module, install PyTorch with the version requirement >={MIN_TORCH}, restart Slicer; or choose CPU.")


def _release(version: str) -> tuple[int, ...]:
    """(2, 5, 1) of '2.5.1+cu121': the numeric release part, enough to compare torch versions."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def constraints() -> list[str]:
    """Pins (`name==version`) that keep pip from replacing what Slicer ships."""
    pins = []
    for name in SHIPPED_WITH_SLICER:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue  # built into Slicer, not pip-installed (vtk); nothing we install asks for it
    return pins


def package_versions() -> dict[str, str | None]:
    """The installed version of each package SAMLess runs with (None: not installed), for the panel's log."""
    names = sorted({*LIGHT_REQUIREMENTS, *TORCH_REQUIREMENTS, "torch", *SHIPPED_WITH_SLICER}, key=str.lower)
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
