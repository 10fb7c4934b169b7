"""Follow-up results into the scene: "New", "Enlarging" and "Stable" MS lesion segments on the follow-up FLAIR,
the baseline registered onto it (shown under the follow-up, to flick between them) and the change table.

The segmentation node remembers its registered baseline and table (node references) and the run's summary
(an attribute), so the panel can show them again after the scene is saved and reloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from slicer import (
    vtkMRMLScalarVolumeNode,
    vtkMRMLScene,
    vtkMRMLSegmentationNode,
    vtkMRMLSliceCompositeNode,
    vtkMRMLTableNode,
    vtkMRMLVolumeNode,
)

from samless.errors import SamlessError
from samless.followup import ENLARGING, NEW, STABLE

from .results import (
    TABLE_REFERENCE,
    add_node,
    fill_columns,
    lps_to_ras,
    place_beside,
    remove_node,
    set_segment_labelmap,
)
from .terminology import LesionTerminology, apply_terminology
from .volumes import same_grid, update_volume_from_sitk, volume_to_sitk

# (label value of change.nii.gz, segment ID, 3dSlicerLabel of its terminology entry)
CHANGE_SEGMENTS = ((NEW, "MSLesionNew", "New MS lesion"), (ENLARGING, "MSLesionEnlarging", "Enlarging MS lesion"),
                   (STABLE, "MSLesionStable", "Stable MS lesion"))
BASELINE_REFERENCE = "samlessRegisteredBaseline"
ATTR_CHANGE_SUMMARY = "SAMLess.ChangeSummary"  # JSON of the run's summary, registration and warnings
# (name, type, unit, description); one row per lesion of either timepoint, centroids in RAS.
CHANGE_TABLE_COLUMNS = (
    ("Lesion", int, "", "lesion number at its timepoint"),
    ("Class", str, "", "new, enlarging or stable (follow-up); persisting, shrinking or disappeared (baseline)"),
    ("Timepoint", str, "", "the scan the lesion belongs to"),
    ("Baseline volume", float, "mm3", "lesion volume at baseline (what overlaps it, for a follow-up lesion)"),
    ("Follow-up volume", float, "mm3", "lesion volume at follow-up (what overlaps it, for a baseline lesion)"),
    ("Change", float, "mm3", "follow-up volume minus baseline volume"),
    ("Brighter", float, "mm3", "volume of a follow-up lesion, outside the baseline's lesions, brighter than at "
     "baseline in the registered difference image (what confirms a new or enlarging lesion)"),
    ("R", float, "mm", "centroid, right (RAS)"),
    ("A", float, "mm", "centroid, anterior (RAS)"),
    ("S", float, "mm", "centroid, superior (RAS)"),
)
# the rows that need a look first: what changed, then what is stable
CLASS_ORDER = ("new", "enlarging", "stable", "shrinking", "disappeared", "persisting")


@dataclass
class ChangeOutputs:
    """What one `samless followup` run wrote, read into memory."""

    label: sitk.Image  # 0 background, 1 stable, 2 new, 3 enlarging; the follow-up's grid
    baseline_registered: sitk.Image
    report: dict[str, Any]  # change.json: summary, registration, warnings, lesions


@dataclass
class ChangeResult:
    segmentation: vtkMRMLSegmentationNode
    baseline_registered: vtkMRMLScalarVolumeNode
    table: vtkMRMLTableNode
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def read_change_outputs(paths: dict[str, str | os.PathLike]) -> ChangeOutputs:
    """Read a follow-up run's change map, registered baseline and report (before touching the scene)."""
    try:
        label = sitk.ReadImage(str(paths["change"]))
        baseline = sitk.ReadImage(str(paths["baseline_registered"]))
        report = json.loads(Path(paths["json"]).read_text(encoding="utf-8"))
    except (KeyError, OSError, RuntimeError, ValueError, TypeError) as exc:
        raise SamlessError(f"the follow-up finished but its results could not be read ({exc}).") from None
    if not (isinstance(report, dict) and isinstance(report.get("summary"), dict)
            and isinstance(report.get("lesions"), list)):
        raise SamlessError(f"{paths['json']} is not a follow-up report (no summary and lesions).")
    if not same_grid(label, baseline):
        raise SamlessError("the change map and the registered baseline of the run are on different grids.")
    return ChangeOutputs(label=label, baseline_registered=baseline, report=report)


def import_change(scene: vtkMRMLScene, followup: vtkMRMLVolumeNode, baseline_name: str, outputs: ChangeOutputs,
                  terminologies: dict[str, LesionTerminology]) -> ChangeResult:
    """Put a follow-up run in the scene beside `followup` (the later FLAIR); all or nothing. Every call makes
    new nodes: a follow-up is a report of its own, never written over the user's segments.
    `terminologies` maps each CHANGE_SEGMENTS label ("New MS lesion", ...) to its entry."""
    if not same_grid(outputs.label, volume_to_sitk(followup)):
        raise SamlessError(f"the change map does not match the grid of {followup.GetName()!r} (was it changed "
                           "during the run?); run the follow-up again.")
    name = followup.GetName()
    created: list = []
    try:
        segmentation = add_node(scene, created, "vtkMRMLSegmentationNode", f"{name} lesion change")
        moved = add_node(scene, created, "vtkMRMLScalarVolumeNode", f"{baseline_name} registered to {name}")
        table = add_node(scene, created, "vtkMRMLTableNode", f"{name} lesion change")
        _fill_segments(segmentation, followup, outputs.label, terminologies)
        update_volume_from_sitk(moved, outputs.baseline_registered)
        moved.SetAndObserveTransformNodeID(followup.GetTransformNodeID())
        moved.CreateDefaultDisplayNodes()
        fill_change_table(table, outputs.report["lesions"])
        report = {k: outputs.report.get(k) for k in ("summary", "registration", "warnings")}
        segmentation.SetAttribute(ATTR_CHANGE_SUMMARY, json.dumps(report))
        segmentation.SetNodeReferenceID(BASELINE_REFERENCE, moved.GetID())
        segmentation.SetNodeReferenceID(TABLE_REFERENCE, table.GetID())  # as a lesion table: jump_to_lesion works
        for node in (segmentation, moved, table):
            place_beside(node, followup)
    except Exception:
        for node in created:
            remove_node(node)
        raise
    return ChangeResult(segmentation, moved, table, report["summary"], list(report["warnings"] or []))


def _fill_segments(segmentation: vtkMRMLSegmentationNode, followup: vtkMRMLVolumeNode, label: sitk.Image,
                   terminologies: dict[str, LesionTerminology]) -> None:
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(followup)
    segmentation.SetAndObserveTransformNodeID(followup.GetTransformNodeID())
    for value, segment_id, term_label in CHANGE_SEGMENTS:
        terms = terminologies[term_label]
        segmentation.GetSegmentation().AddEmptySegment(segment_id, terms.label, terms.color)
        apply_terminology(segmentation.GetSegmentation().GetSegment(segment_id), terms)
        set_segment_labelmap(segmentation, segment_id, sitk.Cast(label == value, sitk.sitkUInt8))


def fill_change_table(table: vtkMRMLTableNode, lesions: list[dict[str, Any]]) -> None:
    """One row per lesion, the changes first (new, enlarging), then stable and baseline lesions."""
    order = {name: i for i, name in enumerate(CLASS_ORDER)}
    rows = sorted(lesions, key=lambda r: (order.get(r["class"], len(order)), -abs(r["change_mm3"])))
    values = [[r["id"], r["class"], r["timepoint"], r["volume_baseline_mm3"], r["volume_followup_mm3"],
               r["change_mm3"], r.get("evidence_mm3", 0.0), *lps_to_ras(r["centroid_mm"])] for r in rows]
    was_modifying = table.StartModify()
    fill_columns(table, CHANGE_TABLE_COLUMNS, values)
    table.EndModify(was_modifying)


def change_report(segmentation: vtkMRMLSegmentationNode | None) -> dict[str, Any] | None:
    """The summary, registration and warnings stored on a change segmentation, or None for any other node."""
    text = segmentation.GetAttribute(ATTR_CHANGE_SUMMARY) if segmentation is not None else None
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def show_for_flicking(scene: vtkMRMLScene, followup: vtkMRMLVolumeNode, baseline: vtkMRMLVolumeNode) -> int:
    """Every slice view shows the follow-up, with the registered baseline over it at opacity 0 (see `flick`);
    returns the number of views set."""
    views = _composite_nodes(scene)
    for view in views:
        view.SetBackgroundVolumeID(followup.GetID())
        view.SetForegroundVolumeID(baseline.GetID())
        view.SetForegroundOpacity(0.0)
    return len(views)


def flick(scene: vtkMRMLScene) -> float:
    """Show the other timepoint in every slice view (the baseline's opacity 0 <-> 1); returns the new opacity."""
    views = _composite_nodes(scene)
    if not views:
        return 0.0
    opacity = 0.0 if views[0].GetForegroundOpacity() >= 0.5 else 1.0
    for view in views:
        view.SetForegroundOpacity(opacity)
    return opacity


def _composite_nodes(scene: vtkMRMLScene) -> list[vtkMRMLSliceCompositeNode]:
    nodes = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


def change_row(table: vtkMRMLTableNode, lesion_id: int, timepoint: str) -> int:
    """The table row of lesion `lesion_id` of `timepoint` (a sorted view shows both in its columns)."""
    data = table.GetTable()
    ids, times = data.GetColumnByName("Lesion"), data.GetColumnByName("Timepoint")
    for row in range(data.GetNumberOfRows()):
        if ids.GetValue(row) == int(lesion_id) and times.GetValue(row) == timepoint:
            return row
    raise IndexError(f"the change table has no {timepoint} lesion {lesion_id}")
