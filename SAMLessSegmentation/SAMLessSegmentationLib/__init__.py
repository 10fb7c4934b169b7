"""Qt-free bridge between Slicer's MRML scene and the samless inference core.

Imports only `slicer` MRML classes, vtk, numpy, SimpleITK and samless, so all of it runs (and is
tested) headless against the slicer-core wheel; the module and the Segment Editor effect add the Qt.
"""

from __future__ import annotations

from pathlib import Path

from samless.imageio import image_suffix

from .job import MODULE_DIR, SegmentationJob
from .process import DEVICES, InferenceProcess, ProcessFailed, RunOptions, segment_command
from .results import LesionResult, import_results, jump_to_lesion, rethreshold
from .terminology import TERMINOLOGY_FILE, load_terminology

# Resources of the module (UI, icons, terminology) and of the extension (model registry, bundled
# models, sample): side by side in a checkout, merged into one folder once installed.
RESOURCE_DIRS = (MODULE_DIR / "Resources", MODULE_DIR.parent / "Resources")


def resource_path(name: str) -> Path:
    """The first existing `name` among the resource folders (the first folder's path if none has it)."""
    return next((d / name for d in RESOURCE_DIRS if (d / name).exists()), RESOURCE_DIRS[0] / name)


def bundled_model_dirs() -> list[Path]:
    return [d / "Models" for d in RESOURCE_DIRS]


def sample_volume_path() -> Path | None:
    """The bundled sample FLAIR (Resources/Sample), if the installation has one."""
    images = sorted(p for d in RESOURCE_DIRS if (d / "Sample").is_dir() for p in (d / "Sample").iterdir()
                    if image_suffix(p))
    flair = [p for p in images if "flair" in p.name.lower()]
    return (flair or images or [None])[0]


__all__ = ["DEVICES", "MODULE_DIR", "RESOURCE_DIRS", "TERMINOLOGY_FILE", "InferenceProcess", "LesionResult",
           "ProcessFailed", "RunOptions", "SegmentationJob", "bundled_model_dirs", "import_results",
           "jump_to_lesion", "load_terminology", "resource_path", "rethreshold", "sample_volume_path",
           "segment_command"]
