"""Training step cost, side by side in one run: phase 1 with and without the SAM embedding cache, and phase 2.

Phase 1 runs the real SAM ViT-B architecture (random weights: timing does not depend on them). A step
is: SAM image embeddings (computed, or read from the fp16 memory-mapped cache), the learner forward,
SAM's frozen mask decoder, Dice+CE, backward through decoder and learner, optimizer step.

    .venv/bin/python Testing/benchmarks/bench_training.py [--sam-type vit_b] [--batch 2] [--steps 3]

Prints a Markdown table and writes benchmark_results/training.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from samless.modeling import build_model, resolve_config
from samless.training.embedding_cache import EmbeddingCache
from samless.training.sam import SAMTeacher, build_sam
from samless.training.train import make_loss


def timed(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    tick = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - tick) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sam-type", default="vit_b")
    parser.add_argument("--model", default="hardnet39ds_256")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmark_results/training.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = resolve_config(args.model)
    size = config.input_size
    net = build_model(config)
    teacher = SAMTeacher(build_sam(args.sam_type), in_channels=1)
    image = torch.rand(args.batch, 1, size, size) * 2
    mask = (torch.rand(args.batch, 1, size, size) > 0.95).float()
    opt1 = torch.optim.SGD(net.learner.parameters(), lr=0.01, momentum=0.9)
    opt2 = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss1, loss2 = make_loss(1), make_loss(2)
    cases = [f"case{i}" for i in range(args.batch)]

    def phase1_step(embeddings: torch.Tensor) -> None:
        loss = loss1(teacher.decode(embeddings, net.learner(image), size), mask)
        opt1.zero_grad()
        loss.backward()
        opt1.step()

    def uncached() -> None:
        phase1_step(teacher.encode(image).half().float())

    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(tmp, {"bench": True}, {c: 1 for c in cases}, 1)
        cache.fetch(cases, [0] * args.batch, [0] * args.batch, image, teacher.encode)  # fill once

        def cached() -> None:
            phase1_step(cache.fetch(cases, [0] * args.batch, [0] * args.batch, image, teacher.encode))

        def phase2() -> None:
            loss = loss2(net(image), mask)
            opt2.zero_grad()
            loss.backward()
            opt2.step()

        rows = {
            "phase 1, SAM encoder every step": timed(uncached, 1, args.steps),
            "phase 1, embedding cache": timed(cached, 1, args.steps),
            "phase 2 (no SAM)": timed(phase2, 1, args.steps),
        }
    ratio = rows["phase 1, SAM encoder every step"] / rows["phase 1, embedding cache"]
    print(f"\n{args.sam_type} teacher, {args.model} learner, batch {args.batch}, {args.threads} CPU threads\n")
    print("| step | seconds/step | seconds/slice |\n|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.3f} | {seconds / args.batch:.3f} |")
    verdict = "PASS" if ratio >= 20 else "MISS"
    print(f"\nembedding cache speed-up: {ratio:.1f}x (target >= 20x: {verdict})")
    result = {"sam_type": args.sam_type, "model": args.model, "batch": args.batch, "threads": args.threads,
              "seconds_per_step": rows, "cache_speedup": ratio, "target_speedup": 20,
              "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "cores": __import__("os").cpu_count()},
              "entry_megabytes": float(np.prod((256, 64, 64)) * 2 / 2**20)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
