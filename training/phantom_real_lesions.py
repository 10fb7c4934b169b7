"""Real lesion shapes and places for the phantoms: consensus lesion masks in MNI space, laid on the canvas.

Real MS lesions are confluent, periventricular, irregular and up to 50+ mL; the drawn ellipsoids of
`phantom_lesions` are none of these. A folder of real masks on any MNI152 grid (e.g. the 27 of
`../shared/data/ljubljana-ms/lesion_masks_mni`) gives a case its lesions: one mask, mirrored left-right or
not, some of its lesions left out (a lighter load), edges softened to partial volume, kept out of the
template's ventricles and outside the brain. Each connected lesion gets its own intensity, as drawn ones do.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from .phantom_anatomy import Anatomy, anatomy, bbox, smoothstep
from .phantom_lesions import LesionField

EDGE_SIGMA_MM = 0.7  # partial-volume softening of a binary mask's edge


def real_mask_paths(folder: str | Path) -> tuple[str, ...]:
    """The lesion masks (*.nii.gz, *.nii) in `folder`, sorted; an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--real-lesions {folder}: not a folder; give a folder of MNI-space lesion masks.")
    paths = sorted(str(p) for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii")))
    if not paths:
        raise ValueError(f"--real-lesions {folder}: no .nii.gz or .nii lesion masks in it.")
    return tuple(paths)


@functools.lru_cache(maxsize=64)
def _on_canvas(path: str, scale: int, mirror: bool) -> tuple[tuple[slice, ...], np.ndarray]:
    """The mask's soft lesion fraction on the canvas (mirrored about the midline x = 0), as a bounding box
    and its uint8 content (0..255), kept compact because many masks are cached."""
    A = anatomy(scale)
    mask = sitk.Cast(sitk.ReadImage(path) > 0, sitk.sitkFloat32)
    if sitk.GetArrayViewFromImage(mask).max() <= 0:
        raise ValueError(f"{path} holds no lesion voxels; remove it from the real-lesion folder.")
    flip = sitk.AffineTransform(3)
    if mirror:  # LPS x -> -x (MNI's midline is x = 0)
        flip.SetMatrix((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    canvas = A.to_image(np.zeros(A.shape, np.float32))
    frac = sitk.GetArrayFromImage(sitk.Resample(mask, canvas, flip, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    frac = ndi.gaussian_filter(frac, EDGE_SIGMA_MM / A.spacing)
    # not into the template's CSF (another patient's ventricles differ) nor outside its brain
    full_csf = np.zeros(A.shape, np.float32)
    full_csf.ravel()[A.idx_brain] = A.inner["csf"]
    frac *= A.brain * (1.0 - smoothstep(full_csf, 0.35, 0.65))
    if frac.max() < 0.5:
        raise ValueError(f"{path}: its lesions fall outside the MNI152 brain; is it a mask in MNI space?")
    box = bbox(frac > 0.02, 1)
    return box, np.rint(frac[box] * 255).astype(np.uint8)


def draw_real_lesions(A: Anatomy, rng: np.random.Generator, paths: Sequence[str]) -> tuple[LesionField, str]:
    """One real mask's lesions for one case: the field and the mask file's name."""
    path = str(paths[int(rng.integers(len(paths)))])
    box, content = _on_canvas(path, A.scale, bool(rng.random() < 0.5))
    prob = np.zeros(A.shape, np.float32)
    prob[box] = content.astype(np.float32) / 255.0
    ids, n = ndi.label(prob > 0.02, structure=np.ones((3, 3, 3)))
    drop = rng.random(n + 1) < rng.uniform(0.0, 0.5)  # leave some lesions out: lighter loads, new layouts
    drop[0] = False
    if n and drop[1:].all():
        drop[1 + int(rng.integers(n))] = False
    gone = drop[ids]
    prob[gone] = 0.0
    ids[gone] = 0
    kept = np.flatnonzero(~drop[1:]) + 1
    relabel = np.zeros(n + 1, np.int16)
    relabel[kept] = np.arange(1, kept.size + 1)
    ids = relabel[ids]
    centres = ndi.center_of_mass(prob, ids, np.arange(1, kept.size + 1)) if kept.size else []
    o = np.asarray(A.origin_ras)
    info = [{"type": "real", "cluster": -1,
             "centre_ras_mm": [round(float(v), 1) for v in o + A.spacing * np.asarray(c)[::-1]]}
            for c in centres]
    volume_ml = float((prob >= 0.5).sum()) * A.spacing ** 3 / 1000.0
    load = "high" if volume_ml > 15.0 else "medium" if volume_ml > 3.0 else "low"  # drives the atrophy drawn
    return LesionField(prob, ids, info, load), Path(path).name
