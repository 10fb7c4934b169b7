"""`samless demo`: segment the bundled sample with the bundled demo model and show how it did.

Prints the lesion count, lesion volume, Dice against the known truth and seconds taken; writes the
label map, probability map, lesion table and an overlay PNG.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samless.errors import SamlessError

SAMPLE = Path(__file__).resolve().parents[1] / "Resources" / "Sample"


def overlay_png(flair: sitk.Image, truth: sitk.Image, found: sitk.Image, path: Path, title: str) -> None:
    """Axial slices through the lesions: truth outlined in green, the model's lesions in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = sitk.GetArrayFromImage(sitk.DICOMOrient(flair, "LPS")).astype(np.float32)
    true = sitk.GetArrayFromImage(sitk.DICOMOrient(truth, "LPS")) > 0
    pred = sitk.GetArrayFromImage(sitk.DICOMOrient(found, "LPS")) > 0
    load = (true | pred).sum(axis=(1, 2))
    picks = np.argsort(load)[::-1][:6] if load.any() else np.linspace(0, len(load) - 1, 6).astype(int)
    lo, hi = np.percentile(image, [1, 99.5])
    fig, axes = plt.subplots(2, 3, figsize=(10.5, 7.5), facecolor="black")
    for ax, k in zip(axes.ravel(), sorted(picks)):
        ax.imshow(image[k], cmap="gray", vmin=lo, vmax=hi)
        for mask, colour in ((true[k], "lime"), (pred[k], "red")):
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=colour, linewidths=0.8)
        ax.set_title(f"axial slice {k}", color="white", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title}\ngreen: truth   red: model", color="white", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80, facecolor="black")
    plt.close(fig)


def run(out: Path, model: str | None, overwrite: bool, backend: str = "auto") -> dict:
    from samless.cli import Subject, check_outputs, write_outputs
    from samless.pipeline import Segmenter, load_inputs
    from samless.training.metrics import case_metrics

    flair_path, truth_path = SAMPLE / "flair.nii.gz", SAMPLE / "mask.nii.gz"
    if not flair_path.exists():
        raise SamlessError(f"the bundled sample {flair_path} is missing; run scripts/make_demo_model.sh.")
    subject = Subject("sample", [flair_path], out / "sample_lesions.nii.gz")
    png = out / "sample_overlay.png"
    check_outputs([subject], [png], prob=True, stats=True, overwrite=overwrite)
    tick = time.perf_counter()
    segmenter = Segmenter.from_model(model, backend=backend)
    images = load_inputs([flair_path], segmenter.package.modalities)
    result = segmenter.segment(images)
    written = write_outputs(subject, result, prob=True, stats=True)
    seconds = time.perf_counter() - tick
    metrics = case_metrics(result.label, truth_path)
    stats = result.statistics
    overlay_png(images[0], sitk.ReadImage(str(truth_path)), result.label, png,
                f"{segmenter.package.name}: {stats['lesion_count']} lesions, {stats['total_volume_ml']:.2f} mL, "
                f"Dice {metrics['dice']:.3f}")
    return {"model": segmenter.package.name, "backend": segmenter.backend.name, "seconds": seconds,
            "lesions": stats["lesion_count"], "volume_ml": stats["total_volume_ml"],
            "true_lesions": metrics["true_lesions"], "true_volume_ml": metrics["true_volume_ml"],
            "dice": metrics["dice"], "lesion_f1": metrics["lesion_f1"],
            "outputs": {**{k: str(v) for k, v in written.items()}, "overlay": str(png)}}


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        r = run(Path(args.out), args.model, args.overwrite, args.backend)
    except SamlessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"model {r['model']} ({r['backend']} backend) on the bundled sample (a synthetic phantom)\n"
          f"  lesions found   : {r['lesions']} (truth {r['true_lesions']})\n"
          f"  lesion volume   : {r['volume_ml']:.2f} mL (truth {r['true_volume_ml']:.2f} mL)\n"
          f"  Dice            : {r['dice']:.3f}   lesion-wise F1: {r['lesion_f1']:.3f}\n"
          f"  seconds         : {r['seconds']:.1f} (load, segment, write)\n"
          + "".join(f"  {k:<16}: {v}\n" for k, v in r["outputs"].items()), end="")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="segment the bundled sample with the demo model (Dice, volume, overlay)")
    demo.add_argument("--out", default="output/demo", help="folder for the outputs (default output/demo)")
    demo.add_argument("--model", default=None, help="another model package instead of the demo model")
    demo.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"))
    demo.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier demo run")
    demo.set_defaults(func=cmd_demo)
