"""MR contrast and acquisition for the phantoms: tissue intensities on the canvas, then an oblique scanner
grid with head motion, subject shape variation, thick-slice averaging, bias field, Rician noise and
scanner-like integer scaling.

The output image at physical point p (LPS, scanner frame) shows the canvas at T(p) where
T = deformation o subject affine o head motion (``Acquisition.transform``; SimpleITK's convention of a
transform from output to input space). Images and the lesion probability go through the same T, so the
mask (probability >= 0.5) lies exactly on the image grid.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from .phantom_anatomy import BRAIN_CENTRE_RAS, Anatomy, bbox, smoothstep
from .phantom_lesions import LesionField

MODALITIES = ("flair", "t1", "t2")
PROTOCOLS = ("3d", "2d")
# Class intensities relative to white matter = 1: (low, high) for realistic cases.
# lesion: the case mean; each lesion varies around it (`lesion_jitter`).
_CONTRAST = {
    "flair": {"wm": (1.0, 1.0), "gm": (1.12, 1.32), "dgm": (0.35, 0.75), "csf": (0.10, 0.28),
              "lesion": (1.45, 1.95), "fat": (1.3, 1.9), "skin": (0.7, 1.0), "muscle": (0.45, 0.7),
              "marrow": (0.55, 1.0), "bone": (0.02, 0.08), "vitreous": (0.08, 0.2), "mucosa": (0.9, 1.4),
              "pv_rim": (0.0, 0.18)},
    "t1": {"wm": (1.0, 1.0), "gm": (0.58, 0.72), "dgm": (0.4, 0.7), "csf": (0.12, 0.28),
           "lesion": (0.55, 0.8), "fat": (1.1, 1.4), "skin": (0.6, 0.8), "muscle": (0.4, 0.6),
           "marrow": (0.85, 1.2), "bone": (0.02, 0.06), "vitreous": (0.12, 0.25), "mucosa": (0.5, 0.7),
           "pv_rim": (0.0, 0.0)},
    "t2": {"wm": (1.0, 1.0), "gm": (1.3, 1.6), "dgm": (0.3, 0.6), "csf": (2.6, 3.4),
           "lesion": (1.8, 2.4), "fat": (1.2, 1.7), "skin": (0.7, 0.9), "muscle": (0.5, 0.7),
           "marrow": (0.9, 1.3), "bone": (0.03, 0.07), "vitreous": (2.5, 3.2), "mucosa": (1.6, 2.2),
           "pv_rim": (0.0, 0.1)},
}
# dgm is a fraction of the way from WM to GM; pv_rim a periventricular lining added on FLAIR/T2.


@dataclass
class Acquisition:
    reference: sitk.Image  # the output grid (empty)
    transform: sitk.Transform  # output physical point -> canvas physical point (MNI, LPS): deform o affine
    affine: sitk.Transform  # subject shape o head pose
    deform: sitk.Transform  # ventricular widening, canvas space, confined to a box around the ventricles
    meta: dict
    pose: sitk.Transform | None = None  # the head pose alone (rigid): output point -> scanner-aligned head point


# --- contrast on the canvas -----------------------------------------------------------------------

def draw_contrast(modality: str, rng: np.random.Generator, randomize: bool) -> dict[str, float]:
    """Class intensities of one modality for one case."""
    table = _CONTRAST[modality]
    p = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in table.items()}
    if randomize:  # SynthSeg-style: any contrast, but lesions still stand out from white matter
        for k in ("wm", "gm", "csf", "fat", "skin", "muscle", "marrow", "bone", "vitreous", "mucosa"):
            p[k] = float(rng.uniform(0.02, 1.6))
        p["dgm"] = float(rng.uniform(0.0, 1.0))
        p["pv_rim"] = float(rng.uniform(0.0, 0.2)) * p["wm"]
        sign = 1.0 if rng.random() < (0.15 if modality == "t1" else 0.85) else -1.0  # mostly FLAIR/T2-like
        p["lesion"] = float(max(0.02, p["wm"] + sign * rng.uniform(0.3, 1.0) * max(p["wm"], 0.3)))
    p["lesion_jitter"] = 0.12 if not randomize else 0.2
    return p


def layer_thickness(rng: np.random.Generator) -> dict[str, float]:
    """Per-case extra-cerebral layer thicknesses (mm): CSF rim (atrophy), skull tables, diploe, scalp."""
    return {"csf": float(rng.uniform(1.2, 3.5)), "table": float(rng.uniform(1.2, 2.0)),
            "diploe": float(rng.uniform(2.5, 4.5)), "scalp": float(rng.uniform(4.0, 7.0))}


def _rolled(field: np.ndarray, shift, idx: np.ndarray) -> np.ndarray:
    return np.roll(field, shift, axis=(0, 1, 2)).ravel()[idx]


def tissue_weights(A: Anatomy, layers: dict[str, float], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Soft class maps of the extra-cerebral head for one case, over `A.idx_outer` (1-D float32)."""
    o = A.outer
    shift = tuple(int(v) for v in rng.integers(0, 40, 3))
    tex = _rolled(A.tex_coarse, shift, A.idx_outer)
    fine = _rolled(A.tex_fine, shift[::-1], A.idx_outer)
    d = o["d_out"] + 0.8 * tex  # wavy layer boundaries
    t_csf = layers["csf"]
    t_in = t_csf + layers["table"]
    t_dip = t_in + layers["diploe"]
    t_out = t_dip + layers["table"]
    inside_skull = smoothstep(d, t_csf - 0.5, t_csf + 0.5)
    beyond = smoothstep(d, t_out - 0.5, t_out + 0.5)
    skull = inside_skull * (1 - beyond)
    marrow = smoothstep(d, t_in - 0.5, t_in + 0.5) * (1 - smoothstep(d, t_dip - 0.5, t_dip + 0.5))
    scalp = 1 - smoothstep(o["d_skin"], layers["scalp"] - 0.7, layers["scalp"] + 0.7)
    skin = 1 - smoothstep(o["d_skin"], 0.8, 1.8)
    deep = beyond * (1 - scalp)  # face and neck soft tissue under the scalp
    fat_patch = smoothstep(tex + 0.25 * fine, -0.2, 1.2) * 0.5 + 0.1
    w = {"csf_rim": 1 - inside_skull, "marrow": skull * marrow, "bone": skull * (1 - marrow),
         "skin": beyond * scalp * skin,
         "fat": beyond * scalp * (1 - skin) * (1 - o["temporalis"]) + deep * fat_patch,
         "muscle": beyond * scalp * (1 - skin) * o["temporalis"] + deep * (1 - fat_patch)}
    keep = (1 - o["eyes"]) * (1 - o["orbit_fat"]) * (1 - o["sinus"])
    w = {k: (v * keep).astype(np.float32) for k, v in w.items()}
    w["vitreous"] = o["eyes"]
    w["fat"] += o["orbit_fat"] * (1 - o["eyes"])
    w["mucosa"] = (o["sinus"] * (1 - smoothstep(o["sinus"], 0.3, 0.9))).astype(np.float32)
    return w


def cortical_folds(A: Anatomy, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The brain's tissue fractions (`A.inner`) with sulci cut into the cortex, for one case.

    The template averages 152 brains, so its cortex is a smooth band; one brain's cortex is folded, bright
    grey matter on FLAIR beside thin dark sulcal CSF. The zero sheets of a smooth random field (rolled per
    case) are curved surfaces about a gyrus apart: there, cortical grey matter becomes CSF."""
    c = dict(A.inner)
    shift = tuple(int(v) for v in rng.integers(0, 80, 3))
    f = _rolled(A.tex_folds, shift, A.idx_brain)
    width = rng.uniform(0.15, 0.4)  # ~1-2.5 mm wide sulci
    sulcus = (1.0 - smoothstep(np.abs(f), 0.0, width)) * rng.uniform(0.6, 1.0)
    move = (sulcus * c["gm"] * (1.0 - c["deep"])).astype(np.float32)
    c["gm"] = c["gm"] - move
    c["csf"] = c["csf"] + move
    return c


def synthesize(A: Anatomy, p: dict[str, float], weights: dict[str, np.ndarray], lesions: LesionField,
               lesion_idx: np.ndarray, lesion_values: np.ndarray, rng: np.random.Generator,
               randomize: bool, tissue: dict[str, np.ndarray] | None = None,
               lesion_profile: np.ndarray | None = None) -> np.ndarray:
    """One modality on the canvas (float32, white matter ~ p['wm']); `tissue` replaces the template's
    brain tissue fractions (e.g. `cortical_folds`); `lesion_profile` (over `lesion_idx`, 0..1) scales each
    lesion voxel's contrast (`lesion_rim_profile`)."""
    c = A.inner if tissue is None else tissue
    gm_val = p["gm"] * (1 - c["deep"]) + (p["wm"] + p["dgm"] * (p["gm"] - p["wm"])) * c["deep"]
    inner = c["wm"] * p["wm"] + c["gm"] * gm_val + c["csf"] * p["csf"]
    if p["pv_rim"]:  # the thin bright periventricular lining of normal FLAIR
        inner += p["pv_rim"] * np.exp(-c["d_vent"] / 2.0) * (c["d_vent"] > 0) * c["wm"]
    outer = sum(weights[k] * p["csf" if k == "csf_rim" else k]
                for k in ("csf_rim", "marrow", "bone", "skin", "fat", "muscle", "vitreous", "mucosa"))
    shift = tuple(int(v) for v in rng.integers(0, 60, 3))
    amp_f, amp_c = (rng.uniform(0.02, 0.045), rng.uniform(0.02, 0.05)) if not randomize else rng.uniform(0.0, 0.1, 2)
    amp_lesion = rng.uniform(0.03, 0.1)
    fine = np.roll(A.tex_fine, shift, axis=(0, 1, 2)).ravel()
    coarse = np.roll(A.tex_coarse, shift[::-1], axis=(0, 1, 2)).ravel()
    img = np.zeros(A.shape, np.float32)
    flat = img.ravel()
    flat[A.idx_brain] = inner
    flat[A.idx_outer] = outer
    if lesion_idx.size:  # partial-volume blend towards each lesion's own (slightly mottled) intensity
        prob = lesions.prob.ravel()[lesion_idx]
        target = lesion_values[lesions.ids.ravel()[lesion_idx]] * (1.0 + amp_lesion * np.roll(fine, 4321)[lesion_idx])
        if lesion_profile is not None:
            prob = prob * lesion_profile
        flat[lesion_idx] += prob * (target - flat[lesion_idx])
    for idx in (A.idx_brain, A.idx_outer):
        flat[idx] *= 1.0 + amp_f * fine[idx] + amp_c * coarse[idx]
    np.maximum(img, 0.0, out=img)
    return img


def lesion_rim_profile(lesions: LesionField, lesion_idx: np.ndarray, spacing_mm: float,
                       rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
    """Contrast over `lesion_idx` (0..1) that fades from each lesion's core to its edge, and its settings.

    A real lesion on FLAIR is brightest in its core and fades towards its border, and raters draw the border
    where it still stands out: the mask includes a fainter rim. Per case: the edge keeps a fraction `edge` of
    the core's contrast, reached over `width` mm of depth (from the surface of the lesion mask, prob >= 0.5)."""
    edge, width = float(rng.uniform(0.4, 1.0)), float(rng.uniform(0.8, 3.5))
    settings = {"edge": round(edge, 3), "width_mm": round(width, 2)}
    inside = lesions.prob >= 0.5
    if not inside.any():
        return np.ones(lesion_idx.size, np.float32), settings
    box = bbox(inside, 2)
    depth = np.zeros(lesions.prob.shape, np.float32)
    # a voxel centre lies half a voxel deeper than the face it shares with the outside
    depth[box] = np.maximum(ndi.distance_transform_edt(inside[box]) - 0.5, 0.0) * spacing_mm
    ramp = smoothstep(depth.ravel()[lesion_idx], 0.0, width)
    return (edge + (1.0 - edge) * ramp).astype(np.float32), settings


def lesion_values(modality: str, p: dict[str, float], n: int, rng: np.random.Generator) -> np.ndarray:
    """Intensity of each lesion (index 0 unused)."""
    v = p["lesion"] * (1.0 + p["lesion_jitter"] * rng.uniform(-1, 1, n + 1))
    if modality == "t1":  # some T1 lesions are black holes
        holes = rng.random(n + 1) < 0.25
        v[holes] *= rng.uniform(0.5, 0.8, int(holes.sum()))
    return v.astype(np.float32)


# --- acquisition geometry ---------------------------------------------------------------------------

def _lps(ras) -> np.ndarray:
    r = np.asarray(ras, float)
    return np.array([-r[0], -r[1], r[2]])


def _rotation(angles_rad) -> np.ndarray:
    ax, ay, az = angles_rad
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@functools.lru_cache(maxsize=2)
def _ventricle_basis(scale: int) -> tuple[tuple[slice, ...], sitk.Image, np.ndarray]:
    """The canvas box around the ventricles, a coarse grid over it, and the unit ventricular-widening
    displacement there (LPS components; zero at the box border)."""
    from .phantom_anatomy import anatomy

    A = anatomy(scale)
    s = A.spacing
    lo = [b.start for b in bbox(A.ventricles, int(round(28.0 / s)))]
    hi = [b.stop for b in bbox(A.ventricles, int(round(28.0 / s)))]
    f = max(1, int(round(3.0 / s)))
    hi = [a + (b - a) // f * f for a, b in zip(lo, hi)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    v = A.ventricles[box].astype(np.float32)
    n = [m // f for m in v.shape]
    vc = v.reshape(n[0], f, n[1], f, n[2], f).mean(axis=(1, 3, 5))
    step = f * s
    vs = ndi.gaussian_filter(vc, 6.0 / step)
    g = np.stack(np.gradient(vs), axis=-1)[..., ::-1] * np.array([-1.0, -1.0, 1.0])  # (z,y,x) RAS -> LPS x,y,z
    window = np.ones(vc.shape)
    for ax, m in enumerate(vc.shape):
        edge = np.minimum(np.arange(m), np.arange(m)[::-1]) * step
        window *= smoothstep(edge, 2.0, 14.0).reshape([-1 if i == ax else 1 for i in range(3)])
    g *= window[..., None]
    g /= max(float(np.linalg.norm(g, axis=-1).max()), 1e-9)
    ref = sitk.Image([int(n[2]), int(n[1]), int(n[0])], sitk.sitkUInt8)
    ref.SetSpacing((step,) * 3)
    o = np.asarray(A.origin_ras) + s * np.array([lo[2], lo[1], lo[0]]) + (f - 1) * s / 2.0
    ref.SetOrigin((-o[0], -o[1], o[2]))
    ref.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    return box, ref, g.astype(np.float64)


def ventricle_widening(A: Anatomy, mm: float) -> sitk.Transform:
    """A displacement (canvas space) that widens the lateral ventricles by about `mm` (atrophy)."""
    _, ref, g = _ventricle_basis(A.scale)
    img = sitk.GetImageFromArray(g * mm, isVector=True)
    img.CopyInformation(ref)
    return sitk.DisplacementFieldTransform(img)


STORAGES = ("mixed", "axial", "sagittal")


def plan_acquisition(A: Anatomy, rng: np.random.Generator, protocol: str, motion: bool, load: str,
                     scale: int, subject_rng: np.random.Generator | None = None, storage: str = "mixed"
                     ) -> Acquisition:
    """Draw the scanner grid, the head pose and the subject's shape (from `subject_rng` where given: a
    follow-up scan of the same subject draws that from the baseline's stream). `storage`: the slice order of
    a 3d grid, axial or sagittal (mixed: sagittal one time in four)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    if storage not in STORAGES or (protocol == "2d" and storage == "sagittal"):
        raise ValueError(f"storage must be one of {', '.join(STORAGES)} (2d grids are axial), not {storage!r}")
    centre = _lps(BRAIN_CENTRE_RAS)
    # subject shape: size and proportions, atrophy (ventricles widen, more with lesion load)
    srng = rng if subject_rng is None else subject_rng
    iso = srng.uniform(0.92, 1.08)
    aniso = np.diag(srng.uniform(0.96, 1.04, 3)) @ (np.eye(3) + srng.uniform(-0.03, 0.03, (3, 3)) * (1 - np.eye(3)))
    lin = aniso / iso  # output-head point -> template point
    subject = sitk.AffineTransform(3)
    subject.SetCenter(tuple(centre))
    subject.SetMatrix(tuple(lin.ravel()))
    vent = float(srng.uniform(0.0, {"none": 1.5, "low": 2.5, "medium": 3.5, "high": 5.0}[load]))
    deform = ventricle_widening(A, vent)
    # head pose in the scanner and the planned (oblique) grid
    if motion:
        angles = np.deg2rad(rng.uniform(-12, 12, 3) * rng.uniform(0.3, 1.0))
        shift = rng.normal(0, 6.0, 3)
        tilt = np.deg2rad(rng.uniform(-12, 12, 3) * rng.uniform(0.3, 1.0))
    else:
        angles, shift, tilt = np.zeros(3), np.zeros(3), np.zeros(3)
    pose = sitk.Euler3DTransform()
    pose.SetCenter(tuple(centre))
    pose.SetRotation(*(float(a) for a in angles))
    pose.SetTranslation(tuple(float(t) for t in shift))
    affine = sitk.CompositeTransform([subject, pose])  # applied right to left: pose first
    transform = sitk.CompositeTransform([deform, subject, pose])

    # storage order of the grid axes: axial with random flips (LPS, RAS, LAS...) or, for 3d, sagittal
    base = np.diag(rng.choice([-1.0, 1.0], 3))
    sagittal = protocol == "3d" and rng.random() < 0.25
    if storage != "mixed":
        sagittal = storage == "sagittal"
    if sagittal:  # columns: A-P, S-I, L-R
        base = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float) @ np.diag(rng.choice([-1.0, 1.0], 3))
    direction = _rotation(tilt) @ base
    if protocol == "3d":
        fov = np.array([rng.uniform(184, 208), rng.uniform(216, 240), rng.uniform(172, 192)])
        spacing = np.ones(3)
        thickness = 1.0
        if sagittal:
            fov = fov[[1, 2, 0]]
    else:
        inplane = rng.uniform(0.8, 1.2)
        thickness = float(np.round(rng.uniform(3.0, 5.0) * 2) / 2)
        side = rng.uniform(220, 250)
        fov = np.array([side * rng.uniform(0.85, 1.0), side, rng.uniform(165, 190)])
        spacing = np.array([inplane, inplane, thickness])
    spacing = spacing * scale
    size = np.maximum(np.round(fov / spacing).astype(int), 4)
    # the technologist centres the field of view on the head, wherever it lies (to within a few mm)
    head_centre = centre + np.array([0.0, -4.0, 4.0 if protocol == "3d" else 5.0]) + rng.normal(0, 3.0, 3)
    grid_centre = np.array(pose.GetInverse().TransformPoint(tuple(float(v) for v in head_centre)))
    origin = grid_centre - direction @ (spacing * (size - 1) / 2.0)
    ref = sitk.Image([int(v) for v in size], sitk.sitkUInt8)
    ref.SetSpacing(tuple(float(v) for v in spacing))
    ref.SetOrigin(tuple(float(v) for v in origin))
    ref.SetDirection(tuple(float(v) for v in direction.ravel()))
    meta = {"protocol": protocol, "spacing_mm": [round(float(v), 4) for v in spacing],
            "size": [int(v) for v in size], "slice_thickness_mm": round(thickness * scale, 3),
            "storage": "sagittal" if sagittal else "axial",
            "direction": [round(float(v), 6) for v in direction.ravel()],
            "head_rotation_deg": [round(float(v), 2) for v in np.rad2deg(angles)],
            "head_translation_mm": [round(float(v), 2) for v in shift],
            "grid_tilt_deg": [round(float(v), 2) for v in np.rad2deg(tilt)],
            "subject_scale": round(float(1 / iso), 4), "ventricle_widening_mm": round(vent, 2)}
    return Acquisition(ref, transform, affine, deform, meta, pose)


def resample(A: Anatomy, volumes: list[np.ndarray], acq: Acquisition) -> list[np.ndarray]:
    """Canvas volumes onto the output grid (linear) through `acq.transform`; thick slices average their
    sub-slices (box slice profile). Volumes are modified in place (warped around the ventricles)."""
    box, _, _ = _ventricle_basis(A.scale)
    offset = np.array([b.start for b in box])
    ref = acq.reference
    spacing = np.array(ref.GetSpacing())
    direction = np.array(ref.GetDirection()).reshape(3, 3)
    k = max(1, int(round(spacing[2] / A.spacing))) if acq.meta["protocol"] == "2d" else 1
    fine = ref
    if k > 1:
        fine = sitk.Image([ref.GetSize()[0], ref.GetSize()[1], ref.GetSize()[2] * k], sitk.sitkUInt8)
        fine.SetSpacing((spacing[0], spacing[1], spacing[2] / k))
        fine.SetDirection(ref.GetDirection())
        fine.SetOrigin(tuple(np.array(ref.GetOrigin()) + direction[:, 2] * (-spacing[2] / 2 + spacing[2] / (2 * k))))
    out = []
    for vol in volumes:
        sub = A.to_image(np.ascontiguousarray(vol[box]), offset)
        vol[box] = sitk.GetArrayFromImage(sitk.Resample(sub, sub, acq.deform, sitk.sitkLinear, 0.0))
        arr = sitk.GetArrayFromImage(sitk.Resample(A.to_image(vol), fine, acq.affine, sitk.sitkLinear, 0.0,
                                                   sitk.sitkFloat32))
        if k > 1:
            arr = arr.reshape(ref.GetSize()[2], k, *arr.shape[1:]).mean(axis=1)
        out.append(arr)
    return out


# --- scanner effects ------------------------------------------------------------------------------

def bias_field(shape, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """Smooth multiplicative field exp(cubic polynomial) over the grid, float32."""
    deg = 3
    axes = [np.polynomial.legendre.legvander(np.linspace(-1, 1, n), deg) for n in shape]  # (n, deg+1)
    c = rng.normal(0, 1, (deg + 1,) * 3)
    order = np.add.outer(np.add.outer(np.arange(deg + 1), np.arange(deg + 1)), np.arange(deg + 1))
    c *= (order > 0) * (order <= deg) / (1.0 + order)
    c *= amplitude / max(np.sqrt((c ** 2).sum()), 1e-9)
    f = np.einsum("ijk,zi,yj,xk->zyx", c, axes[0], axes[1], axes[2], optimize=True)
    return np.exp(f).astype(np.float32)


def scanner_effects(img: np.ndarray, rng: np.random.Generator, randomize: bool, wm_level: float) -> np.ndarray:
    """Bias field, Rician noise, random gamma (randomize) and integer scaling to int16."""
    img = img * bias_field(img.shape, rng, rng.uniform(0.1, 0.3) if not randomize else rng.uniform(0.1, 0.7))
    sigma = wm_level * (rng.uniform(0.015, 0.04) if not randomize else rng.uniform(0.005, 0.08))
    n1 = rng.standard_normal(img.shape, dtype=np.float32)
    n1 *= sigma
    n1 += img
    n2 = rng.standard_normal(img.shape, dtype=np.float32)
    n2 *= sigma
    img = np.sqrt(n1 * n1 + n2 * n2)
    top = float(np.percentile(img[::3, ::3, ::3], 99.9)) or 1.0
    if randomize:
        img = (img / top) ** np.exp(rng.normal(0, 0.3)) * top
    vmax = int(rng.integers(1000, 4001))
    out = np.clip(np.rint(img * (vmax / top)), 0, 32767)
    return out.astype(np.int16)
