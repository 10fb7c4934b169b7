"""`samless demo`: segment the bundled sample with the bundled demo model and show how it did.

Prints the lesion count, lesion volume, Dice against the known truth and seconds taken; writes the
label map, probability map, lesion table and an overlay PNG. Runs on the light install (no torch, no
matplotlib): the picture is drawn with numpy and written by SimpleITK.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samless.errors import SamlessError
from samless.imageio import atomic_output
from samless.metrics import dice, lesion_metrics
from samless.package import bundled_resource_dirs

TRUTH_RGB, FOUND_RGB = (0, 255, 0), (255, 0, 0)


def sample_folder() -> Path:
    """The bundled sample (a synthetic phantom with its truth): in the checkout or the installed wheel."""
    for folder in bundled_resource_dirs("Sample"):
        if (folder / "flair.nii.gz").is_file():
            return folder
    raise SamlessError("the bundled sample (Resources/Sample/flair.nii.gz) is missing from this installation; "
                       "reinstall samless, or run scripts/make_demo_model.sh in a checkout.")


def _outline(mask: np.ndarray) -> np.ndarray:
    """The mask's border pixels: in the mask, with a 4-neighbour outside it."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def overlay_png(flair: sitk.Image, truth: sitk.Image | None, found: sitk.Image, path: Path) -> None:
    """Six axial slices through the most lesion voxels, tiled 3 x 2: truth (if known) outlined in green, the
    model's lesions in red (radiological view, anterior up)."""
    image = sitk.GetArrayFromImage(sitk.DICOMOrient(flair, "LPS")).astype(np.float32)
    pred = sitk.GetArrayFromImage(sitk.DICOMOrient(found, "LPS")) > 0
    true = sitk.GetArrayFromImage(sitk.DICOMOrient(truth, "LPS")) > 0 if truth is not None else np.zeros_like(pred)
    load = (true | pred).sum(axis=(1, 2))
    picks = np.argsort(load)[::-1][:6] if load.any() else np.linspace(0, len(load) - 1, 6).astype(int)
    lo, hi = np.percentile(image, [1, 99.5])
    grey = (np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    tiles = []
    for k in sorted(picks):
        rgb = np.repeat(grey[k][..., None], 3, axis=-1)
        rgb[_outline(true[k])] = TRUTH_RGB
        rgb[_outline(pred[k])] = FOUND_RGB
        tiles.append(rgb)
    tiles += [np.zeros_like(tiles[0])] * (6 - len(tiles))
    picture = np.concatenate([np.concatenate(tiles[:3], axis=1), np.concatenate(tiles[3:], axis=1)], axis=0)
    with atomic_output(path) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(picture, isVector=True), str(tmp))


def run(out: Path, model: str | None, overwrite: bool, backend: str = "auto") -> dict:
    from samless.cli import Subject, check_outputs, write_outputs
    from samless.pipeline import Segmenter, load_inputs

    sample = sample_folder()
    flair_path, truth_path = sample / "flair.nii.gz", sample / "mask.nii.gz"
    subject = Subject("sample", [flair_path], out / "sample_lesions.nii.gz")
    png = out / "sample_overlay.png"
    check_outputs([subject], [png], prob=True, stats=True, overwrite=overwrite)
    tick = time.perf_counter()
    segmenter = Segmenter.from_model(model, backend=backend)
    images = load_inputs([flair_path], segmenter.modalities, check_contrast=True)
    result = segmenter.segment(images)
    written = write_outputs(subject, result, prob=True, stats=True)
    seconds = time.perf_counter() - tick
    truth = sitk.ReadImage(str(truth_path))
    pred, true = sitk.GetArrayFromImage(result.label) > 0, sitk.GetArrayFromImage(truth) > 0
    voxel_mm3 = float(np.prod(truth.GetSpacing()))
    lesions = lesion_metrics(pred, true, voxel_mm3)
    overlay_png(images[0], truth, result.label, png)
    stats = result.statistics
    return {"model": segmenter.name, "backend": segmenter.backend.name, "seconds": seconds,
            "lesions": stats["lesion_count"], "volume_ml": stats["total_volume_ml"],
            "true_lesions": lesions["true_lesions"], "true_volume_ml": float(true.sum()) * voxel_mm3 / 1000.0,
            "dice": dice(pred, true), "lesion_f1": lesions["lesion_f1"],
            "outputs": {**{k: str(v) for k, v in written.items()}, "overlay": str(png)}}


def cmd_demo(args: argparse.Namespace) -> int:
    r = run(Path(args.out), args.model, args.overwrite, args.backend)
    print(f"model {r['model']} ({r['backend']} backend) on the bundled sample (a synthetic phantom)\n"
          f"  lesions found   : {r['lesions']} (truth {r['true_lesions']})\n"
          f"  lesion volume   : {r['volume_ml']:.2f} mL (truth {r['true_volume_ml']:.2f} mL)\n"
          f"  Dice            : {r['dice']:.3f}   lesion-wise F1: {r['lesion_f1']:.3f}\n"
          f"  seconds         : {r['seconds']:.1f} (load, segment, write)\n"
          + "".join(f"  {k:<16}: {v}\n" for k, v in r["outputs"].items())
          + "  overlay colours : green = truth, red = model\n", end="")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="segment the bundled sample with the demo model (Dice, volume, overlay)")
    demo.add_argument("--out", default="output/demo", help="folder for the outputs (default output/demo)")
    demo.add_argument("--model", default=None, help="another model package instead of the demo model")
    demo.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"))
    demo.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier demo run")
    demo.set_defaults(func=cmd_demo)
