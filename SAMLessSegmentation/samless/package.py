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

from samless.card import CARD_NAME, ONNX_NAME, PLANES, SCHEMA_VERSION, WEIGHTS_NAME, ModelCard
from samless.errors import SamlessError

__all__ = ["CARD_NAME", "DEFAULT_MODEL", "MODEL_PATH_ENV", "ONNX_NAME", "PLANES", "SCHEMA_VERSION", "WEIGHTS_NAME",
           "ModelCard", "ModelPackage", "bundled_resource_dirs", "load_package", "model_search_path",
           "resolve_model", "sha256_bytes"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class ModelPackage:
    """A loaded, verified model package. File contents are held as bytes."""

    card: ModelCard
    source: Path
    files: dict[str, bytes] = field(repr=False)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def input_size(self) -> int:
        return self.card.architecture.input_size

    @property
    def modalities(self) -> list[str]:
        return list(self.card.inputs.modalities)

    @property
    def context_slices(self) -> int:
        """Neighbouring slices a side the network sees with each slice (0: single slices; 1: 2.5D, 3 slices)."""
        return self.card.inputs.context_slices

    @property
    def has_onnx(self) -> bool:
        return ONNX_NAME in self.files

    def state_dict(self) -> dict:
        """The weights as torch tensors (needs torch)."""
        from safetensors.torch import load

        return load(self.files[WEIGHTS_NAME])

    def build_torch_model(self):
        """The network with its weights loaded, in eval mode (needs torch)."""
        from samless.modeling import build_model

        try:
            net = build_model(self.card.architecture)
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
        data = json.loads(files[CARD_NAME].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SamlessError(f"{path}/{CARD_NAME} is not valid JSON ({exc}); the package is corrupted.") from None
    card = ModelCard.from_json(data, path)
    for name, meta in card.files.items():
        if name not in files:
            raise SamlessError(
                f"model package {path} lacks {name}, which {CARD_NAME} lists; re-download or re-export it."
            )
        if sha256_bytes(files[name]) != meta.sha256:
            raise SamlessError(
                f"model package {path}: {name} does not match its sha256 in {CARD_NAME} "
                "(corrupted or tampered); re-download or re-export it."
            )
    return ModelPackage(card=card, source=path, files={n: files[n] for n in card.files})


def _read_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _read_zip(path: Path) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(path) as archive:
            # Packages may be zipped with or without their top folder.
            return {Path(n).name: archive.read(n) for n in archive.namelist() if not n.endswith("/")}
    except zipfile.BadZipFile:
        raise SamlessError(f"{path} is neither a model package folder nor a valid .zip of one.") from None


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
