"""The `samless` command line: `samless segment`, `samless followup`, `samless info` and `samless demo` (plus
the training commands where the training extra is installed).

Errors a user can fix end the run with exit code 1 and one line saying what was wrong and what to do.
With `--progress json` every event is one JSON object per line on stdout (the Slicer module reads it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import SimpleITK as sitk

from samless import __version__
from samless.describe import describe
from samless.errors import SamlessError
from samless.imageio import (
    IMAGE_SUFFIXES,
    atomic_folder,
    csv_text,
    image_suffix,
    is_dicom_folder,
    refuse_existing,
    strip_suffix,
    write_image,
    write_text,
)
from samless.lesions import statistics_csv
from samless.options import BACKENDS, DEVICES
from samless.package import DEFAULT_MODEL, load_package, resolve_model

if TYPE_CHECKING:
    from samless.options import SegmentOptions

OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
SUMMARY_FIELDS = ("subject", "status", "lesion_count", "total_volume_ml", "seconds", "label_map", "inputs", "error")


@dataclass
class Subject:
    id: str
    inputs: list[Path]  # in the model's modality order
    label: Path

    def outputs(self, prob: bool, stats: bool) -> dict[str, Path]:
        stem = self.label.parent / strip_suffix(self.label)
        out = {"label": self.label}
        if prob:
            out["probability"] = stem.with_name(f"{stem.name}_prob{image_suffix(self.label)}")
        if stats:
            out["statistics_json"] = stem.with_name(f"{stem.name}.json")
            out["statistics_csv"] = stem.with_name(f"{stem.name}.csv")
        return out


# --- finding subjects and their outputs --------------------------------------------------------

def _modality_files(folder: Path, modalities: Sequence[str]) -> list[Path]:
    """The files of one multi-modal subject folder, matched by modality name in the file name."""
    files = [p for p in sorted(folder.iterdir()) if image_suffix(p)]
    found = []
    for modality in modalities:
        hits = [p for p in files if modality.lower() in re.split(r"[_\-.]", strip_suffix(p).lower())]
        if len(hits) != 1:
            raise SamlessError(
                f"{folder}: expected one file named for {modality} (e.g. {modality.lower()}.nii.gz), "
                f"found {len(hits)}."
            )
        found.append(hits[0])
    return found


def collect_subjects(inputs: Sequence[str], output: str, modalities: Sequence[str],
                     suffix: str = ".nii.gz") -> tuple[list[Subject], bool]:
    """Subjects to segment and their label-map paths; also whether this is a batch (output is a folder).

    An input is an image file, a DICOM folder, FLAIR,T1,... files of one subject joined by commas, or a
    folder of subjects (image files, or for multi-modal models one sub-folder per subject).
    """
    groups: list[tuple[str, list[Path]]] = []
    batch = len(inputs) > 1
    for item in inputs:
        path = Path(item)
        if "," in item:
            parts = [Path(p) for p in item.split(",") if p]
            groups.append((strip_suffix(parts[0]), parts))
        elif path.is_dir() and not is_dicom_folder(path):
            batch = True
            groups.extend(_folder_subjects(path, modalities))
        else:
            groups.append((path.name if path.is_dir() else strip_suffix(path), [path]))
    if not groups:
        raise SamlessError("no input volumes found; give image files, DICOM folders or a folder of subjects.")
    for sid, paths in groups:
        if len(paths) != len(modalities):
            raise SamlessError(
                f"subject {sid}: the model needs {len(modalities)} volume(s) ({','.join(modalities)}, joined by "
                f"commas in that order) but {len(paths)} were given."
            )
    out = Path(output)
    if image_suffix(out) and batch:
        raise SamlessError(f"{len(groups)} subjects need an output folder, but -o {out} names a file.")
    if image_suffix(out) and image_suffix(out) not in OUTPUT_SUFFIXES:
        raise SamlessError(f"cannot write label maps as {image_suffix(out)}; use one of {', '.join(OUTPUT_SUFFIXES)}.")
    subjects = [Subject(sid, paths, out if image_suffix(out) else out / f"{sid}_lesions{suffix}")
                for sid, paths in groups]
    ids = [s.id for s in subjects]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise SamlessError(f"several inputs are named {', '.join(dupes)}; their outputs would collide: rename them.")
    return subjects, batch or not image_suffix(out)


def _folder_subjects(folder: Path, modalities: Sequence[str]) -> list[tuple[str, list[Path]]]:
    if len(modalities) == 1:
        files = [p for p in sorted(folder.iterdir()) if p.is_file() and image_suffix(p)]
        dicoms = [p for p in sorted(folder.iterdir()) if is_dicom_folder(p)]
        found = [(strip_suffix(p), [p]) for p in files] + [(p.name, [p]) for p in dicoms]
    else:
        found = [(p.name, _modality_files(p, modalities)) for p in sorted(folder.iterdir()) if p.is_dir()]
    if not found:
        raise SamlessError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}) or subject folders.")
    return found


def check_outputs(subjects: Sequence[Subject], extra: Sequence[Path], prob: bool, stats: bool,
                  overwrite: bool) -> None:
    """Refuse before any work: existing outputs (without --overwrite), unwritable folders, inputs as outputs."""
    targets = [p for s in subjects for p in s.outputs(prob, stats).values()] + list(extra)
    inputs = {p.resolve() for s in subjects for p in s.inputs}
    for path in targets:
        if path.resolve() in inputs:
            raise SamlessError(f"output {path} is also an input; choose another output path.")
    refuse_existing(targets, overwrite, "choose another -o")
    for folder in sorted({p.parent for p in targets}):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SamlessError(f"cannot create output folder {folder} ({exc.strerror}); choose another -o.") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SamlessError(f"output folder {folder} is not writable; choose another -o or fix its permissions.")


# --- progress ----------------------------------------------------------------------------------

class Reporter:
    """Progress for people (tqdm on stderr) or for programs (JSON lines on stdout)."""

    # Each subject's share of the bar by stage: reading and checking, the network, writing (the rest).
    SPANS = {"reading": (0.0, 0.08), "segmenting": (0.08, 0.92), "writing": (0.92, 1.0)}

    def __init__(self, mode: str, n_subjects: int):
        self.mode, self.n, self.index, self.subject, self._bar = mode, n_subjects, 0, "", None
        self.span = self.SPANS["segmenting"]

    def stage(self, name: str) -> None:
        """Enter stage `name` of this subject (see SPANS); reading and writing report their start and end."""
        self.span = self.SPANS[name]
        if name != "segmenting":
            self.progress(name, 0, 1)

    def event(self, event: str, **fields: Any) -> None:
        if self.mode == "json":
            print(json.dumps({"event": event, **fields}), flush=True)

    def start(self, index: int, subject: str) -> None:
        self.index, self.subject = index, subject
        self.event("start", subject=subject, index=index, subjects=self.n)

    def progress(self, stage: str, done: int, total: int) -> None:
        if self.mode == "json":
            lo, hi = self.span
            fraction = (self.index + lo + (hi - lo) * done / max(total, 1)) / self.n
            self.event("progress", subject=self.subject, stage=stage, done=done, total=total,
                       fraction=round(fraction, 4))
        elif self.mode == "bar" and self.span == self.SPANS["segmenting"]:  # slices; reading and writing are brief
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=f"{self.subject} {stage}", unit="slice", file=sys.stderr,
                                 leave=False)
            self._bar.set_description(f"{self.subject} {stage}", refresh=False)  # the plane, when fusing
            self._bar.update(done - self._bar.n)

    def finish(self, message: str, **fields: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.mode == "json":
            self.event("done", subject=self.subject, **fields)
        else:
            print(message, flush=True)

    def fail(self, message: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.mode == "json":
            self.event("error", subject=self.subject, message=message)
        print(f"error: {self.subject + ': ' if self.subject else ''}{message}", file=sys.stderr, flush=True)


# --- commands ----------------------------------------------------------------------------------

def cmd_segment(args: argparse.Namespace) -> int:
    from samless.pipeline import Segmenter, load_inputs

    reporter = Reporter(args.progress, 1)
    try:
        package = load_package(resolve_model(args.model))
        subjects, batch = collect_subjects(args.inputs, args.output, package.modalities, args.output_suffix)
        summary_path = Path(args.output) / "summary.csv" if batch else None
        check_outputs(subjects, [summary_path] if summary_path else [], args.prob, args.stats, args.overwrite)
        options = segment_options(args)
        segmenter = Segmenter.for_options(package, options)
    except SamlessError as exc:
        reporter.fail(str(exc))
        return 1
    reporter.n = len(subjects)
    reporter.event("model", name=package.name, backend=segmenter.backend.name, device=segmenter.backend.device)
    rows = []
    for index, subject in enumerate(subjects):
        reporter.start(index, subject.id)
        tick = time.perf_counter()
        try:
            reporter.stage("reading")
            images = load_inputs(subject.inputs, package.modalities, check_contrast=not args.skip_contrast_check)
            reporter.stage("segmenting")
            result = segmenter.segment(images, options, reporter.progress)
            reporter.stage("writing")
            written = write_outputs(subject, result, args.prob, args.stats)
            reporter.progress("writing", 1, 1)
        except SamlessError as exc:
            reporter.fail(str(exc))
            rows.append(_summary_row(subject, "error", error=str(exc)))
            if not batch:
                return 1
            continue
        seconds = round(time.perf_counter() - tick, 2)
        stats = result.statistics
        reporter.finish(
            f"{subject.id}: {stats['lesion_count']} lesions, {stats['total_volume_ml']:.2f} mL, "
            f"{seconds:.1f} s -> {subject.label}",
            lesion_count=stats["lesion_count"], total_volume_ml=stats["total_volume_ml"], seconds=seconds,
            outputs={k: str(v) for k, v in written.items()},
        )
        rows.append(_summary_row(subject, "ok", stats=stats, seconds=seconds))
    if summary_path:
        write_text(csv_text(rows, SUMMARY_FIELDS), summary_path)
    failed = sum(r["status"] != "ok" for r in rows)
    if batch and failed:
        print(f"error: {failed} of {len(rows)} subjects failed; see {summary_path}", file=sys.stderr)
    return 1 if failed else 0


def write_outputs(subject: Subject, result, prob: bool, stats: bool) -> dict[str, Path]:
    """Write one subject's files, each atomically."""
    outputs = subject.outputs(prob, stats)
    statistics = {**result.statistics, "subject": subject.id, "inputs": [str(p) for p in subject.inputs],
                  "seconds": result.seconds}
    write_image(result.label, outputs["label"])
    if prob:
        write_image(result.probability, outputs["probability"])
    if stats:
        write_text(json.dumps(statistics, indent=2) + "\n", outputs["statistics_json"])
        write_text(statistics_csv(statistics), outputs["statistics_csv"])
    return outputs


def _summary_row(subject: Subject, status: str, stats: dict | None = None, seconds: float | None = None,
                 error: str = "") -> dict[str, Any]:
    stats = stats or {}
    return {"subject": subject.id, "status": status, "lesion_count": stats.get("lesion_count", ""),
            "total_volume_ml": stats.get("total_volume_ml", ""), "seconds": seconds if seconds is not None else "",
            "label_map": str(subject.label) if status == "ok" else "",
            "inputs": ";".join(str(p) for p in subject.inputs), "error": error}


FOLLOWUP_FILES = {"change": "change.nii.gz", "baseline_registered": "baseline_registered.nii.gz",
                  "followup_lesions": "followup_lesions.nii.gz", "baseline_lesions": "baseline_lesions.nii.gz",
                  "transform": "baseline_to_followup.tfm", "json": "change.json", "csv": "change.csv"}


def cmd_followup(args: argparse.Namespace) -> int:
    from samless.followup import ChangeRules, followup_change
    from samless.pipeline import Segmenter, load_inputs

    out = Path(args.output)
    if image_suffix(out):
        raise SamlessError(f"-o {out} names a file; follow-up writes a folder of results: give a folder.")
    inputs = {Path(args.baseline).resolve(), Path(args.followup).resolve()}
    if out.resolve() in inputs or any(out.resolve() in p.parents for p in inputs):
        raise SamlessError(f"output folder {out} holds an input; choose another -o.")
    refuse_existing([out], args.overwrite, "choose another -o")
    reporter = Reporter(args.progress, 1)
    package = load_package(resolve_model(args.model))
    options = segment_options(args)
    segmenter = Segmenter.for_options(package, options)
    rules = ChangeRules(**{rule.name: getattr(args, rule.name) for rule in dataclasses.fields(ChangeRules)})
    rules.check()
    reporter.start(0, "follow-up")
    reporter.stage("reading")
    check = not args.skip_contrast_check
    baseline = load_inputs([args.baseline], package.modalities, check_contrast=check)[0]
    followup = load_inputs([args.followup], package.modalities, check_contrast=check)[0]
    reporter.stage("segmenting")
    tick = time.perf_counter()
    change = followup_change(segmenter, baseline, followup, options=options, rules=rules,
                             allow_poor_registration=args.allow_poor_registration, progress=reporter.progress)
    seconds = round(time.perf_counter() - tick, 2)
    reporter.stage("writing")
    report = {"baseline": str(args.baseline), "followup": str(args.followup), "summary": change.summary,
              "registration": change.registration.summary(), "warnings": change.warnings,
              "labels": {"0": "background", "1": "stable", "2": "new", "3": "enlarging"},
              "coordinate_system": "LPS", "seconds": seconds, "lesions": change.lesions}
    with atomic_folder(out) as staging:
        files = {k: staging / v for k, v in FOLLOWUP_FILES.items()}
        write_image(change.label, files["change"])
        write_image(change.baseline_registered, files["baseline_registered"])
        write_image(change.followup.label, files["followup_lesions"])
        write_image(change.baseline_lesions, files["baseline_lesions"])
        sitk.WriteTransform(change.registration.transform, str(files["transform"]))
        write_text(json.dumps(report, indent=2) + "\n", files["json"])
        write_text(change_csv(change.lesions), files["csv"])
    for warning in change.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    s = change.summary
    reporter.finish(f"{s['new_lesions']} new, {s['enlarging_lesions']} enlarging, {s['stable_lesions']} stable "
                    f"lesions; {s['volume_baseline_ml']:.2f} -> {s['volume_followup_ml']:.2f} mL; {seconds:.1f} s "
                    f"-> {out}", summary=s, seconds=seconds, warnings=change.warnings,
                    outputs={k: str(out / v) for k, v in FOLLOWUP_FILES.items()})
    return 0


def change_csv(lesions: list[dict[str, Any]]) -> str:
    from samless.followup import TABLE_FIELDS

    rows = [{**{k: r[k] for k in TABLE_FIELDS if k in r},
             **dict(zip(("centroid_x_mm", "centroid_y_mm", "centroid_z_mm"), r["centroid_mm"]))} for r in lesions]
    return csv_text(rows, TABLE_FIELDS)


def cmd_info(args: argparse.Namespace) -> int:
    package = load_package(resolve_model(args.model))
    print(json.dumps(package.card.to_json(), indent=2) if args.json else describe(package))
    return 0


# --- the parser ----------------------------------------------------------------------------------

# The training commands live in samless.training (the [train] extra). Only the one asked for is imported,
# so `samless segment` never loads training code; the others are listed in `samless --help` from here.
TRAINING_COMMANDS = {
    "train": "train a network (phase 1 with SAM, phase 2 without)",
    "evaluate": "lesion-wise and voxel-wise metrics of models on a split",
    "tune": "choose a model's threshold and minimum lesion size on validation cases",
    "export": "turn a phase-2 checkpoint into a model package",
    "phantom": "write synthetic FLAIR (+T1/T2) phantoms with exact MS lesion masks and a split file",
}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: what was wrong, and where to read how to do it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def probability(text: str) -> float:
    """An argparse type: a probability strictly between 0 and 1."""
    value = _number(text, float)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability between 0 and 1 (exclusive); give e.g. 0.5")
    return value


def non_negative(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    value = _number(text, float)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number of 0 or more")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of 1 or more")
    return value


def _number(text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None


def _model_args(p: argparse.ArgumentParser) -> None:
    """Which model runs, where, and how: the flags of SegmentOptions (segment and followup alike)."""
    from samless.options import DEFAULT_BATCH_SIZE

    p.add_argument("--model", default=None, help=f"model package folder/.zip or bundled name (default {DEFAULT_MODEL})")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: up to 8)")
    p.add_argument("--threshold", type=probability, default=None,
                   help="lesion probability threshold, between 0 and 1 (model default)")
    p.add_argument("--min-lesion-mm3", type=non_negative, default=None, help="drop smaller lesions (model default)")
    p.add_argument("--tta", action="store_true", help="left-right flip test-time augmentation (2x slower)")
    p.add_argument("--three-plane", action=argparse.BooleanOptionalAction, default=None,
                   help="fuse axial, coronal and sagittal predictions (default: where the model was trained on all "
                   "three planes; --no-three-plane runs its axial slices only, about 3x faster)")
    p.add_argument("--borders", action=argparse.BooleanOptionalAction, default=None,
                   help="grow each lesion the network finds into its fainter rim, by the image's own contrast, with "
                   "the settings in the model card (default: as the card says; see `samless info`)")
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="slices per network call")


def _run_args(p: argparse.ArgumentParser, overwrite_help: str) -> None:
    """The input check, overwrite and progress flags of a command that reads scans and writes results."""
    p.add_argument("--skip-contrast-check", action="store_true",
                   help="accept a FLAIR input that looks T1- or T2-weighted (for experts)")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                   help="progress bar (people), JSON lines on stdout (programs), or none")


def segment_options(args: argparse.Namespace) -> SegmentOptions:
    """The options `_model_args` parsed (SegmentOptions.to_argv gives them back as flags)."""
    from samless.options import SegmentOptions

    return SegmentOptions(threshold=args.threshold, min_lesion_mm3=args.min_lesion_mm3, tta=args.tta,
                          three_plane=args.three_plane, borders=args.borders, batch_size=args.batch_size,
                          backend=args.backend, device=args.device, threads=args.threads)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `samless` parser; for a training `command`, with that command's real sub-parser (which needs
    samless.training), the other training commands listed by name only."""
    from samless.demo import register_cli as register_demo
    from samless.followup import ChangeRules

    parser = Parser(prog="samless", description="SAM-free MS lesion segmentation of brain FLAIR MRI.")
    parser.add_argument("--version", action="version", version=f"samless {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    seg = sub.add_parser("segment", help="segment MS lesions in one or more volumes",
                         description="Segment MS lesions. INPUT is an image file (NIfTI/NRRD/MHA), a DICOM "
                         "folder, FLAIR,T1,T2 files of one subject joined by commas (multi-modal models), or a "
                         "folder of subjects. Outputs are named after the label map: NAME_prob, NAME.json, NAME.csv.")
    seg.add_argument("inputs", nargs="+", metavar="INPUT")
    seg.add_argument("-o", "--output", required=True,
                     help="label map file for one subject (.nii.gz/.nii/.nrrd/.mha), or a folder (batch)")
    _model_args(seg)
    seg.add_argument("--prob", action="store_true", help="also write the probability map (NAME_prob)")
    seg.add_argument("--stats", action="store_true", help="also write lesion statistics (NAME.json, NAME.csv)")
    seg.add_argument("--output-suffix", choices=OUTPUT_SUFFIXES, default=".nii.gz", help="file type in batch mode")
    _run_args(seg, "replace existing outputs")
    seg.set_defaults(func=cmd_segment)

    fu = sub.add_parser("followup", help="new, enlarging and stable lesions between two scans of one patient",
                        description="Register the BASELINE FLAIR rigidly to the FOLLOWUP FLAIR, segment both with "
                        "the model and class each follow-up lesion as new, enlarging or stable (and baseline "
                        "lesions as shrinking or disappeared). Writes OUT/change.nii.gz (0 background, 1 stable, "
                        "2 new, 3 enlarging, on the follow-up grid), the registered baseline, both lesion masks, "
                        "the transform, change.json and change.csv.")
    fu.add_argument("baseline", metavar="BASELINE", help="the earlier FLAIR (file or DICOM folder)")
    fu.add_argument("followup", metavar="FOLLOWUP", help="the later FLAIR: results land on its grid")
    fu.add_argument("-o", "--output", required=True, help="output folder")
    _model_args(fu)
    for rule in dataclasses.fields(ChangeRules):  # the rules, their defaults and help live there
        fu.add_argument(f"--{rule.name.replace('_', '-')}", type=non_negative, default=rule.default,
                        help=f"{rule.metadata['help']} (default %(default)s)")
    fu.add_argument("--allow-poor-registration", action="store_true",
                    help="class the lesions even when the registered scans do not look like one patient's (a warning "
                    "is recorded)")
    _run_args(fu, "replace an existing output folder")
    fu.set_defaults(func=cmd_followup)

    info = sub.add_parser("info", help="print a model package's card")
    info.add_argument("model", nargs="?", default=None, help=f"package folder/.zip or bundled name ({DEFAULT_MODEL})")
    info.add_argument("--json", action="store_true", help="print model.json as is")
    info.set_defaults(func=cmd_info)
    register_demo(sub)

    for name, help_text in TRAINING_COMMANDS.items():
        if name == command:
            from samless.training.cli import register

            register(sub, name)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _needs_training(command: str, exc: ModuleNotFoundError) -> int:
    print(f"error: samless {command} needs the training extra (missing {exc.name}): pip install 'samless[train]'",
          file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command)
    except ModuleNotFoundError as exc:
        return _needs_training(command or "", exc)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SamlessError as exc:  # the one boundary: what went wrong and what to do, one line, exit 1
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if args.command not in TRAINING_COMMANDS:
            raise
        return _needs_training(args.command, exc)


if __name__ == "__main__":
    sys.exit(main())
