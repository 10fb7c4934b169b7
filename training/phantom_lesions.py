"""MS-like white-matter lesions drawn on the phantom canvas (MNI space), with soft partial-volume edges.

Lesion types, as in MS (McDonald criteria locations): periventricular ovoids with their long axis radial to
the ventricles (Dawson's fingers), deep white matter, juxtacortical (touching the grey/white border) and
infratentorial (brainstem, cerebellar peduncles and white matter), plus confluent periventricular clusters
at higher loads. Each lesion is an irregular ellipsoid whose soft probability ramps over ~1 mm at its
surface; the union is capped by the anatomy's `allowed` map so no lesion reaches CSF, cortex or outside
the brain. The lesion mask is probability >= 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .phantom_anatomy import Anatomy

LESION_LOADS = ("none", "low", "medium", "high", "mixed")
TYPES = ("periventricular", "deep", "juxtacortical", "infratentorial")
# (mean lesion count, negative-binomial shape, type probabilities, size multiplier, clusters mean)
_LOADS = {
    "low": (4.0, 2.0, (0.40, 0.25, 0.20, 0.15), 0.9, 0.0),
    "medium": (15.0, 3.0, (0.42, 0.23, 0.20, 0.15), 1.0, 0.7),
    "high": (38.0, 4.0, (0.48, 0.20, 0.18, 0.14), 1.15, 2.5),
}
_MIXED = (("none", 0.06), ("low", 0.34), ("medium", 0.36), ("high", 0.24))
# median equivalent radius (mm) per type
_RADIUS = {"periventricular": 2.8, "deep": 2.0, "juxtacortical": 2.0, "infratentorial": 2.2}
EDGE_MM = 1.0  # half-width of the partial-volume ramp at a lesion surface


@dataclass
class LesionField:
    """What the lesions are on the canvas."""

    prob: np.ndarray  # float32 soft lesion probability (partial volume), 0..1
    ids: np.ndarray  # int16: index + 1 of the lesion dominating each voxel (0: none)
    lesions: list[dict]  # per drawn lesion: type, centre_ras_mm, semi_axes_mm, cluster
    load: str  # the load actually drawn (mixed resolved)


def pick_load(load: str, rng: np.random.Generator) -> str:
    if load not in LESION_LOADS:
        raise ValueError(f"lesion load must be one of {', '.join(LESION_LOADS)}, not {load!r}")
    if load != "mixed":
        return load
    names, probs = zip(*_MIXED)
    return str(rng.choice(names, p=probs))


def _gradient_at(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Central-difference gradient of canvas map `a` at (z, y, x) index, returned in RAS (x, y, z) order."""
    k, j, i = (int(v) for v in idx)
    nz, ny, nx = a.shape
    g = np.array([
        a[k, j, min(i + 1, nx - 1)] - a[k, j, max(i - 1, 0)],
        a[k, min(j + 1, ny - 1), i] - a[k, max(j - 1, 0), i],
        a[min(k + 1, nz - 1), j, i] - a[max(k - 1, 0), j, i],
    ], float)
    n = np.linalg.norm(g)
    return g / n if n > 1e-6 else np.array([0.0, 0.0, 1.0])


def _frame(u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix whose first column is `u` (the others random around it)."""
    v = rng.standard_normal(3)
    v -= v.dot(u) * u
    v /= max(np.linalg.norm(v), 1e-9)
    return np.stack([u, v, np.cross(u, v)], axis=1)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 2] *= -1
    return q


def _site(A: Anatomy, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random candidate voxel of `kind`: its (z, y, x) index and RAS mm position."""
    flat = A.sites[kind][rng.integers(len(A.sites[kind]))]
    idx = np.array(np.unravel_index(flat, A.shape))
    ras = np.asarray(A.origin_ras) + A.spacing * (idx[::-1] + rng.uniform(-0.5, 0.5, 3))
    return idx, ras


def _design(A: Anatomy, kind: str, rng: np.random.Generator, size: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre (RAS mm), semi-axes (mm) and rotation (columns = axes) of one lesion of `kind`."""
    idx, c = _site(A, kind, rng)
    r_eq = float(np.clip(_RADIUS[kind] * size * np.exp(0.45 * rng.standard_normal()), 1.5, 9.0))
    if kind == "periventricular":
        elong = rng.uniform(1.6, 3.0)  # Dawson's finger: long axis radial from the ventricle
        u = _gradient_at(A.d_vent, idx)
        axes = np.array([elong ** (2 / 3), elong ** (-1 / 3), elong ** (-1 / 3) * rng.uniform(0.8, 1.1)]) * r_eq
        dist = float(A.d_vent[tuple(idx)])
        c = c + u * (0.75 * axes[0] - dist)  # inner end at the ventricle wall
        rot = _frame(u, rng)
    elif kind == "juxtacortical":
        u = _gradient_at(A.d_cortex, idx)  # points away from the cortex
        elong = rng.uniform(1.2, 2.2)
        axes = np.array([elong ** (2 / 3), elong ** (-1 / 3) * rng.uniform(0.9, 1.2), elong ** (-1 / 3) * 0.8]) * r_eq
        rot = _frame(u, rng)[:, [1, 2, 0]]  # long axis tangent to the cortex, short axis towards it
        dist = float(A.d_cortex[tuple(idx)])
        c = c - u * (dist - 0.3 * axes[2])  # reaches into the grey/white border
    else:
        elong = rng.uniform(1.0, 1.7)
        axes = np.array([elong ** (2 / 3), elong ** (-1 / 3), elong ** (-1 / 3)]) * r_eq
        rot = _random_rotation(rng)
    return c, axes, rot


def _rasterise(A: Anatomy, centre, axes, rot, rng: np.random.Generator):
    """One irregular soft ellipsoid, capped by the allowed map: (box slices, probability in the box) or None."""
    s = A.spacing
    reach = float(axes.max()) * 1.35 + 2 * EDGE_MM + s
    o = np.asarray(A.origin_ras)
    lo = np.maximum(np.floor((centre - reach - o) / s).astype(int), 0)
    hi = np.minimum(np.ceil((centre + reach - o) / s).astype(int) + 1, np.asarray(A.shape[::-1]))
    if np.any(hi - lo < 1):
        return None
    xs, ys, zs = (o[a] + s * np.arange(lo[a], hi[a]) - centre[a] for a in range(3))
    # coordinates in the lesion frame: q_n = sum_a rel_a * rot[a, n]
    q = [xs[None, None, :] * rot[0, n] + ys[None, :, None] * rot[1, n] + zs[:, None, None] * rot[2, n]
         for n in range(3)]
    rad = np.sqrt(sum((q[n] / axes[n]) ** 2 for n in range(3)))  # 1 on the surface
    wobble = ndi.gaussian_filter(rng.standard_normal(rad.shape), max(1.6 / s, 0.6), mode="reflect")
    wobble /= max(float(wobble.std()), 1e-6)
    rad = rad * (1.0 + rng.uniform(0.06, 0.18) * wobble)
    p = np.clip(0.5 + (1.0 - rad) * float(axes.min()) / (2 * EDGE_MM), 0.0, 1.0).astype(np.float32)
    box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    p *= A.allowed[box]
    return box, p


def _place(A: Anatomy, prob, ids, lesion: dict, redesign, rng: np.random.Generator, tries: int = 6) -> bool:
    """Rasterise `lesion` into `prob` (max) and `ids` (where it dominates). A lesion that the allowed region
    clips to (almost) nothing would be a faint unlabelled spot: it is redesigned (`redesign()` gives a new
    centre, axes, rotation) up to `tries` times, else left out."""
    for attempt in range(tries):
        if attempt:
            lesion["centre"], lesion["axes"], lesion["rot"] = redesign()
        got = _rasterise(A, lesion["centre"], lesion["axes"], lesion["rot"], rng)
        if got is not None and float(got[1].max()) >= 0.8:
            box, p = got
            view, vid = prob[box], ids[box]
            win = p > view
            vid[win] = lesion["id"]
            view[win] = p[win]
            return True
    return False


def draw_lesions(A: Anatomy, rng: np.random.Generator, load: str = "mixed") -> LesionField:
    """Draw a random set of lesions for one case."""
    load = pick_load(load, rng)
    prob = np.zeros(A.shape, np.float32)
    ids = np.zeros(A.shape, np.int16)
    placed: list[dict] = []
    if load == "none":
        return LesionField(prob, ids, [], load)
    mean, shape_k, type_p, size, clusters = _LOADS[load]
    # severity: within a load, some patients have bigger lesions and more confluence (heavy tails of volume)
    severity = float(np.clip(np.exp(rng.normal(0.0, 0.35)), 0.6, 2.2)) if load == "high" else 1.0
    size *= severity ** 0.5
    clusters *= severity
    n = max(int(rng.negative_binomial(shape_k, shape_k / (shape_k + mean))), 1)
    kinds = [str(rng.choice(TYPES, p=type_p)) for _ in range(n)]
    n_clusters = int(rng.poisson(clusters))

    def add(kind: str, cluster: int, design) -> None:
        lesion = {"type": kind, "cluster": cluster, "id": len(placed) + 1}
        lesion["centre"], lesion["axes"], lesion["rot"] = design()
        if _place(A, prob, ids, lesion, design, rng):
            placed.append(lesion)

    for kind in kinds:
        add(kind, -1, lambda kind=kind: _design(A, kind, rng, size))
    for c in range(n_clusters):  # confluent periventricular clusters
        c0, axes0, rot0 = _design(A, "periventricular", rng, size * 1.3)
        parts = int(rng.integers(3, 8 + int(6 * (severity - 1.0)) + 1))
        spread = np.array([3.0, 5.0, 5.0]) * (1.0 + 0.15 * parts / 4)

        def part(c0=c0, axes0=axes0, rot0=rot0, spread=spread):
            return (c0 + rot0 @ (rng.standard_normal(3) * spread), axes0 * rng.uniform(0.6, 1.1),
                    rot0 @ _small_rotation(rng, 0.4))

        for _ in range(parts):
            add("periventricular", c, part)
    ids[prob < 0.02] = 0
    info = [{"type": les["type"], "cluster": int(les["cluster"]),
             "centre_ras_mm": [round(float(v), 1) for v in les["centre"]],
             "semi_axes_mm": [round(float(v), 2) for v in les["axes"]]} for les in placed]
    return LesionField(prob, ids, info, load)


def _small_rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    a = rng.uniform(-max_angle, max_angle)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k

