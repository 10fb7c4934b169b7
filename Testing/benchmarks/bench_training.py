"""Training step cost, side by side in one run: phase 1 with and without the teacher's embedding cache, for
each teacher, and phase 2 in the trainer's memory layouts and precisions on a CPU.

Phase 1 runs the real SAM ViT-B architecture (random weights: timing does not depend on them) and
LiteMedSAM (its bundled pretrained weights). A step is: the teacher's image embeddings (computed, or read
from the fp16 memory-mapped cache), the learner forward, the teacher's frozen mask decoder, Dice+CE,
backward through decoder and learner, optimizer step.

    .venv/bin/python Testing/benchmarks/bench_training.py [--sam-type vit_b,lite_medsam] [--batch 2] [--steps 3]
    .venv/bin/python Testing/benchmarks/bench_training.py --phase2-only --batch 8 --context-slices 1 \
        --aggregator conv_upsample_detail        # the demo model's phase-2 step

Phase 2 is timed three ways: float32 with the default (contiguous) layout, float32 channels-last (what the
trainer uses), and channels-last with bfloat16 autocast (`--cpu-bf16`).

    .venv/bin/python Testing/benchmarks/bench_training.py --preparation   # the data cache of a three-plane run

`--preparation` prepares a 1 mm 182x218x182 head for a three-plane model as the trainer does (one cached
volume, three plane views) beside the former layout (one contiguous cache entry per plane): seconds, cache
megabytes, and milliseconds to read one 2.5D slice of each plane from the memory-mapped cache.

    .venv/bin/python Testing/benchmarks/bench_training.py --allocator     # glibc keeping freed memory

`--allocator` times LiteMedSAM's encoder and a phase-2 step in two fresh processes, one with glibc's
default allocator settings and one with the trainer's (`keep_freed_memory_for_reuse`), side by side.

Prints a Markdown table and writes benchmark_results/training.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from samless.modeling import build_model, resolve_config
from samless.training.train import make_loss

DEFAULT_OUT = "benchmark_results/training.json"


def timed(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    tick = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - tick) / steps


def phase1_rows(args: argparse.Namespace, config, sam_type: str) -> dict:
    """Phase-1 steps with the teacher's encoder run every step vs read from the embedding cache."""
    from samless.training.embedding_cache import EmbeddingCache
    from samless.training.sam import SAMTeacher, build_sam
    from samless.training.teachers import bundled_checkpoint

    size = config.input_size
    net = build_model(config)
    teacher = SAMTeacher(build_sam(sam_type, bundled_checkpoint(sam_type)), in_channels=1)
    image = torch.rand(args.batch, 1, size, size) * 2
    mask = (torch.rand(args.batch, 1, size, size) > 0.95).float()
    opt = torch.optim.SGD(net.learner.parameters(), lr=0.01, momentum=0.9)
    loss_fn = make_loss(1)
    cases = [f"case{i}" for i in range(args.batch)]

    def step(embeddings: torch.Tensor) -> None:
        loss = loss_fn(teacher.decode(embeddings, net.learner(image), size), mask)
        opt.zero_grad()
        loss.backward()
        opt.step()

    every, cached = f"phase 1 ({sam_type}), encoder every step", f"phase 1 ({sam_type}), embedding cache"
    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(tmp, {"bench": True}, {c: 1 for c in cases}, 1)
        cache.fetch(cases, [0] * args.batch, [0] * args.batch, image, teacher.encode)  # fill once
        rows = {
            every: timed(lambda: step(teacher.encode(image).half().float()), 1, args.steps),
            cached: timed(lambda: step(cache.fetch(cases, [0] * args.batch, [0] * args.batch, image,
                                                   teacher.encode)), 1, args.steps),
        }
    return {"seconds_per_step": rows, "cache_speedup": {sam_type: rows[every] / rows[cached]}}


def phase2_rows(args: argparse.Namespace, config) -> dict:
    """Phase-2 steps (the trainer's network, loss and AdamW) in each layout and precision, same weights."""
    channels = config.in_channels * (2 * args.context_slices + 1)
    config = dataclasses.replace(config, aggregator=args.aggregator, in_channels=channels)
    size = config.input_size
    image = torch.rand(args.batch, channels, size, size) * 2
    mask = (torch.rand(args.batch, 1, size, size) > 0.97).float()
    loss_fn = make_loss(2, "dice_ce_slice")
    start = build_model(config).state_dict()

    def make_step(layout: torch.memory_format, bf16: bool):
        net = build_model(config)
        net.load_state_dict(start)
        net.to(memory_format=layout).train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        x = image.contiguous(memory_format=layout)

        def step() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(net(x).float(), mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    rows = {name: timed(make_step(layout, bf16), 2, args.steps)
            for name, layout, bf16 in [("phase 2, float32", torch.contiguous_format, False),
                                       ("phase 2, float32 channels-last", torch.channels_last, False),
                                       ("phase 2, bfloat16 channels-last", torch.channels_last, True)]}
    base = rows["phase 2, float32"]
    return {"seconds_per_step": rows, "phase2_speedup": {k: base / v for k, v in rows.items()},
            "phase2": {"aggregator": args.aggregator, "context_slices": args.context_slices}}


def preparation_rows(args: argparse.Namespace) -> dict:
    """One three-plane case prepared as the trainer caches it (one volume, plane views) and, side by side, as
    it was cached before (a contiguous copy per plane)."""
    import sys

    import SimpleITK as sitk

    from samless.preprocess import to_slices, with_context
    from samless.training import data
    from samless.training.split import Case
    from samless.training.train import TrainConfig

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_inference import synthetic_head

    work = Path(tempfile.mkdtemp())
    head = synthetic_head()
    sitk.WriteImage(head, str(work / "flair.nii.gz"))
    sitk.WriteImage(sitk.Cast(head > 200, sitk.sitkUInt8), str(work / "mask.nii.gz"))
    case = Case("head", (work / "flair.nii.gz",), work / "mask.nii.gz")
    card = TrainConfig(phase=2, split="s.json", out="run", three_plane=True, context_slices=1).card()
    planes = card.inputs.planes

    def per_plane_entries(folder: Path) -> list:  # the former cache: each plane built and stored contiguous
        cases = []
        for plane in planes:
            arrays = data._build(case, card, False)
            data._store(folder / plane, {k: np.ascontiguousarray(to_slices(v, plane)) for k, v in arrays.items()})
            loaded = {n: np.load(folder / plane / f"{n}.npy", mmap_mode="r") for n in ("channels", "mask", "fg")}
            cases.append(data._finish(plane, card, **loaded))
        return cases

    layouts = {"one volume, plane views (now)": lambda folder: [data.prepare_case(case, card, folder, p)
                                                                for p in planes],
               "one entry per plane (before)": per_plane_entries}
    rows, rng = {}, np.random.default_rng(0)
    for name, build in layouts.items():
        folder = work / name.split(",")[0].replace(" ", "_")
        tick = time.perf_counter()
        cases = build(folder)
        seconds = time.perf_counter() - tick
        megabytes = sum(f.stat().st_size for f in folder.rglob("*.npy")) / 1e6
        reads = {}
        for plane, prepared in zip(planes, cases):
            picks = rng.integers(1, prepared.channels.shape[1] - 1, 200)
            def read(slices=prepared.channels, picks=picks) -> None:
                for i in picks:
                    np.ascontiguousarray(with_context(slices, int(i), 1))
            reads[plane] = timed(read, 1, 1) / len(picks) * 1e3
        rows[name] = {"seconds": seconds, "cache_mb": megabytes, "ms_per_slice": reads}
    return {"preparation": rows}


def allocator_child(args: argparse.Namespace, config, keep: bool) -> dict:
    """One process's timings (the allocator setting holds for a whole process, so each side gets its own)."""
    from samless.training.sam import SAMTeacher, build_sam
    from samless.training.train import keep_freed_memory_for_reuse

    applied = keep_freed_memory_for_reuse() if keep else False
    teacher = SAMTeacher(build_sam("lite_medsam"), in_channels=1)
    image = torch.rand(args.batch, 1, 256, 256) * 2
    encode = timed(lambda: teacher.encode(image), 1, args.steps) / args.batch
    phase2 = phase2_rows(args, config)["seconds_per_step"]["phase 2, float32 channels-last"]
    return {"applied": applied, "lite_medsam encoder, seconds/slice": encode,
            "phase 2 step (float32 channels-last), seconds": phase2}


def allocator_rows(args: argparse.Namespace) -> dict:
    import subprocess
    import sys

    rows = {}
    for name, flag in (("glibc defaults", "off"), ("freed memory kept (trainer)", "on")):
        argv = [sys.executable, __file__, "--allocator-child", flag, "--batch", str(args.batch), "--steps",
                str(args.steps), "--threads", str(args.threads), "--model", args.model, "--aggregator",
                args.aggregator, "--context-slices", str(args.context_slices)]
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return {"allocator": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sam-type", default="vit_b,lite_medsam", help="teachers to time, comma-separated")
    parser.add_argument("--model", default="hardnet39ds_256")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--aggregator", default="conv_upsample", help="phase-2 aggregator")
    parser.add_argument("--context-slices", type=int, default=0, help="phase-2 2.5D input (slices a side)")
    parser.add_argument("--phase2-only", action="store_true", help="skip the SAM (phase 1) rows")
    parser.add_argument("--preparation", action="store_true",
                        help="time the data cache of a three-plane run instead of training steps")
    parser.add_argument("--allocator", action="store_true", help="time glibc's allocator settings side by side")
    parser.add_argument("--allocator-child", choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = resolve_config(args.model)
    if args.allocator_child:
        print(json.dumps(allocator_child(args, config, args.allocator_child == "on")))
        return
    result = {"model": args.model, "batch": args.batch, "threads": args.threads,
              "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "cores": __import__("os").cpu_count()}}
    if args.preparation:
        result.update(preparation_rows(args))
        print("\n| three-plane cache of a 1 mm head | seconds | cache MB | ms per 2.5D slice (axial / coronal / "
              "sagittal) |\n|---|---|---|---|")
        for name, row in result["preparation"].items():
            reads = " / ".join(f"{v:.2f}" for v in row["ms_per_slice"].values())
            print(f"| {name} | {row['seconds']:.1f} | {row['cache_mb']:.0f} | {reads} |")
        _write(result, Path(args.out if args.out != DEFAULT_OUT else "benchmark_results/preparation.json"))
        return
    if args.allocator:
        result.update(allocator_rows(args))
        rows = result["allocator"]
        names = [k for k in next(iter(rows.values())) if k != "applied"]
        print(f"\n{args.threads} CPU threads, batch {args.batch}\n\n| allocator | " + " | ".join(names)
              + " |\n|---|" + "---|" * len(names))
        for name, row in rows.items():
            print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in names) + " |")
        base, kept = rows.values()
        print("\nratio (defaults / kept): " + ", ".join(f"{k}: {base[k] / kept[k]:.2f}x" for k in names))
        _write(result, Path(args.out if args.out != DEFAULT_OUT else "benchmark_results/allocator.json"))
        return
    teachers = [] if args.phase2_only else args.sam_type.split(",")
    parts = [phase1_rows(args, config, t) for t in teachers] + [phase2_rows(args, config)]
    for part in parts:
        rows = {**result.get("seconds_per_step", {}), **part.pop("seconds_per_step")}
        speedups = {**result.get("cache_speedup", {}), **part.pop("cache_speedup", {})}
        result.update(part, seconds_per_step=rows, **({"cache_speedup": speedups} if speedups else {}))
    result.update(teachers=teachers, target_speedup=20)
    print(f"\n{args.model}, batch {args.batch}, {args.threads} CPU threads\n")
    print("| step | seconds/step | seconds/slice | vs float32 contiguous |\n|---|---|---|---|")
    for name, seconds in result["seconds_per_step"].items():
        ratio = result["phase2_speedup"].get(name, "")
        print(f"| {name} | {seconds:.3f} | {seconds / args.batch:.3f} | {f'{ratio:.2f}x' if ratio else ''} |")
    for teacher, speedup in result.get("cache_speedup", {}).items():
        verdict = "PASS" if speedup >= 20 else "MISS"
        print(f"\n{teacher}: embedding cache speed-up {speedup:.1f}x (target >= 20x: {verdict})")
    _write(result, Path(args.out))


def _write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
