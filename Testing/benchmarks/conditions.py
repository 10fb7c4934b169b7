"""Acquisition conditions, one at a time: how models do on phantoms of each condition, and (leave one
condition out) how a model trained without a condition does on it.

Each condition is a phantom set that pins one factor of the generator (skull-stripped, with skull, thick 2D
slices, axial or sagittal 3D, faint lesions, a heavy or light lesion load, other tissue contrasts) and draws
the rest as the training does (mixed protocol and skull, lesions 1.1-2.0 x white matter, real lesion shapes
where ``../shared/data`` has them, folded cortex, faded rims). Its seed is its own: no training, tuning or
evaluation set of the recipe uses it. ``--without CONDITION=MODEL`` adds a model trained without that
condition (its training flags are in the table: the recipe's phantom flags with the condition's factor
pinned the other way) to that condition's row.

Writes OUT/conditions.md and OUT/conditions.json; the phantoms stay in OUT/phantoms (reused while their
settings match) and each evaluation in OUT/eval.

    .venv/bin/python Testing/benchmarks/conditions.py [--model samless-demo ...] [--without COND=MODEL ...]
        [--n 8] [--only COND,COND] [--out benchmark_results/conditions]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from samless.imageio import write_text
from samless.training.evaluate import evaluate, package_method
from samless.training.phantom import generate_dataset
from samless.training.split import split_cases

ROOT = Path(__file__).resolve().parents[2]
REAL_MASKS = ROOT.parent / "shared" / "data" / "ljubljana-ms" / "lesion_masks_mni"
TARGET_DICE = 0.75

# The recipe's training kind (scripts/make_demo_model.sh), which every condition changes in one factor.
BASE = {"protocol": "mixed", "skull": "mixed", "lesion_load": "mixed", "flair_lesion_contrast": [1.1, 2.0],
        "sulci": True, "lesion_rims": True, "rim_fraction": 0.5, "storage": "mixed", "randomize": False}

# name: (what it is, the factor pinned, the phantom flags of a training set without it)
CONDITIONS: dict[str, tuple[str, dict[str, Any], str]] = {
    "skull_stripped": ("brain only: background 0 or slightly negative, mask a little tight or loose",
                       {"skull": "off"}, "--skull on"),
    "with_skull": ("whole head: skull, scalp, neck", {"skull": "on"}, "--skull off"),
    "thick_2d": ("2D axial slices 3-5 mm thick, 0.8-1.2 mm in plane, tilted grid", {"protocol": "2d"},
                 "--protocol 3d"),
    "axial_3d": ("3D 1 mm isotropic, stored axially", {"protocol": "3d", "storage": "axial"},
                 "--protocol 2d"),
    "sagittal_3d": ("3D 1 mm isotropic, stored as sagittal slices", {"protocol": "3d", "storage": "sagittal"},
                    "--storage axial"),
    "faint_lesions": ("lesions 1.1-1.3 x white matter", {"flair_lesion_contrast": [1.1, 1.3]},
                      "--flair-lesion-contrast 1.3,2.0"),
    "heavy_load": ("heavy, confluent periventricular load", {"lesion_load": "high"}, "--lesion-load medium"),
    "light_load": ("a few small lesions", {"lesion_load": "low"}, "--lesion-load high"),
    "other_contrasts": ("random tissue contrasts, strong bias field and noise, gamma", {"randomize": True},
                        "(no --randomize: the recipe's default)"),
}


def settings(name: str, n: int) -> dict[str, Any]:
    """The generator's settings for a condition: the base with its factor pinned, and its own seed."""
    seed = 7001 + 13 * list(CONDITIONS).index(name)
    real = str(REAL_MASKS) if REAL_MASKS.is_dir() else None
    return {**BASE, **CONDITIONS[name][1], "n": n, "seed": seed, "real_lesions": real}


def phantoms(folder: Path, s: dict[str, Any]) -> Path:
    """The condition's phantom set (split file), generated unless one with these settings is there."""
    record = folder / "settings.json"
    split = folder / "split.json"
    if split.is_file() and record.is_file() and json.loads(record.read_text()) == s:
        return split
    generate_dataset(folder, s["n"], s["seed"], s["protocol"], ("flair",), s["randomize"], s["lesion_load"],
                     folds=2, test_fraction=0.0, overwrite=True, progress=False,
                     flair_lesion_contrast=tuple(s["flair_lesion_contrast"]), skull=s["skull"],
                     real_lesions=s["real_lesions"], sulci=s["sulci"], lesion_rims=s["lesion_rims"],
                     rim_fraction=s["rim_fraction"], storage=s["storage"])
    write_text(json.dumps(s, indent=1) + "\n", record)
    return split


def all_cases(split: Path) -> list:
    return split_cases(split, "train", ["flair"], fold=0) + split_cases(split, "val", ["flair"], fold=0)


def run_condition(name: str, models: list[str], without: str | None, n: int, out: Path) -> dict[str, Any]:
    s = settings(name, n)
    cases = all_cases(phantoms(out / "phantoms" / name, s))
    methods = [named(package_method(m), model_name(m)) for m in models]
    if without:
        methods.append(named(package_method(without), f"without:{model_name(without)}"))
    summary = evaluate(methods, cases, out / "eval" / name, overwrite=True)
    results = {m: {k: summary[m][k] for k in ("dice", "lesion_f1", "lesion_tpr", "false_positives")}
               for m in summary}
    return {"description": CONDITIONS[name][0], "settings": s, "training_without_it": CONDITIONS[name][2],
            "cases": len(cases), "results": results}


def model_name(model: str) -> str:
    return Path(model).name


def named(method, name: str):
    method.name = name
    return method


def cell(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.3f}"


def markdown(report: dict[str, Any]) -> str:
    models = report["models"]
    lines = [f"# Acquisition conditions ({report['date']})", "",
             f"Phantoms, {report['n']} a condition; Dice / lesion F1 (means). The target is Dice >= {TARGET_DICE} "
             "for every condition, for a model trained without it.", "",
             "| condition | " + " | ".join(models) + " | trained without it | its training flags |",
             "|---|" + "---|" * (len(models) + 2)]
    for name, row in report["conditions"].items():
        res = row["results"]
        cells = [f"{cell(res[m]['dice'])} / {cell(res[m]['lesion_f1'])}" for m in models]
        left = [m for m in res if m.startswith("without:")]
        loco = (f"{cell(res[left[0]]['dice'])} / {cell(res[left[0]]['lesion_f1'])} ({left[0][8:]})"
                if left else "not trained")
        lines.append(f"| {name}: {row['description']} | " + " | ".join(cells)
                     + f" | {loco} | `{row['training_without_it']}` |")
    return "\n".join(lines) + "\n"


def parse_without(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, _, model = item.partition("=")
        if name not in CONDITIONS or not model:
            raise SystemExit(f"--without takes CONDITION=MODEL with CONDITION among {', '.join(CONDITIONS)}; "
                             f"got {item!r}")
        pairs[name] = model
    return pairs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="model package or name (repeatable; default samless-demo)")
    p.add_argument("--without", action="append", default=[], metavar="COND=MODEL",
                   help="a model trained without condition COND, evaluated on it (repeatable)")
    p.add_argument("--n", type=int, default=8, help="phantoms per condition (default 8)")
    p.add_argument("--only", help=f"comma-separated conditions among {','.join(CONDITIONS)} (default all)")
    p.add_argument("--out", default=str(ROOT / "benchmark_results" / "conditions"))
    args = p.parse_args()
    models = args.model or ["samless-demo"]
    without = parse_without(args.without)
    names = args.only.split(",") if args.only else list(CONDITIONS)
    unknown = [c for c in names if c not in CONDITIONS]
    if unknown or args.n < 2 or len(set(map(model_name, models))) < len(models):
        p.error(f"unknown condition(s) {unknown}" if unknown else "--n must be at least 2" if args.n < 2
                else "two --model share a folder name: give them folders of distinct names")
    if not REAL_MASKS.is_dir():
        print(f"note: {REAL_MASKS} is absent: lesions are the generator's own shapes only", file=sys.stderr)
    out = Path(args.out)
    report = {"date": datetime.date.today().isoformat(), "n": args.n, "models": [model_name(m) for m in models],
              "conditions": {}}
    for name in names:
        print(f"{name} ...", file=sys.stderr, flush=True)
        report["conditions"][name] = run_condition(name, models, without.get(name), args.n, out)
    write_text(json.dumps(report, indent=1) + "\n", out / "conditions.json")
    text = markdown(report)
    write_text(text, out / "conditions.md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
