"""A training run's settings (`TrainConfig`), saved as config.yaml in its folder, and the `samless train` options
generated from them: each setting's flag and help live in its field's metadata. No torch here, so that the
`samless` command line builds without importing it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from samless.card import PLANES, Inputs, ModelCard, NetConfig, resolve_config
from samless.errors import SamlessError
from samless.training.teachers import SAM_TYPES, SPARSE_PROMPTS, teacher_help

LOSSES = ("dice_ce", "dice_ce_slice", "dice_ce_lesion")
SAMPLING = ("case", "slice")
PHASE_EPOCHS = {1: 200, 2: 100}  # the paper's: 200 epochs of phase 1, then 100 of phase 2


def option(default: Any = dataclasses.MISSING, help: str | dict[int, str] = "", *, factory: Any = None,
           cli: bool = True, flag: str | None = None, phases: tuple[int, ...] = (1, 2), choices: Any = None,
           metavar: str | None = None, inverted: bool = False, parse: Any = None) -> Any:
    """A TrainConfig field and its `samless train` option: `flag` (default --field-name), `help` (one text, or
    one a phase), the `phases` that offer it, `choices`; a bool is an on/off switch, `inverted` when the flag
    says the opposite of the field (--freeze-learner sets finetune_learner false); `parse` turns the flag's
    text into the value (default: the field's type); `cli=False`: no option."""
    metadata = {"cli": cli, "help": help, "flag": flag, "phases": phases, "choices": choices, "metavar": metavar,
                "inverted": inverted, "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class AugmentConfig:
    """What varies between samples. Geometric variants are discrete so SAM embeddings can be cached."""

    flip: float = 0.5  # left-right flip probability
    rot90: float = 0.0  # probability of a random quarter turn (k in 1..3)
    affine: float = 0.3  # probability of a small rotation/scale (not with the embedding cache)
    rotate_deg: float = 10.0
    scale: float = 0.1
    intensity: float = 0.8  # probability of each intensity change (contrast, bias field, noise, scale)

    def variants(self) -> int:
        """How many discrete geometric variants exist (flip x quarter turns)."""
        return (2 if self.flip > 0 else 1) * (4 if self.rot90 > 0 else 1)



@dataclass
class TrainConfig:
    """Everything a run depends on; saved as config.yaml in the run folder so it can be repeated. The
    `samless train` options are made from these fields (`cli_options`, `cli_settings`)."""

    phase: int
    split: str = option(help="split file (MS-SAMLess format)")
    out: str = option(help="run folder: checkpoints, log.csv, tensorboard/, config.yaml")
    fold: int = option(0)
    model: str = option("hardnet39ds_256", "network preset (hardnet39ds_256, hardnet68_512, hardnet85_512)")
    input_size: int = option(0, cli=False)  # 0 = the preset's
    embed_size: int = option(0, cli=False)  # 0 = the preset's (phase 1 needs 64: SAM's embedding grid)
    aggregator: str = option("conv_upsample", {
        1: "the aggregator of the --init network (see phase2 --aggregator)",
        2: "conv_upsample (the paper's), conv_upsample_detail (plus a detail branch on a 2-pixel grid) or "
           "transposed_conv (AutoSAM's)"})
    modalities: list[str] = option(factory=lambda: ["FLAIR"], help="comma-separated, in channel order (default FLAIR)",
                                   parse=lambda text: text.split(","))
    spacing_mm: list[float] = option(factory=lambda: [1.0, 1.0], flag="--spacing", metavar="MM",
                                     parse=lambda text: [float(text)] * 2,
                                     help="in-plane spacing in mm, both axes (default 1.0)")
    slicing_axis: str = option("axial", cli=False)
    three_plane: bool = option(False, "train on axial, coronal and sagittal slices of isotropic volumes; `samless "
                               "segment` then fuses the three planes' predictions")
    context_slices: int = option(0, "neighbouring slices a side given as extra channels (2.5D input; default 0 = "
                                 "single slices as in the paper)")
    epochs: int = option(0, {1: f"default {PHASE_EPOCHS[1]}", 2: f"default {PHASE_EPOCHS[2]}"})  # 0: the phase's
    samples_per_epoch: int = option(1024)
    batch_size: int = option(8)
    optimizer: str = option("sgd", choices=("sgd", "adamw"))
    lr: float = option(0.01)
    momentum: float = option(0.9, cli=False)
    weight_decay: float = option(1e-4, cli=False)
    schedule: str = option("poly", choices=("poly", "cosine", "constant"))
    grad_accum: int = option(1)
    amp: bool = option(True, "float16 mixed precision on CUDA (default on; --no-amp: full precision)")
    cpu_bf16: bool = option(False, "bfloat16 mixed precision on CPU: faster steps on CPUs with bfloat16 instructions "
                            "(AVX512-BF16, AMX); not bit-identical to full precision")
    seed: int = option(0)
    workers: int = option(2)
    pos_fraction: float = option(0.85)
    sampling: str = option("case", "case (default): every case equally often, so thick-slice scans are not "
                           "outnumbered by isotropic ones; slice: every slice equally often", choices=SAMPLING)
    loss: str = option("dice_ce", "dice_ce: Dice over the batch (default); dice_ce_slice: Dice per slice, which "
                       "weighs small lesions more; dice_ce_lesion: as dice_ce_slice, with cross-entropy weighted "
                       "per lesion so that a small lesion's pixels count more")
    soft_labels: bool = option(False, "cross-entropy towards each case's soft_mask (the lesion's partial-volume "
                               "fraction, 0..1; `samless phantom --soft-masks` writes them) instead of its 0/1 "
                               "mask; Dice takes the fraction's >= 0.5 part")
    augment: dict[str, float] = option(factory=dict, cli=False)  # AugmentConfig fields; {"off": 1} for none
    val_every: int = option(1)  # epochs between validations (and after the last); 0 = never
    val_max_cases: int = option(0)  # 0 = all validation cases
    device: str = option("auto", choices=("auto", "cpu", "cuda", "mps"))
    data_cache: str = option("", "folder for preprocessed volumes (default OUT/cache)")
    # phase 1
    sam_type: str = option("vit_b", f"the frozen teacher (default vit_b): {teacher_help()}", phases=(1,),
                           choices=SAM_TYPES, metavar="TEACHER")
    sam_checkpoint: str = option("", "the teacher's checkpoint (.pth or .safetensors): official SAM or MedSAM; "
                                 "lite_medsam defaults to the weights its package bundles", phases=(1,))
    sparse_prompt: str = option("none", "the teacher's sparse prompt beside the learner's dense one: none (default) "
                                "or a box round the whole slice (what LiteMedSAM expects)", phases=(1,),
                                choices=SPARSE_PROMPTS)
    embedding_cache: str = option("", "folder caching the teacher's encoder outputs (fp16, memory-mapped)",
                                  phases=(1,))
    # phase 2 (phase 1: a trained network whose learner it goes on training)
    init: str = option("", {
        1: "start the learner from a trained network: a phase-2 checkpoint or a model package (e.g. samless-demo); "
           "its aggregator rides along untouched, for phase 2 to fine-tune",
        2: "what to start from: a phase-1 checkpoint folder gives the learner; a phase-2 one, or a model package "
           "(folder, .zip or bundled name such as samless-demo), the whole network (fine-tuning)"})
    finetune_learner: bool = option(True, "train the aggregator only", flag="--freeze-learner", phases=(2,),
                                    inverted=True)
    patch_size: int = option(0, "train on patches of this many pixels around lesions instead of the whole input "
                             "window (e.g. 128 of 256: ~4x the samples per second on CPU)", phases=(2,))

    def __post_init__(self) -> None:
        if self.phase not in (1, 2):
            raise SamlessError(f"phase must be 1 or 2, not {self.phase}.")
        if not self.epochs:
            self.epochs = PHASE_EPOCHS[self.phase]
        if not isinstance(self.context_slices, int) or self.context_slices < 0:
            raise SamlessError(f"context_slices must be a whole number >= 0, not {self.context_slices!r}.")
        if self.optimizer not in ("sgd", "adamw"):
            raise SamlessError(f"optimizer must be sgd or adamw, not {self.optimizer!r}.")
        if self.loss not in LOSSES:
            raise SamlessError(f"loss must be one of {', '.join(LOSSES)}, not {self.loss!r}.")
        if self.sampling not in SAMPLING:
            raise SamlessError(f"sampling must be one of {', '.join(SAMPLING)}, not {self.sampling!r}.")
        if self.schedule not in ("poly", "cosine", "constant"):
            raise SamlessError(f"schedule must be poly, cosine or constant, not {self.schedule!r}.")
        if self.sparse_prompt not in SPARSE_PROMPTS:
            raise SamlessError(f"sparse_prompt must be one of {', '.join(SPARSE_PROMPTS)}, not {self.sparse_prompt!r}.")
        if self.sam_type not in SAM_TYPES:
            raise SamlessError(f"sam_type must be one of {', '.join(SAM_TYPES)}, not {self.sam_type!r}.")
        if self.phase == 1 and self.cpu_bf16:
            raise SamlessError("cpu_bf16 is for phase 2: phase 1's SAM embeddings (and their cache) are float32.")
        if self.phase == 1 and self.embedding_cache and self.augment.get("affine", 0):
            raise SamlessError("the embedding cache needs augment.affine = 0 (SAM's input must repeat).")
        if self.patch_size:
            self._check_patch()
        if self.phase == 1 and self.net_config().embed_size != 64:
            raise SamlessError("phase 1 needs embed_size 64: SAM's mask decoder takes 64 x 64 prompt embeddings.")

    def _check_patch(self) -> None:
        net = self.net_config()
        if self.phase == 1:
            raise SamlessError("patch_size is for phase 2 only: SAM (phase 1) sees the whole input window.")
        stride = net.input_size // net.embed_size
        if self.patch_size % 32 or not 0 < self.patch_size < net.input_size or stride not in (4, 8, 16, 32):
            raise SamlessError(f"patch_size must be a multiple of 32 below the input size ({net.input_size}), and "
                               f"the embedding stride a power of two >= 4; got {self.patch_size} (stride {stride}).")

    def net_config(self) -> NetConfig:
        try:
            base = resolve_config(self.model)
            return dataclasses.replace(base, in_channels=self.inputs().channels, aggregator=self.aggregator,
                                       input_size=self.input_size or base.input_size,
                                       embed_size=self.embed_size or base.embed_size)
        except ValueError as exc:
            raise SamlessError(str(exc)) from None

    def augment_config(self) -> AugmentConfig | None:
        if self.augment.get("off"):
            return None
        fields_ = {k: v for k, v in self.augment.items() if k != "off"}
        if self.phase == 1 and self.embedding_cache:
            fields_.setdefault("affine", 0.0)
        return AugmentConfig(**fields_)

    def inputs(self) -> Inputs:
        """The card's `inputs`: what the network is given."""
        return Inputs(modalities=tuple(self.modalities), spacing_mm=tuple(self.spacing_mm),
                      slicing_axis=self.slicing_axis, planes=PLANES if self.three_plane else (self.slicing_axis,),
                      context_slices=self.context_slices)

    def card(self) -> ModelCard:
        return ModelCard(name=Path(self.out).name, architecture=self.net_config(), inputs=self.inputs())

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides: Any) -> TrainConfig:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise SamlessError(f"{path}: unknown setting(s) {', '.join(unknown)}.")
        data = run_settings(data)  # so an old config.yaml repeats its run
        if isinstance(data.get("augment"), dict) and False in data["augment"]:  # YAML 1.1 reads `off:` as false
            data["augment"] = {("off" if k is False else k): v for k, v in data["augment"].items()}
        return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})


# Settings a run's config.yaml may predate, with the value such runs used where it is not today's default.
SETTINGS_BEFORE_THEY_EXISTED = {"sampling": "slice"}


def run_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run's settings, complete: each one its config predates as that run had it."""
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    return {**defaults, **SETTINGS_BEFORE_THEY_EXISTED, **saved}


# Settings a resumed run may change: where and with what it runs, and how often it is validated.
RESUMABLE_CHANGES = ("out", "device", "workers", "data_cache", "embedding_cache", "val_every", "val_max_cases")




# --- the command-line options, made from the fields ---------------------------------------------------------

_TYPES = {"int": int, "float": float, "str": str}


def cli_options(parser: Any, phase: int) -> None:
    """Add the options of `samless train phase<phase>`: one a setting, unset (None) unless given, so that a
    --config or a resumed run's setting stands where no flag says otherwise."""
    import argparse

    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta.get("cli") or phase not in meta["phases"]:
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        text = meta["help"].get(phase, "") if isinstance(meta["help"], dict) else meta["help"]
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=text or None)
        else:
            parser.add_argument(flag, dest=f.name, type=meta["parse"] or _TYPES[f.type], choices=meta["choices"],
                                metavar=meta["metavar"], help=text or None)


def cli_settings(args: Any, phase: int) -> dict[str, Any]:
    """The settings the options of `cli_options` gave (None: not given)."""
    out: dict[str, Any] = {"phase": phase}
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli") and phase in f.metadata["phases"]:
            value = getattr(args, f.name)
            out[f.name] = (not value) if f.metadata["inverted"] and value is not None else value
    return out
