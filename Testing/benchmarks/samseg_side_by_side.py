"""The peer, side by side: SAMSEG with its lesion model and samless on the same cases (Dice, lesion F1, seconds).

SAMSEG (FreeSurfer's Sequence Adaptive Multimodal SEGmentation, PyPI `samseg`, MIT) ships its atlas and
lesion model and needs TensorFlow: it lives in a venv of its own (``--setup`` makes it), never the
project's. It takes FLAIR + T1; its lesions are label 99 of ``seg.mgz`` on the first input's grid.

Cases: the real cross-sectional patients of ../shared/data/ljubljana-ms (evaluation only: never tune on
them) and, with ``--phantoms SPLIT``, the test cases of a phantom split made with ``--modalities flair,t1``.
SAMSEG takes about 25 minutes a 1 mm case on 2 threads; its results are kept in OUT/samseg/<case> and
reused (``--rerun`` runs it again).

    .venv/bin/python Testing/benchmarks/samseg_side_by_side.py --setup
    .venv/bin/python Testing/benchmarks/samseg_side_by_side.py [--model samless-demo] [--phantoms SPLIT --n 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from samless.pipeline import Segmenter, load_inputs
from samless.training.metrics import case_metrics

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "ljubljana-ms"
VENV = ROOT / ".venv-samseg"
# As seen working here (../shared/data/README.md).
SAMSEG_PACKAGES = ["samseg==0.4a0", "surfa==0.6.3", "numpy==1.26.4", "tensorflow-cpu==2.21.0", "nibabel"]
LESION_LABEL = 99


def setup(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *SAMSEG_PACKAGES], check=True)


def cases(data: Path, phantoms: Path | None, n: int) -> list[dict[str, Any]]:
    found = [{"case": p.name, "flair": p / "flair.nii.gz", "t1": p / "t1.nii.gz", "mask": p / "mask.nii.gz"}
             for p in sorted((data / "cross_sectional").glob("*")) if (p / "mask.nii.gz").is_file()]
    if phantoms is not None:
        split = json.loads(phantoms.read_text())
        for item in split["test"][:n]:
            if "t1" not in item:
                raise SystemExit(f"{phantoms}: its cases have no T1; make them with --modalities flair,t1")
            found.append({"case": "phantom-" + Path(item["flair"]).parent.name,
                          **{k: phantoms.parent / item[k] for k in ("flair", "t1", "mask")}})
    return found


def run_samseg(venv: Path, case: dict[str, Any], out: Path, threads: int, rerun: bool) -> float | None:
    """SAMSEG on one case (or its kept result); its seconds, or None when the kept result is reused."""
    seg = out / "seg.mgz"
    if seg.is_file() and not rerun:
        return None
    tick = time.perf_counter()
    subprocess.run([str(venv / "bin" / "run_samseg"), "-i", str(case["t1"]), str(case["flair"]), "-m", "t1", "flair",
                    "--pallidum-separate", "--lesion", "--lesion-mask-pattern", "0", "1", "--threads", str(threads),
                    "-o", str(out)], check=True)
    seconds = time.perf_counter() - tick
    (out / "seconds.txt").write_text(f"{seconds:.1f}\n")
    return seconds


def samseg_lesions(out: Path, flair: sitk.Image) -> sitk.Image:
    """SAMSEG's label 99 on the FLAIR's grid (read by nibabel; refused if SAMSEG's grid is another)."""
    img = nib.load(str(out / "seg.mgz"))
    lesions = (np.asarray(img.dataobj) == LESION_LABEL).astype(np.uint8)
    # nibabel arrays are (i, j, k) in RAS; SimpleITK's (k, j, i) in LPS with the same voxel order.
    result = sitk.GetImageFromArray(lesions.transpose(2, 1, 0))
    affine = img.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    result.SetSpacing(tuple(float(s) for s in spacing))
    lps = np.diag([-1.0, -1.0, 1.0])
    result.SetOrigin(tuple(float(v) for v in lps @ affine[:3, 3]))
    result.SetDirection(tuple(float(v) for v in (lps @ (affine[:3, :3] / spacing)).ravel()))
    same = (result.GetSize() == flair.GetSize() and np.allclose(result.GetOrigin(), flair.GetOrigin(), atol=1e-3)
            and np.allclose(result.GetDirection(), flair.GetDirection(), atol=1e-5))
    if not same:  # SAMSEG writes on its first input's (the T1's) grid: bring it onto the FLAIR's
        result = sitk.Resample(result, flair, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return result


def row(method: str, case: str, label: sitk.Image, truth: sitk.Image, seconds: float | None) -> dict[str, Any]:
    m = case_metrics(label, truth, surface=False)
    return {"method": method, "case": case, "dice": round(m["dice"], 3), "lesion_f1": round(m["lesion_f1"], 3),
            "true_volume_ml": round(m["true_volume_ml"], 2), "found_volume_ml": round(m["pred_volume_ml"], 2),
            "seconds": None if seconds is None else round(seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help=f"make SAMSEG's venv ({VENV.name}) and stop")
    parser.add_argument("--samseg-venv", type=Path, default=VENV)
    parser.add_argument("--model", default="samless-demo")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--phantoms", type=Path, help="a phantom split.json (cases with T1) to add its test cases")
    parser.add_argument("--n", type=int, default=2, help="phantom test cases to take (default 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rerun", action="store_true", help="run SAMSEG again where its result is kept")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmark_results" / "samseg")
    args = parser.parse_args()
    if args.setup:
        setup(args.samseg_venv)
        return 0
    if not (args.samseg_venv / "bin" / "run_samseg").is_file():
        print(f"no SAMSEG in {args.samseg_venv}; make it with --setup", file=sys.stderr)
        return 2
    if not args.data.is_dir() and args.phantoms is None:
        print(f"skipped: no real data at {args.data} and no --phantoms", file=sys.stderr)
        return 0
    segmenter = Segmenter.from_model(args.model, backend="onnx", device="cpu", threads=args.threads)
    rows = []
    for case in cases(args.data, args.phantoms, args.n):
        truth = sitk.ReadImage(str(case["mask"]))
        tick = time.perf_counter()
        flair = load_inputs([case["flair"]], segmenter.modalities, check_contrast=True)[0]
        ours = segmenter.segment([flair]).label
        rows.append(row(segmenter.name, case["case"], ours, truth, time.perf_counter() - tick))
        out = args.out / "samseg" / case["case"]
        out.mkdir(parents=True, exist_ok=True)
        seconds = run_samseg(args.samseg_venv, case, out, args.threads, args.rerun)
        if seconds is None and (out / "seconds.txt").is_file():
            seconds = float((out / "seconds.txt").read_text())
        rows.append(row("samseg", case["case"], samseg_lesions(out, flair), truth, seconds))
        print(rows[-2], rows[-1], flush=True)
    keys = list(rows[0])
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join("" if r[k] is None else str(r[k]) for k in keys) + " |" for r in rows]
    text = "\n".join(table)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "samseg_side_by_side.md").write_text(text + "\n")
    (args.out / "samseg_side_by_side.json").write_text(json.dumps(
        {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "threads": args.threads, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
