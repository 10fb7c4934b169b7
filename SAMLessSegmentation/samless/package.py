"""The model package: what training exports and every consumer loads.

A folder (or a .zip of one) holding:

- ``model.json``: the model card: architecture, inputs, normalisation, post-processing defaults,
  provenance, licence, metrics, and the sha256 and size of every other file;
- ``weights.safetensors``: the network's weights (for the PyTorch backend);
- ``model.onnx``: the same network as ONNX (for the ONNX Runtime backend, no torch needed).

Loading reads bytes and checks them against the recorded sha256; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samless.errors import SamlessError

SCHEMA_VERSION = 2  # the newest card this samless reads; 2 added three-plane models
CARD_NAME = "model.json"
WEIGHTS_NAME = "weights.safetensors"
ONNX_NAME = "model.onnx"
PLANES = ("axial", "coronal", "sagittal")
REQUIRED_KEYS = ("schema_version", "name", "architecture", "inputs", "normalization", "postprocessing", "files")

# What a card says when the caller gives nothing else; training fills in the real values.
DEFAULT_INPUTS = {
    "modalities": ["FLAIR"],
    "orientation": "LPS",
    "slicing_axis": "axial",
    "planes": ["axial"],
    "spacing_mm": [1.0, 1.0],
}
DEFAULT_NORMALIZATION = {
    "method": "foreground_percentile",
    "foreground": "robust_range",
    "lower_percentile": 1.0,
    "upper_percentile": 50.0,
    "clip": [0.0, 4.0],
}
DEFAULT_POSTPROCESSING = {"threshold": 0.5, "min_lesion_mm3": 3.0, "connectivity": "full"}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ModelPackage:
    """A loaded, verified model package. File contents are held as bytes."""

    card: dict[str, Any]
    source: Path
    files: dict[str, bytes] = field(repr=False)

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def architecture(self) -> dict[str, Any]:
        return self.card["architecture"]

    @property
    def input_size(self) -> int:
        return int(self.architecture["input_size"])

    @property
    def modalities(self) -> list[str]:
        return list(self.card["inputs"]["modalities"])

    @property
    def context_slices(self) -> int:
        """Neighbouring slices a side the network sees with each slice (0: single slices; 1: 2.5D, 3 slices)."""
        return int(self.card["inputs"].get("context_slices", 0))

    @property
    def has_onnx(self) -> bool:
        return ONNX_NAME in self.files

    def state_dict(self) -> dict[str, Any]:
        """The weights as torch tensors (needs torch)."""
        from safetensors.torch import load

        return load(self.files[WEIGHTS_NAME])

    def build_torch_model(self):
        """The network with its weights loaded, in eval mode (needs torch)."""
        from samless.modeling import build_model

        try:
            net = build_model(self.architecture)
        except ValueError as exc:
            raise SamlessError(f"model package {self.source}: bad architecture in {CARD_NAME}: {exc}") from None
        try:
            net.load_state_dict(self.state_dict(), strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
            raise SamlessError(
                f"model package {self.source}: weights do not match the architecture in {CARD_NAME} ({first}); "
                "re-export the package."
            ) from None
        return net.eval()


def load_package(path: str | os.PathLike) -> ModelPackage:
    """Load and verify a model package folder or .zip."""
    path = Path(path)
    if not path.exists():
        raise SamlessError(f"model package {path} does not exist; give a package folder, a .zip or a bundled name.")
    files = _read_zip(path) if path.is_file() else _read_folder(path)
    if CARD_NAME not in files:
        raise SamlessError(f"{path} is not a model package: it has no {CARD_NAME}.")
    try:
        card = json.loads(files[CARD_NAME].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SamlessError(f"{path}/{CARD_NAME} is not valid JSON ({exc}); the package is corrupted.") from None
    validate_card(card, path)
    for name, meta in card["files"].items():
        if name not in files:
            raise SamlessError(
                f"model package {path} lacks {name}, which {CARD_NAME} lists; re-download or re-export it."
            )
        if sha256_bytes(files[name]) != meta["sha256"]:
            raise SamlessError(
                f"model package {path}: {name} does not match its sha256 in {CARD_NAME} "
                "(corrupted or tampered); re-download or re-export it."
            )
    return ModelPackage(card=card, source=path, files={n: files[n] for n in card["files"]})


def validate_card(card: Any, path: Path | str = "model.json") -> None:
    """Check a card's shape; raise SamlessError naming the first problem."""
    if not isinstance(card, dict):
        raise SamlessError(f"{path}: {CARD_NAME} must hold a JSON object.")
    missing = [k for k in REQUIRED_KEYS if k not in card]
    if missing:
        raise SamlessError(f"{path}: {CARD_NAME} lacks {', '.join(missing)}; re-export the package.")
    version = card["schema_version"]
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise SamlessError(
            f"{path}: package schema version {version!r} is newer than this samless reads ({SCHEMA_VERSION}); "
            "upgrade samless."
        )
    if WEIGHTS_NAME not in card["files"] and ONNX_NAME not in card["files"]:
        raise SamlessError(f"{path}: the package has neither {WEIGHTS_NAME} nor {ONNX_NAME}.")
    for name, meta in card["files"].items():
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
            raise SamlessError(f"{path}: files.{name} in {CARD_NAME} has no sha256; re-export the package.")
    inputs = card["inputs"]
    for key in ("modalities", "slicing_axis", "spacing_mm", "planes"):
        if key not in inputs:
            raise SamlessError(f"{path}: inputs.{key} is missing from {CARD_NAME}.")
    if inputs["slicing_axis"] not in PLANES or not set(inputs["planes"]) <= set(PLANES):
        raise SamlessError(f"{path}: inputs.slicing_axis/planes must be among {PLANES}.")
    if sorted(inputs["planes"]) not in ([inputs["slicing_axis"]], sorted(PLANES)):
        raise SamlessError(f"{path}: inputs.planes must be [slicing_axis] or all of {PLANES}, not "
                           f"{inputs['planes']}.")
    context = inputs.get("context_slices", 0)
    if not isinstance(context, int) or context < 0:
        raise SamlessError(f"{path}: inputs.context_slices must be a whole number >= 0, not {context!r}.")
    if input_channels(inputs) != int(card["architecture"].get("in_channels", 1)):
        raise SamlessError(
            f"{path}: {len(inputs['modalities'])} modalities x {2 * context + 1} slices listed but the network "
            f"takes {card['architecture'].get('in_channels')} channels."
        )


def input_channels(inputs: dict[str, Any]) -> int:
    """Network input channels of a card's `inputs`: each modality with its `context_slices` neighbours on
    both sides (2.5D)."""
    return len(inputs["modalities"]) * (2 * int(inputs.get("context_slices", 0)) + 1)


def _read_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _read_zip(path: Path) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(path) as archive:
            # Packages may be zipped with or without their top folder.
            return {Path(n).name: archive.read(n) for n in archive.namelist() if not n.endswith("/")}
    except zipfile.BadZipFile:
        raise SamlessError(f"{path} is neither a model package folder nor a valid .zip of one.") from None


def is_three_plane(inputs: dict[str, Any]) -> bool:
    """Whether a card's `inputs` are a three-plane model's: isotropic volumes, fused planes (else one plane)."""
    return len(inputs.get("planes", ["axial"])) > 1


def card_schema(inputs: dict[str, Any]) -> int:
    """The oldest schema that describes these inputs: a three-plane model needs 2, so a samless from before
    three-plane models refuses it instead of running it on its axial slices of the acquired grid."""
    return 2 if is_three_plane(inputs) else 1


DEFAULT_MODEL = "samless-demo"
MODEL_PATH_ENV = "SAMLESS_MODEL_PATH"


def bundled_resource_dirs(name: str) -> list[Path]:
    """Where the extension's Resources/<name> (Models, Sample) may be: in the checkout, in the installed
    Slicer module (where samless sits in the module folder), or in an installed wheel (samless/bundled)."""
    here = Path(__file__).resolve().parent
    return [here.parents[1] / "Resources" / name, here.parent / "Resources" / name, here / "bundled" / name]


def model_search_path() -> list[Path]:
    """Folders searched for bundled model names: $SAMLESS_MODEL_PATH, then the bundled Models folders."""
    dirs = [Path(p) for p in os.environ.get(MODEL_PATH_ENV, "").split(os.pathsep) if p]
    return dirs + bundled_resource_dirs("Models")


def resolve_model(model: str | os.PathLike | None) -> Path:
    """The path of a model given as a package path or a bundled name (None: the default model)."""
    model = DEFAULT_MODEL if model is None else model
    path = Path(model)
    if path.exists():
        return path
    if path.name == str(model):  # a bare name: look it up
        for folder in model_search_path():
            for candidate in (folder / path.name, folder / f"{path.name}.zip"):
                if candidate.exists():
                    return candidate
    known = sorted({p.name for d in model_search_path() if d.is_dir() for p in d.iterdir()
                    if (p / CARD_NAME).exists() or p.suffix == ".zip"})
    raise SamlessError(
        f"model {str(model)!r} not found: give a package folder or .zip, or one of the bundled models "
        f"({', '.join(known) or 'none installed'})."
    )
