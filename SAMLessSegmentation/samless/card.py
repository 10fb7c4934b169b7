"""The model card (``model.json``), typed: the network, what it takes, how inputs are prepared and its output
turned into lesions, where it came from, and its files.

`ModelCard.from_json` is the one place that validates a card and fills in what older cards leave out (as
nnU-Net's plans manager does over its plans); `ModelCard.to_json` writes it back. No torch here: inference
reads cards without it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from samless.errors import SamlessError

SCHEMA_VERSION = 2  # the newest card this samless reads; 2 added three-plane models
CARD_NAME = "model.json"
WEIGHTS_NAME = "weights.safetensors"
ONNX_NAME = "model.onnx"
PLANES = ("axial", "coronal", "sagittal")
BACKBONES = ("hardnet85", "hardnet68", "hardnet39ds")
AGGREGATOR_NAMES = ("conv_upsample", "conv_upsample_detail", "transposed_conv")
REQUIRED_KEYS = ("schema_version", "name", "architecture", "inputs", "normalization", "postprocessing", "files")


@dataclass(frozen=True)
class NetConfig:
    """Architecture of a SAMLessNet (`samless.modeling.build_model` builds it); plain JSON in the card."""

    backbone: str = "hardnet85"
    in_channels: int = 1
    input_size: int = 512
    embed_dim: int = 256
    embed_size: int = 64
    decoder_channels: int = 64
    aggregator: str = "conv_upsample"
    num_classes: int = 2

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending key and what it accepts."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"NetConfig.{f.name} must be a positive integer, got {value!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"NetConfig.backbone must be one of {list(BACKBONES)}, got {self.backbone!r}")
        if self.aggregator not in AGGREGATOR_NAMES:
            raise ValueError(f"NetConfig.aggregator must be one of {list(AGGREGATOR_NAMES)}, got {self.aggregator!r}")
        if self.input_size % 32:
            raise ValueError(f"NetConfig.input_size must be a multiple of 32, got {self.input_size}")
        if self.input_size % self.embed_size:
            raise ValueError(f"NetConfig.embed_size must divide input_size ({self.input_size}), got {self.embed_size}")
        if self.num_classes < 2:
            raise ValueError(f"NetConfig.num_classes must be >= 2 (background + lesion), got {self.num_classes}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetConfig:
        """Inverse of :meth:`to_dict`; unknown keys and bad values raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"NetConfig.from_dict expects a dict, got {type(d).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"unknown NetConfig key(s) {unknown}; allowed: {allowed}")
        return cls(**d)


PRESETS: dict[str, NetConfig] = {
    # The paper's learner: HarDNet-85 at 512x512.
    "hardnet85_512": NetConfig(backbone="hardnet85", input_size=512),
    "hardnet68_512": NetConfig(backbone="hardnet68", input_size=512),
    # Light CPU config: a whole volume in seconds on 2 threads.
    "hardnet39ds_256": NetConfig(backbone="hardnet39ds", input_size=256),
}


def resolve_config(config: NetConfig | dict[str, Any] | str) -> NetConfig:
    """Accept a NetConfig, its dict form, or a preset name."""
    if isinstance(config, NetConfig):
        return config
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r}; allowed: {sorted(PRESETS)}")
        return PRESETS[config]
    return NetConfig.from_dict(config)


@dataclass(frozen=True)
class Inputs:
    """What the network takes: modalities in channel order, each slice with `context_slices` neighbours a
    side (2.5D), cut along `slicing_axis` of a grid in `orientation` at `spacing_mm` in plane; `planes` is
    [slicing_axis], or all three for a model that fuses them (trained on isotropic volumes)."""

    modalities: tuple[str, ...] = ("FLAIR",)
    orientation: str = "LPS"
    slicing_axis: str = "axial"
    planes: tuple[str, ...] = ("axial",)
    spacing_mm: tuple[float, ...] = (1.0, 1.0)
    context_slices: int = 0

    @property
    def channels(self) -> int:
        """Network input channels: each modality with its neighbours on both sides."""
        return len(self.modalities) * (2 * self.context_slices + 1)

    @property
    def three_plane(self) -> bool:
        return len(self.planes) > 1

    def problem(self) -> str | None:
        """What is wrong with these inputs, or None."""
        if self.slicing_axis not in PLANES or not set(self.planes) <= set(PLANES):
            return f"inputs.slicing_axis/planes must be among {PLANES}."
        if sorted(self.planes) not in ([self.slicing_axis], sorted(PLANES)):
            return f"inputs.planes must be [slicing_axis] or all of {PLANES}, not {list(self.planes)}."
        if not isinstance(self.context_slices, int) or isinstance(self.context_slices, bool) or self.context_slices < 0:
            return f"inputs.context_slices must be a whole number >= 0, not {self.context_slices!r}."
        return None


@dataclass(frozen=True)
class Normalization:
    """Intensities to network values: (v - p_lower) / (p_upper - p_lower) over the foreground, clipped."""

    method: str = "foreground_percentile"
    foreground: str = "robust_range"
    lower_percentile: float = 1.0
    upper_percentile: float = 50.0
    clip: tuple[float, float] = (0.0, 4.0)


@dataclass(frozen=True)
class Postprocessing:
    """Lesions from the probability map: the defaults a run starts from. `borders`: the lesion border growth
    settings (`samless.borders.BorderGrowth`), used unless a run says otherwise when `borders_by_default`."""

    threshold: float = 0.5
    min_lesion_mm3: float = 3.0
    connectivity: str = "full"
    borders: Mapping[str, Any] | None = None
    borders_by_default: bool = True

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"threshold": self.threshold, "min_lesion_mm3": self.min_lesion_mm3,
                               "connectivity": self.connectivity}
        if self.borders:
            out["borders"] = {**self.borders, **({} if self.borders_by_default else {"default": False})}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Postprocessing:
        """Its JSON form (the card's `postprocessing`, or a tuning's best.json: other keys are ignored)."""
        borders = dict(data.get("borders") or {})
        by_default = bool(borders.pop("default", True))
        kept = {k: data[k] for k in ("threshold", "min_lesion_mm3", "connectivity") if k in data}
        return cls(**kept, borders=borders or None, borders_by_default=by_default)

    def updated(self, data: Mapping[str, Any] | None) -> Postprocessing:
        """These settings with those of `data` (JSON form) on top; borders are replaced, not merged."""
        return Postprocessing.from_json({**self.to_json(), **(data or {})})


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int | None = None


# Top-level card keys with a typed home; any other key travels in `ModelCard.extra` untouched.
_DESCRIPTIVE = ("description", "intended_use", "license", "created", "weights_dtype")


@dataclass(frozen=True)
class ModelCard:
    """A model package's card. Build one in code, or read one with `from_json` (which validates it)."""

    name: str
    architecture: NetConfig
    inputs: Inputs = Inputs()
    normalization: Normalization = Normalization()
    postprocessing: Postprocessing = Postprocessing()
    files: Mapping[str, FileEntry] = field(default_factory=dict)
    description: str = ""
    intended_use: str | None = None
    license: str | None = None
    created: str | None = None
    weights_dtype: str | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)  # e.g. "demo", "training_data"

    @property
    def schema_version(self) -> int:
        """The oldest schema that describes this card: a three-plane model needs 2, so a samless from before
        three-plane models refuses it instead of running it on its axial slices of the acquired grid."""
        return 2 if self.inputs.three_plane else 1

    def replace(self, **changes: Any) -> ModelCard:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": self.schema_version, "name": self.name, "architecture": self.architecture.to_dict(),
            "inputs": _plain(dataclasses.asdict(self.inputs)),
            "normalization": _plain(dataclasses.asdict(self.normalization)),
            "postprocessing": self.postprocessing.to_json(),
        }
        out.update({k: getattr(self, k) for k in _DESCRIPTIVE if getattr(self, k) not in (None, "")})
        out.update({k: _plain(getattr(self, k)) for k in ("provenance", "metrics") if getattr(self, k)})
        out.update(_plain(self.extra))
        out["files"] = {n: {k: v for k, v in dataclasses.asdict(f).items() if v is not None}
                        for n, f in self.files.items()}
        return out

    @classmethod
    def from_json(cls, data: Any, source: str | Path = CARD_NAME, *, require_files: bool = True) -> ModelCard:
        """A card read from its JSON form; raise SamlessError naming the first problem (`source` says where).
        A training checkpoint's card lists no files yet (`require_files=False`)."""
        if not isinstance(data, dict):
            raise SamlessError(f"{source}: {CARD_NAME} must hold a JSON object.")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise SamlessError(f"{source}: {CARD_NAME} lacks {', '.join(missing)}; re-export the package.")
        version = data["schema_version"]
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise SamlessError(f"{source}: package schema version {version!r} is newer than this samless reads "
                               f"({SCHEMA_VERSION}); upgrade samless.")
        files = _files(data["files"], source, require_files)
        inputs = _inputs(data["inputs"], source)
        try:
            architecture = NetConfig.from_dict(data["architecture"])
        except (ValueError, TypeError) as exc:
            raise SamlessError(f"{source}: bad architecture in {CARD_NAME}: {exc}") from None
        if inputs.channels != architecture.in_channels:
            raise SamlessError(f"{source}: {len(inputs.modalities)} modalities x {2 * inputs.context_slices + 1} "
                               f"slices listed but the network takes {architecture.in_channels} channels.")
        try:
            normalization = Normalization(**{**data["normalization"],
                                             "clip": tuple(data["normalization"].get("clip", (0.0, 4.0)))})
            postprocessing = Postprocessing.from_json(data["postprocessing"])
        except TypeError as exc:
            raise SamlessError(f"{source}: {CARD_NAME} has a setting this samless does not know ({exc}).") from None
        known = {*REQUIRED_KEYS, *_DESCRIPTIVE, "provenance", "metrics"}
        return cls(name=str(data["name"]), architecture=architecture, inputs=inputs, normalization=normalization,
                   postprocessing=postprocessing, files=files, provenance=data.get("provenance") or {},
                   metrics=data.get("metrics") or {}, extra={k: v for k, v in data.items() if k not in known},
                   **{k: data.get(k) for k in _DESCRIPTIVE if k != "description"},
                   description=data.get("description") or "")


def _files(files: Any, source: str | Path, required: bool) -> dict[str, FileEntry]:
    if not isinstance(files, dict):
        raise SamlessError(f"{source}: files in {CARD_NAME} must be an object; re-export the package.")
    if required and WEIGHTS_NAME not in files and ONNX_NAME not in files:
        raise SamlessError(f"{source}: the package has neither {WEIGHTS_NAME} nor {ONNX_NAME}.")
    for name, meta in files.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
            raise SamlessError(f"{source}: files.{name} in {CARD_NAME} has no sha256; re-export the package.")
    return {name: FileEntry(meta["sha256"], meta.get("bytes")) for name, meta in files.items()}


def _inputs(data: Any, source: str | Path) -> Inputs:
    if not isinstance(data, dict):
        raise SamlessError(f"{source}: inputs in {CARD_NAME} must be an object.")
    for key in ("modalities", "slicing_axis", "spacing_mm", "planes"):
        if key not in data:
            raise SamlessError(f"{source}: inputs.{key} is missing from {CARD_NAME}.")
    try:
        inputs = Inputs(**{**data, **{k: tuple(data[k]) for k in ("modalities", "planes", "spacing_mm")}})
    except TypeError as exc:
        raise SamlessError(f"{source}: inputs in {CARD_NAME} has a setting this samless does not know "
                           f"({exc}).") from None
    problem = inputs.problem()
    if problem:
        raise SamlessError(f"{source}: {problem}")
    return inputs


def _plain(value: Any) -> Any:
    """JSON's own types: tuples to lists, mappings to dicts (recursively)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
