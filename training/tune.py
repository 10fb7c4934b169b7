"""`samless tune`: choose a model's post-processing (threshold, minimum lesion size) on validation cases.

The network runs once per case; every setting of the grid re-thresholds the stored probability map with
the same `relabel` that `samless segment` and the Slicer sensitivity slider use, so a grid costs seconds.
With `borders` (a list of `BorderGrowth` settings) each is grown on the stored network map first, and the
grid is scored for each. The chosen setting goes into a package with `samless export --postprocessing
BEST.json`. Tune on validation cases, never on the cases the model is then evaluated on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from samless.backends import Backend
from samless.borders import BorderGrowth
from samless.card import Postprocessing
from samless.errors import SamlessError
from samless.imageio import csv_text, refuse_existing, write_text
from samless.package import ModelPackage
from samless.pipeline import Segmenter, SegmentOptions, load_inputs, relabel
from samless.training.metrics import case_metrics
from samless.training.split import Case

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
MIN_LESION_MM3 = (0.0, 3.0, 6.0, 10.0, 15.0)


class NetworkMaps:
    """Each case's network map, computed once; `probabilities` grows borders on them and brings them to
    the cases' grids, with the truth masks (what `score_grid` scores)."""

    def __init__(self, segmenter: Segmenter, cases: Sequence[Case], progress: Callable[[Case], None] | None = None):
        self.segmenter = segmenter
        self.cases = []
        for case in cases:
            images = load_inputs(case.images, segmenter.modalities)
            prepared = segmenter.prepare(images)
            self.cases.append((prepared, segmenter.predict(prepared, SegmentOptions()), images[0],
                               sitk.ReadImage(str(case.mask))))
            if progress:
                progress(case)

    def probabilities(self, borders: BorderGrowth | None, threshold: float | None = None,
                      min_lesion_mm3: float | None = None) -> list[tuple[sitk.Image, sitk.Image]]:
        return [(self.segmenter.input_probability(prob, prepared, reference, borders, threshold, min_lesion_mm3), truth)
                for prepared, prob, reference, truth in self.cases]


def score_grid(post: Postprocessing, maps: Sequence[tuple[sitk.Image, sitk.Image]],
               thresholds: Sequence[float] = THRESHOLDS,
               min_sizes: Sequence[float] = MIN_LESION_MM3) -> list[dict[str, float]]:
    """Mean per-case Dice and lesion F1 of every setting; `score` is their mean (both matter)."""
    rows = []
    for threshold in thresholds:
        for min_mm3 in min_sizes:
            options = SegmentOptions(threshold=threshold, min_lesion_mm3=min_mm3)
            cases = [case_metrics(relabel(prob, post, options).label, truth, surface=False) for prob, truth in maps]
            row = {"threshold": threshold, "min_lesion_mm3": min_mm3}
            for key in ("dice", "lesion_f1", "lesion_tpr", "false_positives"):
                row[key] = float(np.nanmean([c[key] for c in cases]))
            row["score"] = (row["dice"] + row["lesion_f1"]) / 2
            rows.append(row)
    return rows


def tune(package: ModelPackage, cases: Sequence[Case], out: str | Path, *, backend: str | Backend = "auto",
         device: str = "auto", threads: int | None = None, thresholds: Sequence[float] = THRESHOLDS,
         min_sizes: Sequence[float] = MIN_LESION_MM3, borders: Sequence[BorderGrowth] = (), overwrite: bool = False,
         progress: Callable[[Case], None] | None = None) -> dict[str, Any]:
    """Write OUT/grid.csv and OUT/best.json (the post-processing to export); return the best row.

    Without `borders` the card's own border growth (if any) is kept; with them each is scored and the best
    one goes into best.json. `backend`: a name (the package's network on it) or a Backend to run instead."""
    out = Path(out)
    targets = [out / "grid.csv", out / "best.json"]
    refuse_existing(targets, overwrite, "choose another --out")
    if not all(0.0 < t < 1.0 for t in thresholds) or any(m < 0 for m in min_sizes):
        raise SamlessError("thresholds must lie in (0, 1) and minimum sizes be >= 0 mm^3.")
    segmenter = (Segmenter.from_package(package, backend, device, threads) if isinstance(backend, str)
                 else Segmenter(package.card, backend))
    maps = NetworkMaps(segmenter, cases, progress)
    scored = []
    for growth in borders or [segmenter.borders_for(SegmentOptions())]:
        if growth is None:  # one map serves every setting
            rows = score_grid(package.card.postprocessing, maps.probabilities(None), thresholds, min_sizes)
            scored += [(row, None) for row in rows]
            continue
        for threshold in thresholds:  # lesions grow from each setting's threshold and size, as a card with it would
            for min_mm3 in min_sizes:
                scored += [(row, growth) for row in score_grid(package.card.postprocessing, maps.probabilities(
                    growth, threshold, min_mm3), [threshold], [min_mm3])]
    rows = [({"rim_fraction": g.rim_fraction, "reach_mm": g.reach_mm} if borders else {}) | row for row, g in scored]
    index = max(range(len(rows)), key=lambda i: rows[i]["score"])
    best, best_growth = rows[index], scored[index][1]
    out.mkdir(parents=True, exist_ok=True)
    write_text(csv_text(rows), targets[0])
    chosen = {"threshold": best["threshold"], "min_lesion_mm3": best["min_lesion_mm3"],
              **({"borders": best_growth.to_json()} if borders else {}),
              "validation": {k: v for k, v in best.items()
                             if k not in ("threshold", "min_lesion_mm3", "rim_fraction", "reach_mm")},
              "cases": [c.id for c in cases]}
    write_text(json.dumps(chosen, indent=2) + "\n", targets[1])
    return best


def read_postprocessing(path: str | Path) -> dict[str, Any]:
    """The threshold, minimum lesion size and border growth (where tuned) of a `samless tune` best.json."""
    try:
        chosen = json.loads(Path(path).read_text(encoding="utf-8"))
        post: dict[str, Any] = {"threshold": float(chosen["threshold"]),
                                "min_lesion_mm3": float(chosen["min_lesion_mm3"])}
    except FileNotFoundError:
        raise SamlessError(f"{path} does not exist; make it with `samless tune`.") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise SamlessError(f"{path} is not a `samless tune` result (it needs threshold and min_lesion_mm3: "
                           f"{exc}).") from None
    if not 0.0 < post["threshold"] < 1.0 or post["min_lesion_mm3"] < 0:
        raise SamlessError(f"{path}: threshold must lie in (0, 1) and min_lesion_mm3 be >= 0.")
    if chosen.get("borders"):
        post["borders"] = BorderGrowth.from_card(Postprocessing.from_json(chosen)).to_json()  # checked as a card's
    return post
