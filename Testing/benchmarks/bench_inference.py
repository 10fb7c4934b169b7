"""Inference benchmark: seconds and peak memory per volume of `samless segment`, against SAM ViT-B.

One run, on a synthetic 182x218x182 1 mm FLAIR-like head (the MNI grid):

- every preset, and the bundled demo model's shape (light, 2.5D, detail branch), also as a three-plane
  model (`samless train --three-plane`, fused by `samless segment`), x backend (torch, onnx)
  goes through the real CLI in a child process with 2 threads;
  we record the process's wall seconds, the subject's load-to-written seconds (the "done" event), the
  per-stage seconds (``--stats`` JSON), the child's peak RSS (``wait4``), the number of slices run,
  the network's parameters and GFLOPs per slice, and how many cores other processes kept busy
  meanwhile (``other_cores``: above ~0.2 the timings are inflated; re-run when the machine is idle);
- the bundled model itself (its real weights) with its grown lesion borders and with ``--no-borders``,
  ONNX Runtime, so the post-processing's cost shows beside the network's;
- the SAM ViT-B pipeline of phase 1 (image encoder at 1024x1024 + mask decoder) is timed per slice
  in a child interpreter and extrapolated to the same number of slices;
- the light config is checked against its targets: <= 10 s end to end, <= 1.5 GB peak RSS,
  >= 200x faster than the SAM ViT-B pipeline and >= 20x faster than hardnet85_512.

Weights are random (seeded): timings do not depend on them. With ``--quick`` the 512 px presets run on
a crop of a few axial slices and their per-volume numbers are extrapolated linearly by slice count.

This process imports only the standard library; everything heavy runs in fresh child interpreters,
because Linux carries a parent's peak RSS into a child's ``ru_maxrss`` at exec (a torch-laden parent
would inflate every child's measurement).

    .venv/bin/python Testing/benchmarks/bench_inference.py [--quick] [--out benchmark_results/inference.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

LIGHT = "hardnet39ds_256"
DEMO = "hardnet39ds_256+2.5d+detail"
DEMO_3P = DEMO + "+3planes"  # that network trained on three planes, which `samless segment` fuses
BUNDLED = "samless-demo"  # the real bundled package: with its card's lesion borders, and with --no-borders
BUNDLED_RUNS = {f"{BUNDLED} (borders)": [], f"{BUNDLED} (--no-borders)": ["--no-borders"]}
PAPER = "hardnet85_512"
BACKENDS = ("torch", "onnx")
THREADS = 2
SHAPE_XYZ = (182, 218, 182)  # the MNI 1 mm grid
TARGETS = {"seconds": 10.0, "peak_rss_mb": 1500.0, "speedup_vs_sam": 200.0, "speedup_vs_paper": 20.0}


# --- the synthetic subject and the packages (run in a child interpreter) ------------------------

def synthetic_head(seed: int = 0):
    """A FLAIR-like ellipsoidal head on the MNI grid (sitk.Image): scalp, skull, CSF, grey/white matter,
    ventricles and bright lesions; about 160 of its 182 axial slices hold head."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    nx, ny, nz = SHAPE_XYZ
    z, y, x = np.ogrid[:nz, :ny, :nx]
    z, y, x = (z - 86.0).astype(np.float32), (y - ny / 2).astype(np.float32), (x - nx / 2).astype(np.float32)
    radius = np.sqrt((x / 72) ** 2 + (y / 92) ** 2 + (z / 80) ** 2)  # 1 on the head's surface
    depth = (1.0 - radius) * 80.0  # ~mm below the surface
    cortex = 0.5 + 0.5 * np.sin(x / 4.0) * np.sin(y / 5.0) * np.sin(z / 4.5)  # gyri-like grey/white pattern
    vol = np.where(depth > 14, 90.0 + 25.0 * cortex, 35.0)  # brain, CSF rim
    vol = np.where(depth < 11, 10.0, vol)  # skull
    vol = np.where(depth < 5, 150.0, vol)  # scalp
    vol = np.where(depth < 0, 0.0, vol).astype(np.float32)  # air
    for side in (-1, 1):  # lateral ventricles
        vol[np.sqrt(((x - 12 * side) / 7) ** 2 + (y / 28) ** 2 + ((z - 10) / 12) ** 2) < 1] = 30.0
    for _ in range(25):  # periventricular / deep white matter lesions
        cx, cy, cz = rng.uniform(-40, 40), rng.uniform(-50, 50), rng.uniform(-10, 40)
        vol[(x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < rng.uniform(2, 6) ** 2] = 240.0
    bias = 1.0 + 0.1 * np.sin(x / 60.0 + z / 70.0)
    vol = np.abs(vol * bias + rng.normal(0.0, 4.0, vol.shape)).astype(np.float32)
    image = sitk.GetImageFromArray(vol)
    image.SetSpacing((1.0, 1.0, 1.0))
    image.SetOrigin((90.0, 126.0, -72.0))  # MNI152 1 mm as ITK reads it (RAS on disk -> LPS)
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def prepare(work: Path, crop_slices: int) -> dict[str, Any]:
    """Write the head (and its central axial crop) and one random-weight package per preset into `work`."""
    import SimpleITK as sitk
    import torch

    from samless.card import Inputs, ModelCard
    from samless.modeling import PRESETS, build_model, model_complexity
    from samless.package_write import save_package

    torch.set_num_threads(THREADS)
    head = synthetic_head()
    z0 = head.GetSize()[2] // 2 - crop_slices // 2
    sitk.WriteImage(head, str(work / "head.nii.gz"), useCompression=True)
    sitk.WriteImage(head[:, :, z0:z0 + crop_slices], str(work / "head_crop.nii.gz"), useCompression=True)
    # Beside the presets, the bundled demo model's shape: the light preset with 3 slices in and the detail branch.
    # and that network trained on three planes, which `samless segment` fuses.
    demo = dataclasses.replace(PRESETS[LIGHT], in_channels=3, aggregator="conv_upsample_detail")
    configs = {**{name: (cfg, 0, ["axial"]) for name, cfg in PRESETS.items()},
               DEMO: (demo, 1, ["axial"]), DEMO_3P: (demo, 1, ["axial", "coronal", "sagittal"])}
    packages = {}
    for preset, (cfg, context, planes) in configs.items():
        torch.manual_seed(0)
        card = ModelCard(name=f"bench-{preset}", architecture=cfg,
                         inputs=Inputs(context_slices=context, planes=tuple(planes)))
        path = save_package(build_model(cfg), card, work / preset)
        complexity = model_complexity(cfg)
        packages[preset] = {"path": str(path), "input_size": cfg.input_size, "params": complexity["params"],
                            "gflops_per_slice": round(complexity["gflops_per_slice"], 2)}
    from samless.package import load_package, resolve_model

    bundled = load_package(resolve_model(BUNDLED))
    complexity = model_complexity(bundled.card.architecture)
    packages[BUNDLED] = {"path": str(bundled.source), "input_size": bundled.input_size, "params": complexity["params"],
                         "gflops_per_slice": round(complexity["gflops_per_slice"], 2)}
    head_slices = int((sitk.GetArrayViewFromImage(head) > 30).any(axis=(1, 2)).sum())  # slices holding head
    return {"head_slices": head_slices, "packages": packages}


def in_child(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a fresh interpreter, so this one never grows (see the module docstring)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# --- one CLI run -------------------------------------------------------------------------------

def run_cli(volume: Path, package: Path, backend: str, work: Path, extra: list[str] | None = None,
            checkout: Path | None = None) -> dict[str, Any]:
    """Segment `volume` with the CLI in a child process; wall seconds, peak RSS and the stage breakdown.
    `checkout`: run that checkout's samless instead of this one (put first on PYTHONPATH)."""
    out = work / f"{package.name}_{backend}{''.join(extra or [])}{'_other' if checkout else ''}.nii.gz"
    cmd = [sys.executable, "-m", "samless", "segment", str(volume), "-o", str(out), "--model", str(package),
           "--backend", backend, "--device", "cpu", "--threads", str(THREADS), "--progress", "json",
           "--stats", "--overwrite", *(extra or [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    if checkout:
        env["PYTHONPATH"] = os.pathsep.join([str(checkout / "SAMLessSegmentation"), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryFile() as stderr:
        tick, busy = time.perf_counter(), busy_cpu_seconds()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)
        stdout = proc.stdout.read()  # until the child closes it; stderr goes to a file, so no deadlock
        _, status, usage = os.wait4(proc.pid, 0)
        wall, busy = time.perf_counter() - tick, busy_cpu_seconds() - busy
        cpu = usage.ru_utime + usage.ru_stime
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: tell Popen
        proc.stdout.close()
        if proc.returncode:
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr.read().decode()[-3000:]}")
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    done = next(e for e in events if e["event"] == "done")
    slices = max((e["total"] for e in events if e["event"] == "progress"), default=0)  # all planes together
    stages = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())["seconds"]
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "load_to_written_s": done["seconds"],
        "stages_s": {
            "startup_s": round(wall - done["seconds"], 2),  # interpreter, imports, package load, backend init
            "load_and_write_s": round(done["seconds"] - stages["total"], 2),
            **{f"{k}_s": v for k, v in stages.items() if k != "total"},
        },
        "peak_rss_mb": round(usage.ru_maxrss * 1024 / 1e6, 1),
        "slices": slices,
        "lesion_count": done["lesion_count"],
        "other_cores": round(max(0.0, busy - cpu) / wall, 2),
    }


def extrapolate(row: dict[str, Any], slices: int) -> dict[str, Any]:
    """Per-volume numbers of a cropped run: add the inference time of the missing slices."""
    extra = row["stages_s"]["inference_s"] / row["slices"] * (slices - row["slices"])
    return {**row, "measured": dict(row), "slices": slices, "extrapolated": True,
            "wall_s": round(row["wall_s"] + extra, 2),
            "cpu_s": round(row["cpu_s"] * (1 + extra / row["wall_s"]), 2),
            "load_to_written_s": round(row["load_to_written_s"] + extra, 2),
            "stages_s": {**row["stages_s"], "inference_s": round(row["stages_s"]["inference_s"] + extra, 2)}}


def busy_cpu_seconds() -> float:
    """CPU seconds all processes have used since boot (/proc/stat), to see how busy the machine was."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:7]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait (steal excluded)


# --- SAM ViT-B, phase-1 style ------------------------------------------------------------------

def time_sam(slices_per_volume: int, repeats: int) -> dict[str, Any]:
    """SAM ViT-B image encoder + mask decoder per 1024x1024 slice (random weights), extrapolated per volume."""
    import torch
    from segment_anything import sam_model_registry
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]().eval()
    x = torch.randn(1, 3, 1024, 1024)
    counter = FlopCounterMode(display=False)

    def one_slice():
        emb = sam.image_encoder(x)
        return sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=torch.empty(1, 0, 256),
                                dense_prompt_embeddings=torch.zeros(1, 256, 64, 64), multimask_output=False)[0]

    with torch.inference_mode():
        with counter:  # counting the encoder's FLOPs doubles as the warm-up
            sam.image_encoder(x)
        busy = busy_cpu_seconds()
        times, cpu = [], []
        for _ in range(repeats):
            tick, cpu_tick = time.perf_counter(), time.process_time()
            one_slice()
            times.append(time.perf_counter() - tick)
            cpu.append(time.process_time() - cpu_tick)
        busy = busy_cpu_seconds() - busy
    per_slice = statistics.median(times)
    return {
        "encoder_params": sum(p.numel() for p in sam.image_encoder.parameters()),
        "params": sum(p.numel() for p in sam.parameters()),
        "encoder_gflops_per_slice": round(counter.get_total_flops() / 1e9, 1),
        "seconds_per_slice": round(per_slice, 2),
        "slice_times_s": [round(t, 2) for t in times],
        "cpu_seconds_per_slice": round(statistics.median(cpu), 2),
        "slices": slices_per_volume,
        "seconds_per_volume": round(per_slice * slices_per_volume, 1),
        "extrapolated": True,
        "other_cores": round(max(0.0, busy - sum(cpu)) / sum(times), 2),
    }


# --- report ------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "threads": THREADS, "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "platform": platform.platform()}


def compare_checkouts(work: Path, package: Path, other: Path, repeats: int) -> dict[str, Any]:
    """The bundled model on the full head with this checkout and with `other`, alternating, and each side first
    in every other pair (whichever runs first in a pair was measured slower): median wall seconds, their ratio
    (this / other), peak RSS, and both lesion counts."""
    runs: dict[str, list[dict[str, Any]]] = {"this": [], "other": []}
    sides = [("this", None), ("other", other)]
    for i in range(repeats):
        for side, checkout in (sides if i % 2 == 0 else sides[::-1]):
            print(f"running the bundled model with {side} checkout ({i + 1}/{repeats}) ...", file=sys.stderr,
                  flush=True)
            runs[side].append(run_cli(work / "head.nii.gz", package, "onnx", work, checkout=checkout))
    median = {side: statistics.median(r["wall_s"] for r in rows) for side, rows in runs.items()}
    return {"other": str(other), "repeats": repeats, "this_median_s": round(median["this"], 2),
            "other_median_s": round(median["other"], 2), "ratio": round(median["this"] / median["other"], 3),
            **{f"{side}_peak_rss_mb": max(r["peak_rss_mb"] for r in rows) for side, rows in runs.items()},
            "lesions": sorted({r["lesion_count"] for rows in runs.values() for r in rows}), "runs": runs}


def against_line(against: dict[str, Any]) -> str:
    return (f"bundled model, this checkout against {against['other']}: median {against['this_median_s']} s against "
            f"{against['other_median_s']} s (ratio {against['ratio']}), peak RSS {against['this_peak_rss_mb']} MB "
            f"against {against['other_peak_rss_mb']} MB, lesions {against['lesions']}")


def verdicts(rows: list[dict[str, Any]], sam: dict[str, Any]) -> dict[str, Any]:
    light = min((r for r in rows if r["preset"] == LIGHT), key=lambda r: r["wall_s"])
    paper = next(r for r in rows if r["preset"] == PAPER and r["backend"] == light["backend"])
    values = {
        "seconds": light["wall_s"],
        "peak_rss_mb": light["peak_rss_mb"],
        "speedup_vs_sam": round(sam["seconds_per_volume"] / light["wall_s"], 1),
        "speedup_vs_paper": round(paper["wall_s"] / light["wall_s"], 1),
    }
    passed = {k: values[k] <= TARGETS[k] if k in ("seconds", "peak_rss_mb") else values[k] >= TARGETS[k]
              for k in values}
    return {"light_backend": light["backend"], "values": values, "targets": TARGETS, "pass": passed}


def table(rows: list[dict[str, Any]], sam: dict[str, Any], result: dict[str, Any]) -> str:
    lines = ["| model | backend | slices | params (M) | GFLOPs/slice | wall s | CPU s | load->written s | inference s "
             "| post s | s/slice | peak RSS MB | run | other cores |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        inference = r["stages_s"]["inference_s"]
        cells = [r["preset"], r["backend"], r["slices"], f"{r['params'] / 1e6:.2f}", f"{r['gflops_per_slice']:.1f}",
                 f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['load_to_written_s']:.1f}", f"{inference:.1f}",
                 f"{r['stages_s'].get('postprocess_s', 0.0):.2f}", f"{inference / r['slices']:.3f}",
                 f"{r['peak_rss_mb']:.0f}",
                 "extrapolated" if r.get("extrapolated") else "full", f"{r['other_cores']:.2f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    sam_s = sam["seconds_per_volume"]
    cells = ["SAM ViT-B (encoder+decoder)", "torch", sam["slices"], f"{sam['encoder_params'] / 1e6:.2f}",
             f"{sam['encoder_gflops_per_slice']:.1f}", f"{sam_s:.1f}",
             f"{sam['cpu_seconds_per_slice'] * sam['slices']:.1f}", "-", f"{sam_s:.1f}", "-",
             f"{sam['seconds_per_slice']:.3f}", "-", "extrapolated", f"{sam['other_cores']:.2f}"]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "SAM row: image encoder + mask decoder compute per slice x the light config's slices (no I/O).",
              f"other cores: CPU cores other processes kept busy during the run (of {os.cpu_count()}); "
              "above ~0.2 the timings are inflated (CPU s too: the threads wait on each other)."]
    v, ok = result["values"], result["pass"]
    mark = {k: "PASS" if ok[k] else "MISS" for k in ok}
    lines += ["", f"Light config {LIGHT} ({result['light_backend']} backend, wall seconds of the whole process):", "",
              "| target | value | goal | |", "|---|---:|---:|---|",
              f"| end-to-end seconds per volume | {v['seconds']:.1f} | <= {TARGETS['seconds']:g} | {mark['seconds']} |",
              f"| peak RSS (MB) | {v['peak_rss_mb']:.0f} | <= {TARGETS['peak_rss_mb']:g} | {mark['peak_rss_mb']} |",
              f"| SAM ViT-B pipeline / light | {v['speedup_vs_sam']:.1f}x | >= {TARGETS['speedup_vs_sam']:g}x "
              f"| {mark['speedup_vs_sam']} |",
              f"| {PAPER} / light | {v['speedup_vs_paper']:.1f}x | >= {TARGETS['speedup_vs_paper']:g}x "
              f"| {mark['speedup_vs_paper']} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmark_results/inference.json"))
    parser.add_argument("--quick", action="store_true",
                        help="run the 512 px presets on a crop and extrapolate per volume (light config stays full)")
    parser.add_argument("--crop-slices", type=int, default=64,
                        help="axial slices of the --quick crop (at least 60: samless refuses a smaller field of view)")
    parser.add_argument("--sam-slices", type=int, default=3, help="timed SAM slices (after one warm-up)")
    parser.add_argument("--against", type=Path, metavar="CHECKOUT",
                        help="also run the bundled model with another checkout's samless (e.g. a worktree of the "
                             "last release), alternating with this one, and print the time ratio")
    parser.add_argument("--repeats", type=int, default=4, help="runs a side with --against (default 4)")
    parser.add_argument("--against-only", action="store_true",
                        help="with --against: only that comparison (no presets, no SAM timing)")
    args = parser.parse_args(argv)
    if args.against_only and not args.against:
        parser.error("--against-only needs --against CHECKOUT")

    with tempfile.TemporaryDirectory(prefix="samless-bench-") as tmp:
        work = Path(tmp)
        print("writing the head and the packages ...", file=sys.stderr, flush=True)
        prepared = in_child(prepare, work, args.crop_slices)
        if args.against_only:
            against = compare_checkouts(work, Path(prepared["packages"][BUNDLED]["path"]), args.against,
                                        args.repeats)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"against": against, "machine": in_child(machine)}, indent=2) + "\n")
            print(against_line(against))
            return 0
        rows: list[dict[str, Any]] = []
        presets = [LIGHT] + [p for p in prepared["packages"] if p not in (LIGHT, BUNDLED)]  # light first: reference
        for preset in presets:
            package = prepared["packages"][preset]
            cropped = args.quick and package["input_size"] > prepared["packages"][LIGHT]["input_size"]
            for backend in BACKENDS:
                print(f"running {preset} / {backend} ({'cropped' if cropped else 'full'}) ...", file=sys.stderr,
                      flush=True)
                row = run_cli(work / ("head_crop.nii.gz" if cropped else "head.nii.gz"), Path(package["path"]),
                              backend, work)
                if cropped:
                    row = extrapolate(row, rows[0]["slices"])
                rows.append({"preset": preset, "backend": backend,
                             **{k: v for k, v in package.items() if k != "path"}, **row})
        bundled = prepared["packages"][BUNDLED]
        for name, extra in BUNDLED_RUNS.items():
            print(f"running {name} / onnx ...", file=sys.stderr, flush=True)
            row = run_cli(work / "head.nii.gz", Path(bundled["path"]), "onnx", work, extra)
            rows.append({"preset": name, "backend": "onnx", **{k: v for k, v in bundled.items() if k != "path"}, **row})
        against = compare_checkouts(work, Path(bundled["path"]), args.against, args.repeats) if args.against else None

    print("timing SAM ViT-B ...", file=sys.stderr, flush=True)
    sam = in_child(time_sam, rows[0]["slices"], args.sam_slices)
    result = verdicts(rows, sam)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": in_child(machine),
        "volume": {"size_xyz": list(SHAPE_XYZ), "spacing_mm": [1.0, 1.0, 1.0],
                   "head_slices": prepared["head_slices"], "crop_slices": args.crop_slices if args.quick else None},
        "runs": rows,
        "sam_vit_b": sam,
        "against": against,
        "light": result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table(rows, sam, result))
    if against:
        print("\n" + against_line(against))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
