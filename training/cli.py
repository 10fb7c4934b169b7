"""Command-line entry points of the training subpackage, added to `samless` when it is installed:
`samless train phase1|phase2|average|make-split`, `samless evaluate`, `samless tune`, `samless export`,
`samless phantom`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from samless.cli import TRAINING_COMMANDS, non_negative, positive_int, probability
from samless.errors import SamlessError
from samless.training.config import cli_options
from samless.training.teachers import SAM_TYPES as TEACHER_CHOICES
from samless.training.teachers import default_teacher_checkpoint

PAPER = "defaults follow MS-SAMLess: SGD lr 0.01, batch 8, 200 (phase 1) + 100 (phase 2) epochs, 0.85 lesion slices"


def _run_options(p: argparse.ArgumentParser) -> None:
    """What is not a setting of the run: where settings come from, and how this invocation runs it."""
    p.add_argument("--config", help="YAML settings (e.g. a previous run's config.yaml); flags override it")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random flips, rotations, scaling and intensity changes (default on)")
    p.add_argument("--resume", action="store_true", help="continue OUT from its last checkpoint with the run's own "
                   "settings (OUT/config.yaml); flags that change what it computes are refused")
    p.add_argument("--stop-after", type=int, metavar="N", help="stop once N epochs of the run are done (checkpointed; "
                   "--resume continues the same schedule): train in chunks that fit a session")


def cmd_train(args: argparse.Namespace) -> int:
    from samless.training.config import TrainConfig, cli_settings
    from samless.training.train import train

    phase = 1 if args.train_command == "phase1" else 2
    # A resumed run starts from its own settings (OUT/config.yaml); flags may only repeat them.
    saved = Path(args.out, "config.yaml") if args.resume and args.out else None
    base = args.config or (saved if saved and saved.is_file() else None)
    overrides = cli_settings(args, phase)
    if phase == 1 and args.sam_random_weights:
        overrides["sam_checkpoint"] = ""
    if base:
        config = TrainConfig.load(base, **overrides)
    else:
        missing = [f"--{k}" for k in ("split", "out") if not overrides[k]]
        if missing:
            raise SamlessError(f"{' and '.join(missing)} needed (or --config).")
        config = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    if args.augment is not None:  # switch a config's augmentation on or off, keeping its settings
        kept = {k: v for k, v in config.augment.items() if k != "off"}
        config = dataclasses.replace(config, augment=kept if args.augment else {**kept, "off": 1})
    if phase == 1 and not config.sam_checkpoint and not args.sam_random_weights:
        config = dataclasses.replace(config, sam_checkpoint=str(default_teacher_checkpoint(config.sam_type)))
    best = train(config, resume=args.resume, stop_after=args.stop_after)
    print(f"best checkpoint: {best}")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from samless.training.average import average_checkpoints

    path = average_checkpoints(args.checkpoints, args.out, args.overwrite)
    print(f"averaged checkpoint: {path}")
    return 0


def cmd_make_split(args: argparse.Namespace) -> int:
    from samless.training.split import make_split

    path = make_split(args.folder, args.out, args.modalities.split(","), args.folds, args.test_fraction,
                      args.seed, args.overwrite)
    print(f"wrote {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from samless.pipeline import SegmentOptions
    from samless.training.evaluate import baseline_method, evaluate, package_method, phase1_method
    from samless.training.split import split_cases

    options = SegmentOptions(threshold=args.threshold, min_lesion_mm3=args.min_lesion_mm3, tta=args.tta,
                             three_plane=args.three_plane)
    if bool(args.pairs) == bool(args.split):
        raise SamlessError("give either --split (cases) or --pairs (follow-up pairs), one of them.")
    if args.pairs:
        return _evaluate_pairs(args, options)
    methods = [package_method(m, args.backend, args.device, args.threads, options) for m in args.model or []]
    methods += [phase1_method(c, args.sam_type, args.sam_checkpoint or None, args.device, options)
                for c in args.phase1 or []]
    methods += [baseline_method()] if args.baseline else []
    if not methods:
        raise SamlessError("nothing to evaluate: give --model PACKAGE, --phase1 CHECKPOINT and/or --baseline.")
    cases = split_cases(args.split, args.subset, methods[0].modalities, args.fold)[:args.max_cases]
    summary = evaluate(methods, cases, Path(args.out), args.overwrite,
                       progress=lambda m, c, r: print(f"{m} {c}: dice {r['dice']:.3f} "
                                                      f"lesion F1 {r['lesion_f1']:.3f} {r['seconds']:.1f} s"))
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    return 0 if summary else 1


def _evaluate_pairs(args: argparse.Namespace, options) -> int:
    from samless.training.evaluate_pairs import evaluate_pairs, read_pairs

    if not args.model or args.phase1 or args.baseline:
        raise SamlessError("--pairs evaluates model packages: give --model PACKAGE (no --phase1, no --baseline).")
    pairs = read_pairs(args.pairs)[:args.max_cases]
    evaluate_pairs(args.model, pairs, Path(args.out), overwrite=args.overwrite, backend=args.backend,
                   device=args.device, threads=args.threads, options=options,
                   progress=lambda r: print(f"{r['model']} {r['method']} {r['pair']}: {r['true_detected']} of "
                                            f"{r['true_changes']} changes found, {r['false_positives']} false, "
                                            f"{r['seconds']:.1f} s"))
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from samless.training.export import DEFAULT_INTENDED_USE, export_package
    from samless.training.tune import read_postprocessing

    path = export_package(args.checkpoint, args.out, name=args.name, metrics=args.metrics,
                          description=args.description or "", license=args.license,
                          training_data=args.training_data or "", overwrite=args.overwrite, half=args.half,
                          intended_use=args.intended_use or DEFAULT_INTENDED_USE,
                          postprocessing=read_postprocessing(args.postprocessing) if args.postprocessing else None)
    print(f"wrote model package {path}")
    return 0


def _cases_args(p: argparse.ArgumentParser, subsets: tuple[str, ...], required: bool = True) -> None:
    """Which cases of a split to run (the first subset is the default)."""
    p.add_argument("--split", required=required)
    p.add_argument("--subset", choices=subsets, default=subsets[0])
    p.add_argument("--fold", type=int, default=0)


def _runtime_args(p: argparse.ArgumentParser) -> None:
    """How a model package runs."""
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--threads", type=positive_int)


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def cmd_tune(args: argparse.Namespace) -> int:
    from samless.borders import BorderGrowth
    from samless.package import load_package, resolve_model
    from samless.training.split import split_cases
    from samless.training.tune import MIN_LESION_MM3, THRESHOLDS, tune

    if bool(args.rim_fractions) != bool(args.reach_mm):
        raise SamlessError("--rim-fractions and --reach-mm go together: give both, or neither.")
    borders = [BorderGrowth(rim_fraction=f, reach_mm=r) for f in args.rim_fractions or () for r in args.reach_mm or ()]
    package = load_package(resolve_model(args.model))
    cases = split_cases(args.split, args.subset, package.modalities, args.fold)
    best = tune(package, cases, args.out, backend=args.backend, device=args.device, threads=args.threads,
                thresholds=args.thresholds or THRESHOLDS, borders=borders,
                min_sizes=args.min_lesion_mm3 or MIN_LESION_MM3, overwrite=args.overwrite,
                progress=lambda case: print(f"probability map: {case.id}"))
    print((Path(args.out) / "grid.csv").read_text(encoding="utf-8"))
    grown = f", borders to {best['rim_fraction']:g} of the contrast within {best['reach_mm']:g} mm" if borders else ""
    print(f"best on {len(cases)} {args.subset} cases: threshold {best['threshold']:g}, minimum lesion "
          f"{best['min_lesion_mm3']:g} mm^3{grown} (Dice {best['dice']:.3f}, lesion F1 {best['lesion_f1']:.3f}); "
          f"export it with --postprocessing {Path(args.out) / 'best.json'}")
    return 0


def register(sub: argparse._SubParsersAction, command: str) -> None:
    """Add training `command` (a key of samless.cli.TRAINING_COMMANDS) to the `samless` parser."""
    REGISTRARS[command](sub, TRAINING_COMMANDS[command])


def _register_train(sub: argparse._SubParsersAction, help_text: str) -> None:
    train = sub.add_parser("train", help=help_text)
    tsub = train.add_subparsers(dest="train_command", required=True)
    p1 = tsub.add_parser("phase1", help="SAM-guided prompt learning", description=f"Phase 1. {PAPER}.")
    cli_options(p1, 1)
    p1.add_argument("--sam-random-weights", action="store_true", help="no checkpoint: for tests and timing only")
    _run_options(p1)
    p1.set_defaults(func=cmd_train)
    p2 = tsub.add_parser("phase2", help="SAM-free aggregator (and learner fine-tuning)",
                         description=f"Phase 2: SAM is not loaded. {PAPER}.")
    cli_options(p2, 2)
    _run_options(p2)
    p2.set_defaults(func=cmd_train)
    av = tsub.add_parser("average", help="one network from the mean weights of several phase-2 checkpoints",
                         description="Average the weights of phase-2 checkpoints of one network (e.g. runs "
                         "fine-tuned from one --init with other seeds), or of model packages (e.g. a package and "
                         "runs fine-tuned from it): often as good as their ensemble, at the cost of one network. "
                         "Writes OUT/checkpoints/best for `samless export`.")
    av.add_argument("checkpoints", nargs="+", help="phase-2 checkpoint folders (e.g. RUN/checkpoints/best) or model "
                    "packages (folder, .zip or bundled name); at least one checkpoint")
    av.add_argument("-o", "--out", required=True, help="run folder to write OUT/checkpoints/best in")
    av.add_argument("--overwrite", action="store_true")
    av.set_defaults(func=cmd_average)
    ms = tsub.add_parser("make-split", help="write a k-fold split file for a folder of case folders")
    ms.add_argument("folder", help="folder of case folders, each with <modality>.nii.gz files and mask.nii.gz")
    ms.add_argument("-o", "--out", required=True, help="split file to write (.json)")
    ms.add_argument("--modalities", default="flair")
    ms.add_argument("--folds", type=int, default=5)
    ms.add_argument("--test-fraction", type=float, default=0.2)
    ms.add_argument("--seed", type=int, default=0)
    ms.add_argument("--overwrite", action="store_true")
    ms.set_defaults(func=cmd_make_split)


def _register_evaluate(sub: argparse._SubParsersAction, help_text: str) -> None:
    ev = sub.add_parser("evaluate", help=help_text,
                        description="Evaluate model packages (SAM-free) and phase-1 checkpoints (with SAM) on the "
                        "same cases: Dice, IoU, HD95, ASSD, sensitivity, precision, lesion TPR/precision/F1, false "
                        "positives, volume difference, by lesion size, and seconds per volume.")
    _cases_args(ev, ("test", "val", "train"), required=False)
    ev.add_argument("--pairs", help="instead of --split: follow-up pairs (the pairs.json of `samless phantom "
                    "--pairs`): new/enlarging lesion detection of `samless followup` and of subtracting the two "
                    "segmentations, registration error, seconds per pair")
    ev.add_argument("--model", action="append", help="model package (repeatable)")
    ev.add_argument("--phase1", action="append", help="phase-1 checkpoint, run with SAM (repeatable)")
    ev.add_argument("--baseline", action="store_true",
                    help="also run the LGA-like classical baseline (phantom cases: needs their white-matter map)")
    ev.add_argument("--sam-type", choices=TEACHER_CHOICES, metavar="TEACHER",
                    help="the teacher for --phase1 (default: the one it was trained with)")
    ev.add_argument("--sam-checkpoint", default="", help="the teacher's checkpoint (default: the one it was "
                    "trained with)")
    ev.add_argument("--max-cases", type=positive_int, help="only the subset's first N cases (e.g. for a slow "
                    "phase-1 network with its teacher in the loop)")
    ev.add_argument("--out", required=True, help="folder for cases.csv, summary.json, summary.md")
    _runtime_args(ev)
    ev.add_argument("--threshold", type=probability)
    ev.add_argument("--min-lesion-mm3", type=non_negative)
    ev.add_argument("--tta", action="store_true")
    ev.add_argument("--three-plane", action=argparse.BooleanOptionalAction, default=None,
                    help="fuse three planes (default: where the model was trained on all three)")
    ev.add_argument("--overwrite", action="store_true")
    ev.set_defaults(func=cmd_evaluate)


def _register_tune(sub: argparse._SubParsersAction, help_text: str) -> None:
    tu = sub.add_parser("tune", help=help_text,
                        description="Run the model once per case, then score every threshold x minimum lesion size "
                        "by mean Dice and lesion F1; writes OUT/grid.csv and OUT/best.json for `samless export "
                        "--postprocessing`. Tune on validation cases, not on the cases you report.")
    _cases_args(tu, ("val", "train", "test"))
    tu.add_argument("--model", required=True, help="model package (name or folder)")
    tu.add_argument("--out", required=True, help="folder for grid.csv and best.json")
    tu.add_argument("--thresholds", type=_floats, help="comma-separated probabilities (default 0.3,0.4,...,0.7)")
    tu.add_argument("--min-lesion-mm3", type=_floats, help="comma-separated sizes (default 0,3,6,10,15)")
    tu.add_argument("--rim-fractions", type=_floats, help="also choose lesion border growth: comma-separated "
                    "shares of a lesion's contrast that its rim needs to join it (e.g. 0.5,0.6,0.7; with "
                    "--reach-mm). Without them the model's own border settings are kept")
    tu.add_argument("--reach-mm", type=_floats, help="with --rim-fractions: comma-separated distances a rim may "
                    "reach beyond the network's lesion (e.g. 2,3,4)")
    _runtime_args(tu)
    tu.add_argument("--overwrite", action="store_true")
    tu.set_defaults(func=cmd_tune)


def _register_export(sub: argparse._SubParsersAction, help_text: str) -> None:
    ex = sub.add_parser("export", help=help_text)
    ex.add_argument("checkpoint", help="phase-2 checkpoint folder (e.g. RUN/checkpoints/best)")
    ex.add_argument("-o", "--out", required=True, help="model package folder to write")
    ex.add_argument("--name")
    ex.add_argument("--metrics", help="an evaluation summary.json to record in the card")
    ex.add_argument("--description")
    ex.add_argument("--license", default="Apache-2.0")
    ex.add_argument("--training-data", help="what the model was trained on (for the card)")
    ex.add_argument("--intended-use", help="intended use statement for the model card")
    ex.add_argument("--half", action="store_true", help="store weights as float16 (half the size)")
    ex.add_argument("--postprocessing", help="a `samless tune` best.json: its threshold, minimum lesion size "
                    "and border growth (where tuned) become the package's defaults")
    ex.add_argument("--overwrite", action="store_true")
    ex.set_defaults(func=cmd_export)


def _register_phantom(sub: argparse._SubParsersAction, help_text: str) -> None:
    from samless.training.phantom import register_cli  # the generator itself: needs scipy

    register_cli(sub, help_text)


REGISTRARS = {"train": _register_train, "evaluate": _register_evaluate, "tune": _register_tune,
              "export": _register_export, "phantom": _register_phantom}
