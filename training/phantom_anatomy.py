"""The static anatomy behind the MS phantoms: the MNI ICBM152 2009 template with a synthetic head around it.

Everything here is computed once per process and scale (``anatomy(scale)`` is cached) from the template
files that ship inside nilearn (T1, GM and WM maps at 1 mm; nothing is downloaded). The nilearn T1 is
skull-stripped, so the extra-cranial head (CSF rim, skull tables and diploe, scalp, temporal muscle, face
with orbits and sinuses, neck) is built around the brain from distance maps.

Arrays are on the *canvas*: the template box (RAS x -98..98, y -134..98, z -72..116 mm) extended
``EXTEND_MM`` downwards for the neck, stored (z, y, x) as SimpleITK arrays are, in LPS physical space
(direction diag(-1, -1, 1)). At ``scale`` s > 1 the 1 mm maps are block-averaged by s (s mm voxels).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

EXTEND_MM = 48  # canvas extension below the template (neck), mm
TEMPLATE_ORIGIN_RAS = (-98.0, -134.0, -72.0)
BRAIN_CENTRE_RAS = (0.0, -18.0, 12.0)
SHARPEN = 1.7  # exponent sharpening the template's tissue probabilities for the image contrast


def _template_dir() -> str:
    """nilearn's bundled data folder, found without importing nilearn (nothing is fetched)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the phantom generator needs nilearn's bundled MNI152 template: "
                           "pip install 'samless[train]'")
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")


def _load_template(kind: str) -> np.ndarray:
    """One nilearn MNI152 2009 map (t1, gm or wm) as float32 in [0, 1], (z, y, x), i.e. (k, j, i)."""
    import nibabel as nib

    path = os.path.join(_template_dir(), f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz")
    if not os.path.exists(path):
        raise RuntimeError(f"the MNI152 template file {path} is missing from the nilearn install")
    img = nib.load(path)
    if not np.allclose(np.diag(img.affine)[:3], 1.0) or not np.allclose(img.affine[:3, 3], TEMPLATE_ORIGIN_RAS):
        raise RuntimeError(f"unexpected affine in {path}")
    return np.ascontiguousarray(np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0) / 255.0)


def _block_mean(a: np.ndarray, s: int) -> np.ndarray:
    if s == 1:
        return a
    nz, ny, nx = (n // s * s for n in a.shape)
    a = a[:nz, :ny, :nx]
    return a.reshape(nz // s, s, ny // s, s, nx // s, s).mean(axis=(1, 3, 5), dtype=np.float32)


def smoothstep(x, lo: float, hi: float):
    """0 below lo, 1 above hi, smooth in between (keeps float32 arrays float32)."""
    t = np.clip((x - np.float32(lo)) * np.float32(1.0 / (hi - lo)), 0.0, 1.0)
    return t * t * (np.float32(3.0) - np.float32(2.0) * t)


def signed_distance(mask: np.ndarray, spacing: float) -> np.ndarray:
    """Signed Euclidean distance in mm to the edge of `mask` (positive outside), float32 (multi-threaded)."""
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing((spacing,) * 3)
    d = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return sitk.GetArrayFromImage(d).astype(np.float32)


def _smooth_noise(shape, sigma_vox: float, seed: int) -> np.ndarray:
    """A unit-variance smooth Gaussian random field (float32)."""
    rng = np.random.default_rng(seed)
    f = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_vox, mode="wrap")
    return f / max(float(f.std()), 1e-6)


@dataclass
class Anatomy:
    """Static maps on the canvas. Full maps are (z, y, x) arrays; `inner` and `outer` hold the same kind of
    maps compactly, as 1-D arrays over the brain voxels (`idx_brain`) and the rest of the head (`idx_outer`),
    flat canvas indices, so per-case synthesis touches only the head."""

    scale: int
    spacing: float
    origin_ras: tuple[float, float, float]  # RAS mm of voxel (0, 0, 0)
    shape: tuple[int, int, int]
    wm: np.ndarray  # tissue probabilities inside the template brain mask
    gm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray  # bool: the template's brain mask (nilearn's, T1 > 0)
    head: np.ndarray  # bool
    ventricles: np.ndarray  # bool: lateral ventricles
    d_vent: np.ndarray  # mm to the lateral ventricles
    d_cortex: np.ndarray  # mm to cortical grey matter (GM > 0.5)
    allowed: np.ndarray  # 0..1 where lesions may be (white matter, incl. infratentorial)
    tex_fine: np.ndarray  # static smooth unit random fields, rolled per case
    tex_coarse: np.ndarray
    tex_folds: np.ndarray  # ~3 mm field whose zero sheets become sulci (`phantom_mri.cortical_folds`)
    idx_brain: np.ndarray
    idx_outer: np.ndarray
    inner: dict[str, np.ndarray]  # wm, gm, csf, deep (0..1 deep grey weight), d_vent
    outer: dict[str, np.ndarray]  # d_out, d_skin, face, eyes, orbit_fat, sinus, temporalis
    sites: dict[str, np.ndarray] = field(default_factory=dict)  # flat candidate lesion-centre indices by type

    def copy_geometry(self, img: sitk.Image, offset=(0, 0, 0)) -> sitk.Image:
        """Give `img` the canvas geometry (or that of the sub-box starting at (z, y, x) index `offset`)."""
        o = np.asarray(self.origin_ras) + self.spacing * np.asarray(offset, float)[::-1]
        img.SetSpacing((self.spacing,) * 3)
        img.SetOrigin((-float(o[0]), -float(o[1]), float(o[2])))
        img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
        return img

    def to_image(self, a: np.ndarray, offset=(0, 0, 0)) -> sitk.Image:
        return self.copy_geometry(sitk.GetImageFromArray(a), offset)


def _paint_ellipsoid(target: np.ndarray, origin, spacing: float, centre_ras, radii, edge: float = 1.5) -> None:
    """target = max(target, soft ellipsoid) inside the ellipsoid's bounding box only (RAS mm; axis-aligned)."""
    c = np.asarray(centre_ras, float)
    r = np.asarray(radii, float)
    lo = np.floor((c - r - edge - np.asarray(origin)) / spacing).astype(int)
    hi = np.ceil((c + r + edge - np.asarray(origin)) / spacing).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.asarray(target.shape[::-1]))
    if np.any(hi <= lo):
        return
    axes = [origin[a] + spacing * np.arange(lo[a], hi[a]) - c[a] for a in range(3)]
    xx, yy, zz = axes[0][None, None, :], axes[1][None, :, None], axes[2][:, None, None]
    rad = np.sqrt((xx / r[0]) ** 2 + (yy / r[1]) ** 2 + (zz / r[2]) ** 2) * r.mean()  # ~mm from the centre
    v = (1.0 - smoothstep(rad, r.mean() - edge / 2, r.mean() + edge / 2)).astype(np.float32)
    view = target[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    np.maximum(view, v, out=view)


def bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The bounding box of `mask` grown by `margin` voxels, as slices (clipped to the array)."""
    out = []
    for ax, n in enumerate(mask.shape):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
        out.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + margin + 1, n)))
    return tuple(out)


@functools.lru_cache(maxsize=2)
def anatomy(scale: int = 1) -> Anatomy:
    """The static anatomy at `scale` mm (1 or 2). Cached: the first call takes several seconds."""
    s = int(scale)
    if s < 1:
        raise ValueError("scale must be an integer >= 1")
    t1, gm, wm = (_load_template(k) for k in ("t1", "gm", "wm"))
    # Extend downwards: the medulla's lowest cross-section continues as the cord; the head as the neck.
    cord = (t1[0] > 0) & (gm[0] + wm[0] > 0.3)
    pad = ((EXTEND_MM, 0), (0, 0), (0, 0))
    t1, gm, wm = np.pad(t1, pad), np.pad(gm, pad), np.pad(wm, pad)
    t1[:EXTEND_MM] = np.where(cord, 0.7, 0.0)[None]
    gm[:EXTEND_MM] = np.where(cord, 0.55, 0.0)[None]
    wm[:EXTEND_MM] = np.where(cord, 0.45, 0.0)[None]
    brain1 = ndi.binary_fill_holes(t1 > 0)
    t1, gm, wm = (_block_mean(a, s) for a in (t1, gm, wm))
    brain = _block_mean(brain1.astype(np.float32), s) >= 0.5
    gm = np.where(brain, gm, 0.0).astype(np.float32)
    wm = np.where(brain, wm, 0.0).astype(np.float32)
    tot = gm + wm
    over = tot > 1.0
    gm[over] /= tot[over]
    wm[over] /= tot[over]
    csf_in = np.where(brain, np.maximum(1.0 - gm - wm, 0.0), 0.0).astype(np.float32)

    origin = tuple(float(o + (s - 1) / 2.0) for o in (TEMPLATE_ORIGIN_RAS[0], TEMPLATE_ORIGIN_RAS[1],
                                                        TEMPLATE_ORIGIN_RAS[2] - EXTEND_MM))
    shape = brain.shape
    zs, ys, xs = (origin[2] + s * np.arange(shape[0]), origin[1] + s * np.arange(shape[1]),
                  origin[0] + s * np.arange(shape[2]))
    zz, yy, xx = (a.astype(np.float32) for a in np.meshgrid(zs, ys, xs, indexing="ij", sparse=True))

    sd = signed_distance(brain, s)
    d_out, d_in = np.maximum(sd, 0.0), np.maximum(-sd, 0.0)
    del sd

    # Head envelope: 14 mm around the brain in the vault; below z = -12 mm the cross-section at z = +4 mm
    # (which spans the frontal pole) is carried down for the face and skull base, narrowing to the neck.
    head = d_out <= 14.0
    kf = int(np.argmin(np.abs(zs - 4.0)))
    kc = int(np.argmin(np.abs(zs - (-12.0))))
    ref = ndi.binary_fill_holes(head[kf]).astype(np.float32)
    cy, cx = (float(c) for c in ndi.center_of_mass(ref))
    for k in range(kc):
        depth = min((zs[kc] - zs[k]) / 90.0, 1.0)
        fy, fx = 1.0 + 0.05 + 0.25 * depth**2, 1.0 + 0.12 + 0.18 * depth  # inverse shrink factors
        shift_y = 22.0 / s * depth**2  # the neck sits behind the face
        mat = np.diag([fy, fx])
        off = np.array([cy, cx]) - mat @ np.array([cy - shift_y, cx])
        head[k] |= ndi.affine_transform(ref, mat, offset=off, order=1) > 0.5
    head = ndi.binary_fill_holes(head)
    head = ndi.gaussian_filter(head.astype(np.float32), 2.0 / s) > 0.5
    head |= brain
    d_skin = np.maximum(-signed_distance(head, s), 0.0)

    # Deep grey matter: grey matter far from the brain surface (basal ganglia, thalami).
    deep = smoothstep(d_in, 14.0, 26.0).astype(np.float32) * (zz > -25).astype(np.float32)

    # Face: below the anterior/middle cranial fossa, outside the skull shell.
    vault = d_out <= 10.0
    face = (head & ~vault & ~brain).astype(np.float32) * smoothstep(-zz, -20.0, -5.0).astype(np.float32)
    eyes = np.zeros(shape, np.float32)
    orbit_fat = np.zeros(shape, np.float32)
    sinus = np.zeros(shape, np.float32)
    for side in (-1.0, 1.0):
        _paint_ellipsoid(eyes, origin, s, (32.0 * side, 64.0, -36.0), (12.0, 12.0, 11.5))
        _paint_ellipsoid(orbit_fat, origin, s, (30.0 * side, 50.0, -36.0), (14.0, 22.0, 14.0), edge=4.0)
        _paint_ellipsoid(sinus, origin, s, (22.0 * side, 42.0, -66.0), (11.0, 14.0, 13.0))  # maxillary
        _paint_ellipsoid(sinus, origin, s, (11.0 * side, 44.0, -40.0), (4.0, 13.0, 8.0))  # ethmoid cells
    _paint_ellipsoid(sinus, origin, s, (0.0, 46.0, -62.0), (6.0, 18.0, 13.0))  # nasal cavity
    _paint_ellipsoid(sinus, origin, s, (0.0, 14.0, -38.0), (10.0, 10.0, 8.0))  # sphenoid
    _paint_ellipsoid(sinus, origin, s, (0.0, 72.0, -6.0), (12.0, 5.0, 8.0))  # frontal
    inside = (face > 0) | ((d_out > 3.0) & head & ~brain)
    eyes *= inside
    orbit_fat *= inside * (1.0 - eyes)
    sinus *= inside * (1.0 - eyes)
    temporalis = (smoothstep(np.abs(xx), 48.0, 62.0) * smoothstep(zz, -40.0, -25.0) * (1 - smoothstep(zz, 20.0, 40.0))
                  * (1 - smoothstep(np.abs(yy + 5.0), 35.0, 50.0))).astype(np.float32)  # sparse-broadcast

    csf = np.where(brain, csf_in, 0.0).astype(np.float32)

    # Lateral ventricles: CSF-dominated voxels near the centre, the two biggest components.
    box = (np.abs(xx) < 35) & (yy > -50) & (yy < 35) & (zz > -5) & (zz < 38)
    lab, n = ndi.label((csf_in > 0.5) & box)
    sizes = ndi.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    keep = np.argsort(sizes)[::-1][:2] + 1
    ventricles = np.isin(lab, keep)
    # distance to the ventricles, computed in a box around them (60 mm beyond is "far")
    vbox = bbox(ventricles, int(round(30.0 / s)))
    d_vent = np.full(shape, 60.0, np.float32)
    d_vent[vbox] = np.minimum(np.maximum(signed_distance(ventricles[vbox], s), 0.0), 60.0)
    cortex = (gm > 0.5) & (deep < 0.3)
    d_cortex = np.maximum(signed_distance(cortex, s), 0.0)

    # Where lesions may be: white matter (supratentorial WM > ~0.45; infratentorial z < -20 mm where the
    # template's WM map is fainter: brainstem and cerebellar WM > ~0.33), never CSF, never outside the brain.
    infra = (1.0 - smoothstep(zz, -24.0, -16.0)).astype(np.float32)
    supra_ok = smoothstep(wm, 0.35, 0.6)
    infra_ok = smoothstep(wm, 0.28, 0.42) * smoothstep(gm + wm, 0.8, 0.9)
    allowed = ((1 - infra) * supra_ok + infra * infra_ok) * (1.0 - smoothstep(csf_in, 0.15, 0.35)) * brain
    allowed = allowed.astype(np.float32)
    allowed[zz[:, 0, 0] < -62] = 0.0  # not in the synthetic cord extension

    # Crop the canvas to the head (plus a margin) and keep the head's voxels compactly.
    crop = bbox(head, 3)
    lo = [c.start for c in crop]
    origin = (origin[0] + s * lo[2], origin[1] + s * lo[1], origin[2] + s * lo[0])
    full = {"wm": wm, "gm": gm, "csf": csf, "brain": brain, "head": head, "ventricles": ventricles,
            "d_vent": d_vent, "d_cortex": d_cortex, "allowed": allowed, "deep": deep, "d_out": d_out,
            "d_skin": d_skin, "face": face, "eyes": eyes, "orbit_fat": orbit_fat, "sinus": sinus,
            "temporalis": np.broadcast_to(temporalis, shape)}
    full = {k: np.ascontiguousarray(v[crop]) for k, v in full.items()}
    shape = full["wm"].shape
    zz = zz[crop[0]]
    yy = yy[:, crop[1]]
    sites = {
        "periventricular": (full["wm"] > 0.7) & (full["d_vent"] > 1.5) & (full["d_vent"] < 6.0) & (zz > -5),
        "deep": (full["wm"] > 0.85) & (full["d_vent"] > 9.0) & (full["d_cortex"] > 5.0) & (zz > 0),
        "juxtacortical": (full["wm"] > 0.55) & (full["d_cortex"] > 0.5) & (full["d_cortex"] <= 2.5)
        & (full["deep"] < 0.2) & (zz > -10),
        "infratentorial": (full["allowed"] > 0.9) & (zz < -24) & (zz > -58) & (yy < -12),
    }
    sites = {k: np.flatnonzero(v).astype(np.int64) for k, v in sites.items()}
    idx_brain = np.flatnonzero(full["brain"])
    idx_outer = np.flatnonzero(full["head"] & ~full["brain"])
    inner = {k: full[k].ravel()[idx_brain] for k in ("wm", "gm", "csf", "deep", "d_vent")}
    # The template's tissue maps are an average of 152 brains, blurrier than one brain: sharpen them for
    # the contrast (the maps exposed above stay the template's).
    sharp = [np.maximum(inner[k], 0.0) ** SHARPEN for k in ("wm", "gm", "csf")]
    total = np.maximum(sharp[0] + sharp[1] + sharp[2], 1e-6)
    for k, v in zip(("wm", "gm", "csf"), sharp):
        inner[k] = (v / total).astype(np.float32)
    outer = {k: full[k].ravel()[idx_outer] for k in ("d_out", "d_skin", "face", "eyes", "orbit_fat", "sinus",
                                                      "temporalis")}
    return Anatomy(scale=s, spacing=float(s), origin_ras=origin, shape=shape,
                   **{k: full[k] for k in ("wm", "gm", "csf", "brain", "head", "ventricles", "d_vent", "d_cortex",
                                           "allowed")},
                   tex_fine=_smooth_noise(shape, 1.2 / s, 1), tex_coarse=_smooth_noise(shape, 6.0 / s, 2),
                   tex_folds=_smooth_noise(shape, 3.0 / s, 3),
                   idx_brain=idx_brain, idx_outer=idx_outer, inner=inner, outer=outer, sites=sites)
