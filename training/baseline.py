"""A classical baseline for context: FLAIR hyperintensity within white matter, grown from confident
seeds, in the spirit of LST's lesion growth algorithm (LGA).

1. z-score the FLAIR against white matter, robustly (median and MAD: lesions do not inflate it);
2. seeds: voxels above `seed_z` inside white matter;
3. growth: connected voxels above `grow_z` within white matter dilated by a voxel (lesion borders);
4. lesions under the minimum size are dropped, as in the network's post-processing.

The defaults (seeds above 6, growth above 4 robust standard deviations) were chosen on generated
phantoms: lower growth thresholds leak through the white matter into one huge false lesion.

It needs a white-matter map on the FLAIR grid. LST computes one from a T1; for phantoms the generator's
own anatomy gives it (`phantom_white_matter`), which is if anything generous to the baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samless.errors import SamlessError
from samless.lesions import label_map, lesion_components


def lga_baseline(flair: sitk.Image, white_matter: sitk.Image, seed_z: float = 6.0, grow_z: float = 4.0,
                 min_lesion_mm3: float = 3.0) -> sitk.Image:
    """uint8 lesion label map on the FLAIR's grid."""
    values = sitk.GetArrayFromImage(flair).astype(np.float32)
    wm = sitk.GetArrayFromImage(white_matter) > 0.5
    if wm.sum() < 100:
        raise SamlessError("the white-matter map is (almost) empty; the baseline cannot normalise the FLAIR.")
    median = float(np.median(values[wm]))
    spread = 1.4826 * float(np.median(np.abs(values[wm] - median))) or float(values[wm].std()) or 1.0
    z = (values - median) / spread
    region = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(wm.astype(np.uint8)), [1, 1, 1])) > 0
    candidates = (z > grow_z) & region
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(candidates.astype(np.uint8)),
                                                            True))
    seeded = np.unique(labels[(z > seed_z) & wm & (labels > 0)])
    grown = sitk.GetImageFromArray(np.isin(labels, seeded).astype(np.float32))
    grown.CopyInformation(flair)
    return label_map(lesion_components(grown, 0.5, min_lesion_mm3))


def phantom_white_matter(case_dir: str | Path) -> sitk.Image:
    """The white-matter probability of a generated phantom case, on its grid (regenerated from its seed)."""
    from samless.training.phantom import generate_case, template_map

    meta_path = Path(case_dir) / "phantom.json"
    if not meta_path.exists():
        raise SamlessError(f"{case_dir} has no phantom.json: the LGA-like baseline needs a white-matter map, "
                           "which only generated phantoms provide.")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    case = generate_case(meta["seed"], meta["protocol"], lesion_load=meta["lesion_load"],
                         randomize=meta.get("randomize", False), motion=meta.get("motion", True),
                         scale=meta.get("scale", 1))
    return template_map(case, "wm")
