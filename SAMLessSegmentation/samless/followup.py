"""Two timepoints in, change out: new, enlarging and stable lesions of a follow-up scan against its baseline.

The baseline is registered rigidly to the follow-up (SimpleITK, Mattes mutual information, three
resolutions). Each scan is segmented on its own grid by the same model, so neither image is interpolated
before the network; only the baseline's lesion probability is carried onto the follow-up grid, once, and
thresholded there like the follow-up's. Lesions are then matched by overlap (within `match_mm`) and
classed by volume change (`ChangeRules`). Everything lands on the follow-up grid.

Label map values: 0 background, 1 stable (a follow-up lesion that is neither new nor enlarging), 2 new,
3 enlarging (the whole follow-up lesion; the table gives how much of it is growth). Shrinking and
disappeared baseline lesions are rows of the table and counts of the summary.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from samless.errors import SamlessError
from samless.inference import Progress
from samless.pipeline import Segmentation, Segmenter, SegmentOptions
from samless.preprocess import foreground_mask

STABLE, NEW, ENLARGING = 1, 2, 3
LABELS = {STABLE: "stable", NEW: "new", ENLARGING: "enlarging"}
TABLE_FIELDS = ("id", "timepoint", "class", "volume_baseline_mm3", "volume_followup_mm3", "change_mm3",
                "evidence_mm3", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm")


def _rule(default: float, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class ChangeRules:
    """What counts as a change. The defaults follow the MAGNIMS consensus on MS monitoring MRI (Wattjes et al.,
    Lancet Neurol 2021; Rovira et al., Nat Rev Neurol 2015): a new T2 lesion is at least 3 mm across (about
    14 mm^3), and a lesion enlarges when it grows clearly, here by half its volume (about 15% in diameter) and
    by at least as much as a minimal new lesion, so that segmentation jitter of a large lesion is not growth."""

    # Each rule's help is its command-line help (`samless followup --min-new-mm3 ...`).
    min_new_mm3: float = _rule(14.0, "an unmatched follow-up lesion smaller than this is not called new (about 3 mm "
                               "across)")
    growth_fraction: float = _rule(0.5, "enlarging: the lesion grew by at least this fraction of its baseline volume")
    min_growth_mm3: float = _rule(14.0, "... and by at least this many mm^3")
    match_mm: float = _rule(1.0, "lesions this close (mm) at the two timepoints are the same lesion")
    support_fraction: float = _rule(1.0, "the other timepoint's lesion tissue, for matching: probability at least "
                                    "this times the threshold (1: its lesions)")
    evidence_sd: float = _rule(1.5, "a new or enlarging lesion must be this many noise SDs brighter than at baseline "
                               "in the registered difference image (0: the segmentations alone decide)")
    evidence_fraction: float = _rule(0.2, "... over at least this fraction of a new lesion, or of an enlarging one's "
                                     "part outside its baseline lesion (and over min-growth-mm3)")

    def check(self) -> None:
        for name, value in asdict(self).items():
            if not (math.isfinite(value) and value >= 0):
                raise SamlessError(f"follow-up rule {name} = {value} must be a finite number of 0 or more.")
        if not 0.0 < self.support_fraction <= 1.0:
            raise SamlessError(f"follow-up rule support_fraction = {self.support_fraction} must be in (0, 1].")
        if self.evidence_fraction > 1.0:
            raise SamlessError(f"follow-up rule evidence_fraction = {self.evidence_fraction} must be at most 1.")


@dataclass
class Registration:
    """The baseline's rigid placement on the follow-up. `transform` maps follow-up points to baseline points
    (ITK's resampling convention), in LPS mm."""

    transform: sitk.Euler3DTransform
    metric: float  # final Mattes mutual information (more negative: better aligned)
    correlation: float  # intensity correlation of the two heads after registration
    iterations: int
    stop: str
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        angles = np.rad2deg([self.transform.GetAngleX(), self.transform.GetAngleY(), self.transform.GetAngleZ()])
        return {"metric_mattes_mi": round(self.metric, 4), "correlation": round(self.correlation, 4),
                "rotation_deg": [round(float(a), 3) for a in angles],
                "translation_mm": [round(float(t), 3) for t in self.transform.GetTranslation()],
                "iterations": self.iterations, "stop": self.stop, "seconds": round(self.seconds, 2)}


# The head intensities of one patient's two FLAIRs correlate well after rigid alignment; a failed registration
# or another patient's scan falls well below. Under MIN_CORRELATION the change is refused, under
# WARN_CORRELATION it is reported with a warning.
MIN_CORRELATION = 0.5
WARN_CORRELATION = 0.7


REGISTRATION_MM = 2.0  # both scans are smoothed and resampled to this isotropic grid before registering
RESTARTS_DEG = (12.0, -12.0)  # where the first attempt looks failed: retry from starts turned this much


def register_rigid(fixed: sitk.Image, moving: sitk.Image, *, seed: int = 1) -> Registration:
    """Rigid registration of `moving` (baseline) onto `fixed` (follow-up); deterministic for a given `seed`.

    Both go to one isotropic grid first, so a thick-slice 2D scan and a 1 mm 3D scan are registered at the
    same resolution in every direction (multi-resolution shrinking of the native grids lost the 2D scans).
    Should the result not look like one head on another, it is retried from starts turned about each axis
    and the best kept."""
    tick = time.perf_counter()
    fixed_f = sitk.Cast(fixed, sitk.sitkFloat32)
    fixed_iso, moving_iso = isotropic(fixed_f, REGISTRATION_MM), isotropic(moving, REGISTRATION_MM)
    fixed_mask = _head_mask(fixed_iso)
    initial = sitk.CenteredTransformInitializer(fixed_iso, moving_iso, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    best = None
    for start in _starts(sitk.Euler3DTransform(initial)):
        attempt = _register_from(fixed_iso, moving_iso, fixed_mask, start, seed)
        if best is None or attempt.correlation > best.correlation:
            best = attempt
        if best.correlation >= WARN_CORRELATION:
            break
    moved = sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), fixed_f, best.transform, sitk.sitkLinear, 0.0,
                          sitk.sitkFloat32)
    best.correlation = head_correlation(fixed_f, moved, _head_mask(fixed_f))
    best.seconds = time.perf_counter() - tick
    return best


def _starts(initial: sitk.Euler3DTransform):
    """The initial transform, then turned by RESTARTS_DEG about each axis in turn."""
    yield initial
    for axis in range(3):
        for degrees in RESTARTS_DEG:
            start = sitk.Euler3DTransform(initial)
            angles = [start.GetAngleX(), start.GetAngleY(), start.GetAngleZ()]
            angles[axis] += np.deg2rad(degrees)
            start.SetRotation(*angles)
            yield start


def _register_from(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, start: sitk.Euler3DTransform,
                   seed: int) -> Registration:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=48)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=0.5, minStep=1e-3, numberOfIterations=300,
                                                 relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([4.0, 2.0, 1.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(start, inPlace=False)
    try:
        result = reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise SamlessError(f"the registration of the baseline to the follow-up failed ({_first_line(exc)}); "
                           "check that both are brain scans of the same patient.") from None
    if isinstance(result, sitk.CompositeTransform):
        result = result.GetNthTransform(0)
    euler = sitk.Euler3DTransform(result)
    moved = sitk.Resample(moving, fixed, euler, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return Registration(transform=euler, metric=float(reg.GetMetricValue()),
                        correlation=head_correlation(fixed, moved, fixed_mask),
                        iterations=int(reg.GetOptimizerIteration()), stop=reg.GetOptimizerStopConditionDescription())


def isotropic(image: sitk.Image, mm: float) -> sitk.Image:
    """`image` (float32) on a grid of `mm` voxels with its own direction and extent, smoothed first so the
    coarser axes do not alias (Gaussian with the FWHM that takes each spacing to `mm`)."""
    image = smooth_to(sitk.Cast(image, sitk.sitkFloat32), mm)
    size = [max(int(math.ceil(n * s / mm)), 1) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), (mm,) * 3,
                         image.GetDirection(), 0.0, sitk.sitkFloat32)


def _head_mask(image: sitk.Image) -> sitk.Image:
    arr = sitk.GetArrayViewFromImage(image)
    mask = sitk.GetImageFromArray(foreground_mask(arr).astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def head_correlation(fixed: sitk.Image, moved: sitk.Image, fixed_mask: sitk.Image) -> float:
    """Pearson correlation of the two images where both show the head."""
    a = sitk.GetArrayViewFromImage(fixed)
    b = sitk.GetArrayViewFromImage(moved)
    inside = sitk.GetArrayViewFromImage(fixed_mask).astype(bool) & foreground_mask(b)
    if inside.sum() < 1000:
        return 0.0
    return float(np.corrcoef(a[inside], b[inside])[0, 1])


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


@dataclass
class Change:
    """The result of one pair, on the follow-up grid."""

    label: sitk.Image  # uint8: 0 background, 1 stable, 2 new, 3 enlarging
    baseline_registered: sitk.Image  # the baseline scan on the follow-up grid
    followup: Segmentation
    baseline: Segmentation  # on the baseline's own grid
    baseline_lesions: sitk.Image  # uint8 baseline lesion mask on the follow-up grid
    registration: Registration
    lesions: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def followup_change(segmenter: Segmenter, baseline: sitk.Image, followup: sitk.Image, *,
                    options: SegmentOptions | None = None, rules: ChangeRules | None = None,
                    allow_poor_registration: bool = False, progress: Progress | None = None) -> Change:
    """Register, segment both scans and class each lesion (FLAIR-only models: one image per timepoint)."""
    rules = rules or ChangeRules()
    rules.check()
    options = options or SegmentOptions()
    if len(segmenter.modalities) != 1:
        raise SamlessError(f"follow-up needs a FLAIR-only model; {segmenter.name} takes "
                           f"{', '.join(segmenter.modalities)}.")
    registration = register_rigid(followup, baseline)
    warnings = registration_warnings(registration, allow_poor_registration)
    after_followup = segmenter.segment([followup], options, _half(progress, "follow-up", 0))
    after_baseline = segmenter.segment([baseline], options, _half(progress, "baseline", 1))
    # The baseline's probability on the follow-up grid, thresholded there with the same settings.
    carried = sitk.Resample(after_baseline.probability, followup, registration.transform, sitk.sitkLinear, 0.0,
                            sitk.sitkFloat32)
    base_on_follow = segmenter.relabel(carried, options)
    base_label = base_on_follow.label
    threshold = after_followup.statistics["threshold"] * rules.support_fraction
    supports = (None, None) if rules.support_fraction >= 1.0 else (
        sitk.Cast(after_followup.probability >= threshold, sitk.sitkUInt8),
        sitk.Cast(carried >= threshold, sitk.sitkUInt8))
    lesions = classify(after_followup.label, base_label, rules, *supports)
    moved = sitk.Resample(baseline, followup, registration.transform, sitk.sitkLinear, 0.0, baseline.GetPixelID())
    if rules.evidence_sd > 0:
        evidence = difference_evidence(followup, moved, baseline.GetSpacing())
        confirm_changes(lesions, after_followup.label, base_label, evidence, rules)
    label = change_label(after_followup.label, lesions)
    change = Change(label=label, baseline_registered=moved, followup=after_followup, baseline=after_baseline,
                    baseline_lesions=base_label, registration=registration, lesions=lesions, warnings=warnings)
    change.summary = change_summary(lesions, after_followup, base_on_follow, rules)
    return change


def registration_warnings(registration: Registration, allow_poor: bool) -> list[str]:
    """Refuse (or, if allowed, warn about) a registration that does not look like one patient's two scans."""
    r = registration.correlation
    if r < MIN_CORRELATION:
        message = (f"after registration the two scans correlate only {r:.2f} (one patient's scans: above "
                   f"{WARN_CORRELATION}): the registration failed or they are different patients")
        if not allow_poor:
            raise SamlessError(f"{message}. Check the pair; --allow-poor-registration classes the lesions anyway.")
        return [message + "; classed anyway (--allow-poor-registration): do not trust the change."]
    if r < WARN_CORRELATION:
        return [f"after registration the two scans correlate {r:.2f}, lower than usual for one patient's scans "
                f"(above {WARN_CORRELATION}): check the registered baseline before trusting the change."]
    return []


def _half(progress: Progress | None, name: str, half: int) -> Progress | None:
    """Progress of one of the two segmentations as that half of one rising count."""
    if progress is None:
        return None
    return lambda stage, done, total: progress(f"{name} {stage}", done + half * total, 2 * total)


def classify(followup_label: sitk.Image, baseline_label: sitk.Image, rules: ChangeRules,
             followup_support: sitk.Image | None = None, baseline_support: sitk.Image | None = None
             ) -> list[dict[str, Any]]:
    """A row per follow-up lesion (stable, new, enlarging) and per baseline lesion (persisting, shrinking,
    disappeared). All masks are on the follow-up grid.

    A lesion's counterpart is the other timepoint's lesion tissue that overlaps it (after dilating by
    `match_mm`), each lesion shared out in proportion to its overlaps, so merging and splitting lesions are
    counted once. The other timepoint's tissue is its `..._support` mask where given (the lesions at a lower
    threshold: a lesion just under the threshold at one timepoint is not new or gone at the other)."""
    rules.check()
    follow = sitk.ConnectedComponent(followup_label > 0, True)
    base = sitk.ConnectedComponent(baseline_label > 0, True)
    follow_other = follow if followup_support is None else sitk.ConnectedComponent(followup_support > 0, True)
    base_other = base if baseline_support is None else sitk.ConnectedComponent(baseline_support > 0, True)
    f = sitk.GetArrayViewFromImage(follow)
    b = sitk.GetArrayViewFromImage(base)
    spacing = followup_label.GetSpacing()
    voxel = math.prod(spacing)
    # overlap counts: follow-up lesion i against the baseline tissue near it, and the other way round
    fb = _pairs(f, sitk.GetArrayFromImage(_dilate(base_other, rules.match_mm, spacing)))
    bf = _pairs(b, sitk.GetArrayFromImage(_dilate(follow_other, rules.match_mm, spacing)))
    fb_totals, bf_totals = _column_totals(fb), _column_totals(bf)
    base_other_sizes = np.bincount(sitk.GetArrayViewFromImage(base_other).ravel())
    follow_other_sizes = np.bincount(sitk.GetArrayViewFromImage(follow_other).ravel())
    f_sizes, b_sizes = np.bincount(f.ravel()), np.bincount(b.ravel())
    centroids, base_centroids = _centroids(follow), _centroids(base)
    rows = []
    for i in range(1, len(f_sizes)):
        before = voxel * _credited(fb.get(i, {}), fb_totals, base_other_sizes)
        after = voxel * float(f_sizes[i])
        rows.append(_row(i, "followup", _follow_class(before, after, fb.get(i), rules), before, after,
                         centroids[i]))
    for j in range(1, len(b_sizes)):
        after = voxel * _credited(bf.get(j, {}), bf_totals, follow_other_sizes)
        before = voxel * float(b_sizes[j])
        rows.append(_row(j, "baseline", _base_class(before, after, bf.get(j), rules), before, after,
                         base_centroids[j]))
    return rows


EVIDENCE_RESOLUTION_MM = 2.0  # both scans are compared at the coarser of their resolutions, at most this


def difference_evidence(followup: sitk.Image, baseline_registered: sitk.Image,
                        baseline_spacing: tuple[float, ...]) -> sitk.Image:
    """How much brighter each voxel is at follow-up than at baseline, in noise SDs (float32, follow-up grid).

    Both scans are smoothed to one resolution (the coarser of the two, at most EVIDENCE_RESOLUTION_MM), the
    baseline's intensities are mapped onto the follow-up's by histogram matching (the scanners and protocols
    may differ), and the difference is scaled by its robust spread over the head (median absolute deviation),
    so the same threshold holds on any scanner. A lesion that is new or grew shows here; one that is only
    segmented differently at the two timepoints does not."""
    spacing = followup.GetSpacing()
    resolution = min(max(*spacing, *baseline_spacing), EVIDENCE_RESOLUTION_MM)
    after = smooth_to(sitk.Cast(followup, sitk.sitkFloat32), resolution)
    before = smooth_to(sitk.Cast(baseline_registered, sitk.sitkFloat32), resolution)
    before = sitk.HistogramMatching(before, after, numberOfHistogramLevels=256, numberOfMatchPoints=15,
                                    thresholdAtMeanIntensity=True)
    a, b = sitk.GetArrayViewFromImage(after), sitk.GetArrayViewFromImage(before)
    difference = a - b
    head = foreground_mask(a) & foreground_mask(b)
    values = difference[head] if head.sum() >= 1000 else difference.ravel()
    centre = float(np.median(values))
    spread = 1.4826 * float(np.median(np.abs(values - centre)))
    out = sitk.GetImageFromArray(((difference - centre) / max(spread, 1e-6)).astype(np.float32))
    out.CopyInformation(followup)
    return out


def smooth_to(image: sitk.Image, mm: float) -> sitk.Image:
    """Gaussian smoothing that takes each axis's resolution to about `mm` (the FWHM that adds up to it)."""
    sigma = [math.sqrt(max(mm * mm - s * s, 0.0)) / 2.355 for s in image.GetSpacing()]
    return sitk.SmoothingRecursiveGaussian(image, [max(s, 1e-3) for s in sigma]) if max(sigma) > 0.05 else image


def confirm_changes(lesions: list[dict[str, Any]], followup_label: sitk.Image, baseline_label: sitk.Image,
                    evidence: sitk.Image, rules: ChangeRules) -> None:
    """Keep a new or enlarging class only where the difference image shows the change; otherwise the lesion
    is stable (it was there before, segmented differently). The lesion's part outside the baseline's lesions
    (all of a new one) must be `evidence_sd` brighter than at baseline over `evidence_fraction` of it (and
    over `min_growth_mm3`, for an enlarging one): noise alone brightens a few per cent of any region. Adds
    each follow-up row's `evidence_mm3`, the volume that showed it."""
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(followup_label > 0, True))
    outside = sitk.GetArrayViewFromImage(baseline_label) == 0
    brighter = (sitk.GetArrayViewFromImage(evidence) > rules.evidence_sd) & outside
    voxel = math.prod(followup_label.GetSpacing())
    part = np.bincount(components[outside], minlength=int(components.max()) + 1)
    shown = np.bincount(components[brighter], minlength=len(part))
    for row in lesions:
        if row["timepoint"] != "followup":
            continue
        i = row["id"]
        row["evidence_mm3"] = round(float(shown[i]) * voxel, 3)
        if row["class"] in ("new", "enlarging") and shown[i] < rules.evidence_fraction * part[i]:
            row["class"] = "stable"
        elif row["class"] == "enlarging" and shown[i] * voxel < rules.min_growth_mm3:
            row["class"] = "stable"


def _dilate(labels: sitk.Image, mm: float, spacing) -> sitk.Image:
    radius = [int(round(mm / s)) for s in spacing]
    return sitk.GrayscaleDilate(labels, radius, sitk.sitkBall) if any(radius) else labels


def _pairs(own: np.ndarray, other_near: np.ndarray) -> dict[int, dict[int, int]]:
    """For each lesion of `own`: {lesion of the other timepoint: voxels of own lying in its dilation}."""
    inside = (own > 0) & (other_near > 0)
    out: dict[int, dict[int, int]] = {}
    if inside.any():
        pairs, counts = np.unique(np.stack([own[inside], other_near[inside]]), axis=1, return_counts=True)
        for (i, j), n in zip(pairs.T.tolist(), counts.tolist()):
            out.setdefault(int(i), {})[int(j)] = int(n)
    return out


def _credited(overlaps: dict[int, int], totals: dict[int, int], sizes: np.ndarray) -> float:
    """Voxels of the other timepoint's lesions credited to one lesion: each of them shared among all the
    lesions it overlaps, in proportion to the overlaps."""
    return sum(float(sizes[j]) * n / totals[j] for j, n in overlaps.items())


def _column_totals(pairs: dict[int, dict[int, int]]) -> dict[int, int]:
    totals: dict[int, int] = {}
    for row in pairs.values():
        for j, n in row.items():
            totals[j] = totals.get(j, 0) + n
    return totals


def _follow_class(before: float, after: float, matched, rules: ChangeRules) -> str:
    if not matched:
        return "new" if after >= rules.min_new_mm3 else "stable"
    grown = after - before
    if after >= (1.0 + rules.growth_fraction) * before and grown >= rules.min_growth_mm3:
        return "enlarging"
    return "stable"


def _base_class(before: float, after: float, matched, rules: ChangeRules) -> str:
    if not matched:
        return "disappeared"
    if before >= (1.0 + rules.growth_fraction) * after and before - after >= rules.min_growth_mm3:
        return "shrinking"
    return "persisting"


def _centroids(labels: sitk.Image) -> dict[int, tuple[float, float, float]]:
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(labels)
    return {int(k): shape.GetCentroid(k) for k in shape.GetLabels()}


def _row(i: int, timepoint: str, kind: str, before: float, after: float, centroid) -> dict[str, Any]:
    return {"id": i, "timepoint": timepoint, "class": kind, "volume_baseline_mm3": round(before, 3),
            "volume_followup_mm3": round(after, 3), "change_mm3": round(after - before, 3),
            "centroid_mm": [round(float(c), 3) for c in centroid]}


def change_label(followup_label: sitk.Image, lesions: list[dict[str, Any]]) -> sitk.Image:
    """The label map: each follow-up lesion's voxels get its class's value."""
    follow = sitk.GetArrayFromImage(sitk.ConnectedComponent(followup_label > 0, True))
    value = {v: k for k, v in LABELS.items()}
    lut = np.zeros(int(follow.max()) + 1, np.uint8)
    for row in lesions:
        if row["timepoint"] == "followup":
            lut[row["id"]] = value[row["class"]]
    out = sitk.GetImageFromArray(lut[follow])
    out.CopyInformation(followup_label)
    return out


def change_summary(lesions: list[dict[str, Any]], followup: Segmentation, baseline_on_followup: Segmentation,
                   rules: ChangeRules) -> dict[str, Any]:
    """Counts per class and the lesion volume at each timepoint (both measured on the follow-up grid)."""
    counts = {k: sum(r["class"] == k for r in lesions)
              for k in ("new", "enlarging", "stable", "shrinking", "disappeared", "persisting")}
    before = baseline_on_followup.statistics["total_volume_ml"]
    after = followup.statistics["total_volume_ml"]
    return {"new_lesions": counts["new"], "enlarging_lesions": counts["enlarging"],
            "new_or_enlarging_lesions": counts["new"] + counts["enlarging"],
            "stable_lesions": counts["stable"], "shrinking_lesions": counts["shrinking"],
            "disappeared_lesions": counts["disappeared"],
            "lesions_followup": followup.statistics["lesion_count"],
            "lesions_baseline": baseline_on_followup.statistics["lesion_count"],
            "volume_baseline_ml": round(before, 4), "volume_followup_ml": round(after, 4),
            "volume_change_ml": round(after - before, 4), "rules": asdict(rules),
            "threshold": followup.statistics["threshold"], "min_lesion_mm3": followup.statistics["min_lesion_mm3"],
            "model": followup.statistics["model"]}
