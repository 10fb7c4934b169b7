"""Phase 1 (SAM-guided prompt learning) and phase 2 (SAM-free aggregator) training.

Phase 1: the learner's dense embedding goes, with frozen SAM's image embedding, into SAM's frozen
mask decoder; Dice+CE on SAM's mask trains the learner only. Phase 2: SAM is gone; the aggregator
maps the learner's embedding to mask logits, and both are trained (the learner optionally frozen).

One loop serves both phases. Runs are seeded and repeatable; `resume` continues exactly from the
last epoch's checkpoint (weights, optimizer, schedule, scaler, RNG). Under torchrun the loop is
data-parallel (DDP): every rank takes its share of each epoch's samples; rank 0 logs and saves.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from samless.backends import ModuleBackend, pick_torch_device
from samless.card import ModelCard
from samless.errors import SamlessError
from samless.imageio import csv_text, write_text
from samless.modeling import LesionProbability, build_model
from samless.package import WEIGHTS_NAME, ModelPackage, load_package, resolve_model, sha256_bytes
from samless.pipeline import Segmenter, SegmentOptions, load_inputs
from samless.preprocess import centre_slice
from samless.training.checkpoint import (
    is_checkpoint,
    load_checkpoint_info,
    load_model_weights,
    restore_checkpoint,
    save_checkpoint,
)
from samless.training.config import (
    RESUMABLE_CHANGES,
    AugmentConfig,
    TrainConfig,
    run_settings,
)
from samless.training.data import SliceDataset, epoch_plan, prepare_case
from samless.training.split import check_cases, check_soft_masks, split_cases


def split_sha256(path: str | os.PathLike) -> str:
    """The split file's fingerprint ("" when it is not there): what it lists, wherever it is kept."""
    return sha256_bytes(Path(path).read_bytes()) if Path(path).is_file() else ""


def check_same_run(info: dict[str, Any], config: TrainConfig, out: Path) -> None:
    """Refuse to resume a run (its checkpoint's `info`) with settings that change what it computes (another
    --lr, --cpu-bf16...). The split file may have moved (another disk or machine) if its contents have not."""
    saved, now = run_settings(info["config"]), dataclasses.asdict(config)
    moved = {"split"} if info.get("split_sha256") and split_sha256(config.split) == info["split_sha256"] else set()
    changed = [k for k in now if k not in (*RESUMABLE_CHANGES, *moved) and now[k] != saved.get(k)]
    if changed:
        listing = "; ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise SamlessError(f"{out} was run with other settings than this resume gives ({listing}). `--resume` "
                           "with just --out continues it as it was; to change them, start a new run"
                           + (" from its checkpoint (--init)." if config.phase == 2 else "."))


# --- distributed set-up ----------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


# --- the phases' models and losses -----------------------------------------------------------------

class SAMGuided(torch.nn.Module):
    """Phase 1's model: learner + frozen SAM teacher -> lesion probability (B,1,S,S)."""

    def __init__(self, learner: torch.nn.Module, teacher: torch.nn.Module, context: int = 0):
        super().__init__()
        self.learner, self.teacher, self.context = learner, teacher, context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SAM sees the centre slice, at fp16 precision as the embedding cache stores it.
        emb = self.teacher.encode(centre_slice(x, self.context)).half().float()
        return torch.sigmoid(self.teacher.decode(emb, self.learner(x), x.shape[-1]))


def build_teacher(config: TrainConfig):
    from samless.training.sam import SAMTeacher, build_sam  # the only import of segment_anything

    return SAMTeacher(build_sam(config.sam_type, config.sam_checkpoint or None), len(config.modalities),
                      sparse_prompt=config.sparse_prompt)


def autocast_settings(config: TrainConfig, device: str) -> dict[str, Any]:
    """`torch.autocast` arguments: float16 on CUDA (with `amp`), bfloat16 on CPU (with `cpu_bf16`), else off."""
    kind = device.split(":")[0]
    if kind == "cuda":
        return {"device_type": "cuda", "dtype": torch.float16, "enabled": config.amp}
    return {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": kind == "cpu" and config.cpu_bf16}


def make_loss(phase: int, kind: str = "dice_ce") -> torch.nn.Module:
    """Dice + cross-entropy. `dice_ce` pools Dice over the batch, so a big lesion outweighs a small one;
    `dice_ce_slice` averages it over slices (lesion class only, smoothed by 1 so a lesion-free slice still
    asks for an empty output), so a slice's one small lesion counts as much as another's large one;
    `dice_ce_lesion` is `dice_ce_slice` with cross-entropy weighted per lesion (`lesion_weights`), so a
    missed 5-voxel lesion costs about as much as a missed 50-voxel one's border.
    A soft target (`--soft-labels`: a lesion fraction) goes to cross-entropy as it is, to Dice as its >= 0.5 part."""
    from monai.losses import DiceCELoss

    per_slice = kind in ("dice_ce_slice", "dice_ce_lesion")
    options = dict(batch=not per_slice, smooth_nr=1.0 if per_slice else 1e-5, smooth_dr=1.0 if per_slice else 1e-5)
    weighted = kind == "dice_ce_lesion"
    if phase == 1:
        return LesionLoss(DiceCELoss(sigmoid=True, **options), weighted)  # SAM's single mask logit
    # The aggregator's two classes; per slice, the background's Dice (always near 1) would only dilute it.
    return LesionLoss(DiceCELoss(softmax=True, include_background=not per_slice, **options), weighted)


def lesion_weights(mask: torch.Tensor, reference_px: float = 100.0, most: float = 10.0) -> torch.Tensor:
    """Per-pixel cross-entropy weights for a (B,1,H,W) target: 1 on background; on each lesion (a connected
    region of the slice's >= 0.5 part) sqrt(reference_px / its size), between 1 and `most`. Lesions of the
    same slice are weighed apart, so a small one beside a large one is not drowned out (as in blob loss)."""
    from scipy import ndimage

    hard = (mask >= 0.5).cpu().numpy()
    weights = np.ones(hard.shape, np.float32)
    for index in np.ndindex(hard.shape[:2]):
        labels, count = ndimage.label(hard[index], structure=np.ones((3, 3)))
        if count:
            sizes = np.bincount(labels.ravel())[1:].astype(np.float32)
            per_lesion = np.clip(np.sqrt(reference_px / sizes), 1.0, most)
            weights[index] = np.concatenate([[1.0], per_lesion])[labels]
    return torch.from_numpy(weights).to(mask.device)


class LesionLoss(torch.nn.Module):
    """A MONAI `DiceCELoss` against a (B,1,H,W) lesion target. Two-class logits get the target as (background,
    lesion) probabilities. Cross-entropy takes the target as it is and Dice its >= 0.5 part: the same for a
    0/1 mask, while a soft target's partial-volume rim would make soft Dice draw lesions too large.
    `weighted`: cross-entropy weighted per pixel by `lesion_weights` (a weighted mean)."""

    def __init__(self, loss: torch.nn.Module, weighted: bool = False):
        super().__init__()
        self.loss = loss
        self.weighted = weighted

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # DiceCELoss's own parts (its forward adds the same two), each given its target.
        hard = self._classes(logits, (mask >= 0.5).to(mask.dtype))
        soft = self._classes(logits, mask)
        ce = self._weighted_ce(logits, soft, lesion_weights(mask)) if self.weighted else (
            self.loss.ce(logits, soft) if logits.shape[1] > 1 else self.loss.bce(logits, soft))
        return self.loss.lambda_dice * self.loss.dice(logits, hard) + self.loss.lambda_ce * ce

    @staticmethod
    def _weighted_ce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] > 1:
            per_pixel = torch.nn.functional.cross_entropy(logits, target, reduction="none").unsqueeze(1)
        else:
            per_pixel = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return (per_pixel * weights).sum() / weights.sum()

    @staticmethod
    def _classes(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([1 - mask, mask], dim=1) if logits.shape[1] == 2 else mask


def widen_input(weights: dict[str, torch.Tensor], target: dict[str, torch.Tensor], slices: int
                ) -> dict[str, torch.Tensor]:
    """Weights of a single-slice network fitted to a `slices`-slice (2.5D) one: an input convolution
    taking C channels becomes one taking C * slices, the centre slice's channels keep the old weights and
    the neighbours' start at zero, so the widened network computes exactly what the old one did."""
    out = dict(weights)
    for key, w in weights.items():
        t = target.get(key)
        if (slices > 1 and t is not None and w.ndim == 4 and t.ndim == 4 and t.shape[1] == w.shape[1] * slices
                and t.shape[0] == w.shape[0] and t.shape[2:] == w.shape[2:]):
            wide = torch.zeros_like(t)
            wide[:, slices // 2::slices] = w  # channel m * slices + centre
            out[key] = wide
    return out


def package_weights(model: str) -> tuple[dict[str, torch.Tensor], ModelPackage]:
    """The float32 weights of a model package (a folder, .zip or bundled name such as samless-demo; its
    files checked against their sha256), and the package."""
    try:
        package = load_package(resolve_model(model))
    except SamlessError as exc:  # callers take a checkpoint too: say so, and spot a run folder given for one
        run = Path(model) / "checkpoints"
        hint = f" It holds a run: give {run / 'best'} or {run / 'last'}." if run.is_dir() else ""
        raise SamlessError(f"{model} is neither a training checkpoint (a folder holding state.json) nor a usable "
                           f"model package: {exc}{hint}") from None
    if WEIGHTS_NAME not in package.files:
        raise SamlessError(f"model package {package.source} has no {WEIGHTS_NAME} (ONNX only), so there are no "
                           "weights to train or average; export the package again from its checkpoint.")
    return {k: v.float() if v.is_floating_point() else v for k, v in package.state_dict().items()}, package


def package_identity(package: ModelPackage) -> dict[str, Any]:
    """What a run keeps of a package it started from or averaged: the package may change or go later."""
    return {"name": package.name, "source": str(package.source),
            "weights_sha256": package.card.files[WEIGHTS_NAME].sha256,
            "provenance": dict(package.card.provenance)}


def check_package_inputs(package: ModelPackage, card: ModelCard) -> None:
    """A package fine-tuned by a run must have been given its input as the run gives it (the same
    modalities, spacing, slicing axis, normalisation and context slices, or none to widen) and be the run's
    network (or one lacking only the detail branch)."""
    ours, theirs = card, package.card
    for key in ("modalities", "spacing_mm", "slicing_axis", "normalization"):
        mine, its = ((c.normalization if key == "normalization" else getattr(c.inputs, key)) for c in (ours, theirs))
        if mine != its:
            raise SamlessError(f"model package {package.source} was trained with {key} {_shown(its)}, this run "
                               f"gives {_shown(mine)}; fine-tune it with the inputs it was made for.")
    # A single-slice package may start a 2.5D run (`widen_input`), not the other way round.
    k_theirs, k_ours = theirs.inputs.context_slices, ours.inputs.context_slices
    if k_theirs not in (0, k_ours):
        raise SamlessError(f"model package {package.source} reads {k_theirs} neighbouring slice(s) a side, this run "
                           f"{k_ours}; pass --context-slices {k_theirs}.")
    # Its network: the same, or one a detail branch (starting at zero) is added to.
    arch_theirs, arch_ours = theirs.architecture.to_dict(), ours.architecture.to_dict()
    detail_added = (arch_theirs["aggregator"], arch_ours["aggregator"]) == ("conv_upsample", "conv_upsample_detail")
    differs = [k for k in arch_ours if k != "in_channels" and arch_theirs[k] != arch_ours[k]
               and not (k == "aggregator" and detail_added)]
    if differs:
        listing = ", ".join(f"{k} {arch_theirs[k]} (this run {arch_ours[k]})" for k in differs)
        raise SamlessError(f"model package {package.source} is another network: {listing}; give the --model and "
                           "--aggregator that build it.")


def _shown(value: Any) -> Any:
    """A card setting as its JSON form reads (lists, dicts), for messages."""
    if dataclasses.is_dataclass(value):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(value).items()}
    return list(value) if isinstance(value, tuple) else value


# --- the trainer -----------------------------------------------------------------------------------

def keep_freed_memory_for_reuse() -> bool:
    """On glibc, keep freed blocks of any size in the heap for the next allocation (True where applied).

    A training step allocates and frees activations of tens of MB (LiteMedSAM's stem works at 256 x 256 x
    256 channels); glibc maps each such block afresh and the kernel zero-fills every page again, so half the
    CPU time went to page faults. A high mmap and trim threshold (what MALLOC_MMAP_THRESHOLD_ and
    MALLOC_TRIM_THRESHOLD_ set) keeps them; memory peaks as before. bench_training.py --allocator measures it.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl, ...): its allocator as it is
        return False


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False, stop_after: int | None = None):
        self.config = config
        self.resume = resume  # continue config.out from its last checkpoint
        self.stop_after = stop_after  # end this invocation once that many epochs are done (resume later)
        self.split_sha256 = split_sha256(config.split)  # kept in each checkpoint: the split may move, not change
        self.device = pick_torch_device(config.device)
        if self.device == "cpu":
            keep_freed_memory_for_reuse()
        self.dist = init_distributed(self.device)
        if self.device == "cuda":
            torch.cuda.set_device(self.dist.local_rank)
            self.device = f"cuda:{self.dist.local_rank}"
        self.out = Path(config.out)
        self.card = config.card()
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        self.net = build_model(config.net_config())
        self.teacher = build_teacher(config).to(self.device) if config.phase == 1 else None
        self.teacher_sha256 = (sha256_bytes(Path(config.sam_checkpoint).read_bytes())
                               if config.phase == 1 and config.sam_checkpoint else "")
        self.init_package: dict[str, Any] | None = None  # what --init named, when it is a model package
        # A resumed run's weights come from its checkpoint: what --init named may have changed or gone since.
        started_whole = bool(config.init) and not resume and self._init_weights(config.init)
        # Whether the aggregator holds trained weights (phase 1 leaves the one it started with untouched).
        self.aggregator_trained = config.phase == 2 or started_whole
        # channels-last convolutions: the same arithmetic up to rounding, ~1.4x faster steps on a CPU (and the
        # layout CUDA's tensor cores want). Checkpoints are saved contiguous: nothing outside training sees it.
        self.net.to(self.device, memory_format=torch.channels_last)
        self.trainable = self.net.learner if config.phase == 1 else self.net
        if config.phase == 2 and not config.finetune_learner:
            self.net.learner.requires_grad_(False)
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        self.model = self.trainable
        if self.dist.world > 1:
            ids = [self.dist.local_rank] if self.device.startswith("cuda") else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.trainable, device_ids=ids)
        self.optimizer = self._optimizer(params)
        self.steps_per_epoch = math.ceil(config.samples_per_epoch / (config.batch_size * self.dist.world
                                                                     * config.grad_accum))
        self.scheduler = self._scheduler()
        self.autocast = autocast_settings(config, self.device)
        # float16 needs loss scaling; bfloat16 does not
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast["dtype"] == torch.float16
                                           and self.autocast["enabled"])
        self.loss_fn = make_loss(config.phase, config.loss)
        self.cache = None
        self.epoch, self.best, self.history = 0, -1.0, []

    def _init_weights(self, checkpoint: str) -> bool:
        """Start from a checkpoint: a phase-1 one gives its learner (its aggregator was never trained, unless
        that run itself started from a trained network); a phase-2 one, or a model package, gives the whole
        network, to fine-tune it on new data or continue with a new schedule. A single-slice network starts a
        2.5D one (--context-slices) unchanged: see `widen_input`. True when the whole network was taken."""
        if is_checkpoint(checkpoint):
            weights = load_model_weights(checkpoint)
            info = load_checkpoint_info(checkpoint)
            # A phase-1 run started from a trained network kept that network's aggregator: it comes along.
            whole = info.get("phase") == 2 or bool(info.get("aggregator_trained"))
        else:
            weights, package = package_weights(checkpoint)
            check_package_inputs(package, self.card)
            self.init_package, whole = package_identity(package), True
        if not whole:
            weights = {k[len("learner."):]: v for k, v in weights.items() if k.startswith("learner.")}
        target = self.net if whole else self.net.learner
        weights = widen_input(weights, target.state_dict(), 2 * self.config.context_slices + 1)
        try:
            # A detail branch the checkpoint lacks keeps its zero start (ConvUpsample -> ConvUpsampleDetail).
            result = target.load_state_dict(weights, strict=False)
            if result.unexpected_keys or any(not k.startswith("aggregator.detail.") for k in result.missing_keys):
                target.load_state_dict(weights)  # raises, naming what is missing
        except RuntimeError as exc:
            raise SamlessError(f"{checkpoint}: its weights do not fit the model {self.config.model} / "
                               f"{self.config.aggregator} ({str(exc).splitlines()[1].strip()}); use the same "
                               "--model (and --aggregator) as the run that made it.") from None
        return whole

    def _optimizer(self, params) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)

    def _scheduler(self):
        total = max(1, self.config.epochs * self.steps_per_epoch)
        if self.config.schedule == "poly":
            return torch.optim.lr_scheduler.PolynomialLR(self.optimizer, total_iters=total, power=0.9)
        if self.config.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total)
        return torch.optim.lr_scheduler.ConstantLR(self.optimizer, factor=1.0, total_iters=0)

    # -- data --

    def load_data(self) -> None:
        c = self.config
        cache_dir = Path(c.data_cache) if c.data_cache else self.out / "cache"
        train_cases = split_cases(c.split, "train", c.modalities, c.fold)
        self.val_cases = split_cases(c.split, "val", c.modalities, c.fold)
        if c.val_max_cases:
            self.val_cases = self.val_cases[:c.val_max_cases]
        check_cases(train_cases)
        if c.soft_labels:
            check_soft_masks(train_cases, c.split)
        check_cases(self.val_cases, require_lesions=False)
        # Rank 0 prepares and caches first; the others then read its cache.
        def prepare_all() -> list:
            return [prepare_case(case, self.card, cache_dir, plane, soft=c.soft_labels)
                    for case in train_cases for plane in self.card.inputs.planes]

        if self.dist.main:
            self.train_data = prepare_all()
        self.dist.barrier()
        if not self.dist.main:
            self.train_data = prepare_all()
        if c.phase == 1 and c.embedding_cache:
            from samless.training.embedding_cache import EmbeddingCache

            plain = self.card.to_json()
            identity = {"sam_type": c.sam_type, "sam_checkpoint": _file_identity(c.sam_checkpoint),
                        "inputs": plain["inputs"], "normalization": plain["normalization"],
                        "input_size": self.card.architecture.input_size}
            aug = c.augment_config() or AugmentConfig()
            self.cache = EmbeddingCache(c.embedding_cache, identity,
                                        {d.id: d.mask.shape[0] for d in self.train_data}, aug.variants())

    def loader(self, epoch: int) -> torch.utils.data.DataLoader:
        c = self.config
        plan = epoch_plan(self.train_data, self.steps_per_epoch * c.batch_size * c.grad_accum * self.dist.world,
                          c.pos_fraction, c.seed, epoch, c.sampling)
        plan = plan[self.dist.rank::self.dist.world]
        dataset = SliceDataset(self.train_data, plan, self.card.architecture.input_size,
                               c.augment_config(), cache_friendly=self.cache is not None, context=c.context_slices,
                               patch=c.patch_size, soft_labels=c.soft_labels)
        return torch.utils.data.DataLoader(dataset, batch_size=c.batch_size, shuffle=False, num_workers=c.workers,
                                           drop_last=True, persistent_workers=False)

    # -- one step --

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        image = batch["image"].to(self.device, non_blocking=True, memory_format=torch.channels_last)
        mask = batch["mask"].to(self.device, non_blocking=True)
        with torch.autocast(**self.autocast):
            if self.config.phase == 2:
                return self.loss_fn(self.model(image).float(), mask)
            sam_image = batch["sam_image"].to(self.device, non_blocking=True)
            emb = self.sam_embeddings(batch, sam_image)
            logits = self.teacher.decode(emb, self.model(image), image.shape[-1])
            return self.loss_fn(logits.float(), mask)

    def sam_embeddings(self, batch: dict[str, Any], sam_image: torch.Tensor) -> torch.Tensor:
        """SAM's image embeddings (fp16 precision), from the cache when there is one."""
        if self.cache is None:
            return self.teacher.encode(sam_image).half().float()
        ids = [self.train_data[int(i)].id for i in batch["case"]]
        emb = self.cache.fetch(ids, [int(s) for s in batch["slice"]], [int(v) for v in batch["variant"]],
                               sam_image, self.teacher.encode)
        return emb.to(self.device)

    # -- the loop --

    def fit(self) -> Path:
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        last = self.out / "checkpoints" / "last"
        if self.resume:
            if not last.exists():
                raise SamlessError(f"nothing to resume: {last} does not exist.")
            # Before anything is restored or written: another network would not even load.
            check_same_run(load_checkpoint_info(last), c, self.out)
            info = restore_checkpoint(last, self.net, self.optimizer, self.scheduler, self.scaler)
            self.epoch, self.best, self.history = info["epoch"] + 1, info["best"], info["history"]
            self.init_package = info.get("init_package")  # the package trained from, not what its name holds now
            self.aggregator_trained = c.phase == 2 or bool(info.get("aggregator_trained"))
        elif (self.out / "checkpoints").exists():  # a run, or an average (which holds only best)
            raise SamlessError(f"{self.out} already holds checkpoints; pass --resume to continue its run or choose "
                               "another --out.")
        self.load_data()
        writer = self._writers()
        end = c.epochs if self.stop_after is None else min(c.epochs, max(self.stop_after, self.epoch))
        for epoch in range(self.epoch, end):
            tick = time.perf_counter()
            train_loss = self.train_epoch(epoch)
            row = {"epoch": epoch, "train_loss": train_loss, "lr": self.optimizer.param_groups[0]["lr"],
                   "seconds": round(time.perf_counter() - tick, 2)}
            if c.val_every and ((epoch + 1) % c.val_every == 0 or epoch + 1 == c.epochs):
                row.update(self.validate())
            self.epoch = epoch
            if self.dist.main:
                self._log(row, writer)
                self._save(row)
            self.dist.barrier()
        if writer:
            writer.close()
        return self.out / "checkpoints" / "best"

    def train_epoch(self, epoch: int) -> float:
        from tqdm import tqdm

        self.trainable.train()
        losses = []
        bar = tqdm(self.loader(epoch), desc=f"phase {self.config.phase} epoch {epoch}", leave=False,
                   disable=not self.dist.main or not os.isatty(2))
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar):
            loss = self.loss(batch)
            self.scaler.scale(loss / self.config.grad_accum).backward()
            if (i + 1) % self.config.grad_accum == 0:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        return float(np.mean(losses)) if losses else float("nan")

    def inference_module(self) -> torch.nn.Module:
        """What validation runs: the network alone (phase 2) or learner + SAM (phase 1)."""
        if self.config.phase == 1:
            return SAMGuided(self.net.learner, self.teacher, self.config.context_slices)
        return LesionProbability(self.net)

    def validate(self) -> dict[str, float]:
        """Volumetric validation through the same engine as `samless segment` (rank 0; others wait)."""
        if not self.dist.main or not self.val_cases:
            return {}
        from samless.training.metrics import case_metrics

        segmenter = Segmenter(self.card, ModuleBackend(self.inference_module(), self.device.split(":")[0]))
        rows = []
        for case in self.val_cases:
            result = segmenter.segment(load_inputs(case.images, self.config.modalities), SegmentOptions())
            rows.append(case_metrics(result.label, case.mask))
        self.trainable.train()
        return {f"val_{k}": float(np.nanmean([r[k] for r in rows])) for k in ("dice", "lesion_f1")}

    # -- logging and checkpoints (rank 0) --

    def _writers(self):
        if not self.dist.main:
            return None
        (self.out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(self.config), sort_keys=False),
                                              encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def _log(self, row: dict[str, Any], writer) -> None:
        self.history.append(row)
        write_text(csv_text(self.history), self.out / "log.csv")  # atomic: a crash keeps the last log
        if writer:
            for key, value in row.items():
                if key != "epoch":
                    writer.add_scalar(key, value, row["epoch"])

    def _save(self, row: dict[str, Any]) -> None:
        score = row.get("val_dice", -1.0)
        improved = "val_dice" in row and score > self.best
        if improved:
            self.best = score
        info = {"epoch": row["epoch"], "best": self.best, "history": self.history, "phase": self.config.phase,
                "config": dataclasses.asdict(self.config), "card": self.card.to_json(),
                "split_sha256": self.split_sha256}
        if self.init_package:  # the package may change or go; its identity and history stay with the run
            info["init_package"] = self.init_package
        if self.teacher_sha256:
            info["teacher_sha256"] = self.teacher_sha256
        if self.config.phase == 1 and self.aggregator_trained:
            info["aggregator_trained"] = True
        # The whole network is saved (in phase 1 the aggregator is untouched): phase 2 and export read it.
        save_checkpoint(self.out / "checkpoints" / "last", self.net, self.optimizer, self.scheduler,
                        self.scaler, **info)
        if improved or not (self.out / "checkpoints" / "best").exists():
            save_checkpoint(self.out / "checkpoints" / "best", self.net, None, **info)


def _file_identity(path: str) -> str:
    if not path:
        return "random-weights"
    stat = Path(path).stat()
    return f"{Path(path).name}:{stat.st_size}:{stat.st_mtime_ns}"


def train(config: TrainConfig, resume: bool = False, stop_after: int | None = None) -> Path:
    """Run one phase (or, with `stop_after`, its epochs up to that count: a chunk that `resume` continues with
    the same schedule); return the best checkpoint folder."""
    trainer = Trainer(config, resume, stop_after)
    try:
        return trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

