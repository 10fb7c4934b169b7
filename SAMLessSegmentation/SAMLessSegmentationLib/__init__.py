"""Qt-free bridge between Slicer's MRML scene and the samless inference core.

Imports only `slicer` MRML classes, vtk, numpy, SimpleITK and samless, so all of it runs (and is
tested) headless against the slicer-core wheel; the module and the Segment Editor effect add the Qt.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from samless.imageio import image_suffix

from .job import MODULE_DIR, SegmentationJob
from .process import DEVICES, InferenceProcess, ProcessFailed, run_options, segment_command
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


def sample_data_source() -> dict | None:
    """The bundled sample FLAIR as Sample Data module arguments (`registerCustomSampleDataSource(**this)`),
    read from the installation through a file URL, checked by its sha256; None if there is no sample."""
    path = sample_volume_path()
    if path is None:
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"category": "SAMLess", "sampleName": "SAMLess sample FLAIR", "uris": path.resolve().as_uri(),
            # named by content, so a newer sample is not hidden by an older one in Slicer's cache
            "fileNames": f"SAMLessSample-{digest[:12]}{image_suffix(path)}", "nodeNames": "SAMLess sample FLAIR",
            "checksums": f"SHA256:{digest}", "loadFileTypes": "VolumeFile",
            "thumbnailFileName": str(resource_path("Icons/SAMLessSegmentation.png"))}


__all__ = ["DEVICES", "MODULE_DIR", "RESOURCE_DIRS", "TERMINOLOGY_FILE", "InferenceProcess", "LesionResult",
           "ProcessFailed", "SegmentationJob", "bundled_model_dirs", "import_results", "jump_to_lesion",
           "load_terminology", "resource_path", "rethreshold", "run_options", "sample_data_source",
           "sample_volume_path", "segment_command"]
