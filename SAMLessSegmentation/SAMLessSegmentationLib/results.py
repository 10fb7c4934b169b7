"""Results into the scene: the "MS lesion" segment, the probability volume and the lesion table.

The segmentation node remembers its probability volume and table (node references) and the settings
that made it (attributes), so re-thresholding works later, after saving and reloading the scene too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import vtk
from slicer import (
    vtkMRMLNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLScene,
    vtkMRMLSegmentationNode,
    vtkMRMLSliceNode,
    vtkMRMLSubjectHierarchyNode,
    vtkMRMLTableNode,
    vtkMRMLVolumeNode,
    vtkSegmentationConverter,
    vtkSlicerSegmentationsModuleLogic,
)

from samless.errors import SamlessError
from samless.pipeline import threshold_lesions

from .terminology import LesionTerminology, apply_terminology
from .volumes import same_grid, sitk_to_oriented_image, update_volume_from_sitk, volume_to_sitk

SEGMENT_ID = "MSLesion"
PROBABILITY_REFERENCE = "samlessProbability"
TABLE_REFERENCE = "samlessLesionTable"
ATTR_MODEL = "SAMLess.Model"
ATTR_THRESHOLD = "SAMLess.Threshold"
ATTR_MIN_SIZE = "SAMLess.MinimumLesionMm3"
ATTR_CONNECTIVITY = "SAMLess.Connectivity"
ATTR_COUNT = "SAMLess.LesionCount"
ATTR_TOTAL_ML = "SAMLess.TotalVolumeMl"
ATTR_WRITTEN = "SAMLess.WrittenLabelSha256"  # of what SAMLess last wrote into the segment: edits show up
# Colour tables tried in turn for the probability map (a bare scene has none: then it stays grey).
PROBABILITY_COLORS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLPETProceduralColorNodePET-Heat")
# (name, type, unit, description); centroids are RAS, as Slicer shows coordinates.
TABLE_COLUMNS = (
    ("Lesion", int, "", "lesion number (1 = largest)"),
    ("Volume", float, "mm3", "lesion volume"),
    ("R", float, "mm", "centroid, right (RAS)"),
    ("A", float, "mm", "centroid, anterior (RAS)"),
    ("S", float, "mm", "centroid, superior (RAS)"),
    ("Max probability", float, "", "highest lesion probability in the lesion"),
    ("Mean probability", float, "", "mean lesion probability in the lesion"),
    ("Voxels", int, "", "number of voxels"),
)


@dataclass
class Outputs:
    """What one `samless segment` run wrote, read into memory."""

    label: sitk.Image
    probability: sitk.Image
    statistics: dict[str, Any]
    connectivity: str = "full"  # how voxels join into lesions (the model card's), kept for re-thresholding


@dataclass
class LesionResult:
    segmentation: vtkMRMLSegmentationNode
    probability: vtkMRMLScalarVolumeNode
    table: vtkMRMLTableNode
    segment_id: str
    statistics: dict[str, Any]


def read_outputs(paths: dict[str, str | os.PathLike]) -> Outputs:
    """Read the label map, probability map and statistics files of a run (before touching the scene)."""
    try:
        label = sitk.ReadImage(str(paths["label"]))
        probability = sitk.ReadImage(str(paths["probability"]), sitk.sitkFloat32)
        statistics = json.loads(Path(paths["statistics_json"]).read_text(encoding="utf-8"))
    except (KeyError, OSError, RuntimeError, ValueError) as exc:
        raise SamlessError(f"the segmentation finished but its results could not be read ({exc}).") from None
    if not same_grid(label, probability):
        raise SamlessError("the label map and probability map of the run are on different grids.")
    # the run's statistics say how it joined voxels into lesions: re-thresholding must do the same
    return Outputs(label=label, probability=probability, statistics=statistics,
                   connectivity=statistics.get("connectivity", "full"))


def relabel_probability(probability: sitk.Image, threshold: float, min_lesion_mm3: float, model: str = "",
                        connectivity: str = "full") -> Outputs:
    """Lesions from a stored probability map: the same code as the command line, no network."""
    result = threshold_lesions(probability, threshold, min_lesion_mm3, connectivity, model)
    return Outputs(result.label, probability, result.statistics, connectivity)


# --- building the nodes -------------------------------------------------------------------------

def import_results(scene: vtkMRMLScene, reference: vtkMRMLVolumeNode, outputs: Outputs,
                   terminology: LesionTerminology, segmentation: vtkMRMLSegmentationNode | None = None,
                   replace_edits: bool = False) -> LesionResult:
    """Put a run's outputs in the scene, beside `reference` (the FLAIR); all or nothing.

    An existing `segmentation` is updated (its "MS lesion" segment replaced, other segments kept),
    else a new one is made. Nodes made here are removed again if anything fails. A lesion segment edited
    by hand since SAMLess wrote it is replaced only with `replace_edits` (else `EditedByHand`: ask first).
    """
    if not same_grid(outputs.label, volume_to_sitk(reference)):
        raise SamlessError(f"the result does not match the grid of {reference.GetName()!r} (was it changed "
                           "during the run?); run the segmentation again.")
    if segmentation is not None and not replace_edits:
        refuse_hand_edits(segmentation, "the new result")
    created = []
    try:
        if segmentation is None:
            segmentation = add_node(scene, created, "vtkMRMLSegmentationNode", f"{reference.GetName()} MS lesions")
        probability = segmentation.GetNodeReference(PROBABILITY_REFERENCE) or add_node(
            scene, created, "vtkMRMLScalarVolumeNode", f"{reference.GetName()} lesion probability")
        table = segmentation.GetNodeReference(TABLE_REFERENCE) or add_node(
            scene, created, "vtkMRMLTableNode", f"{reference.GetName()} lesions")
        _prepare_segmentation(segmentation, reference, terminology)
        _fill_probability(probability, reference, outputs.probability)
        segmentation.SetNodeReferenceID(PROBABILITY_REFERENCE, probability.GetID())
        segmentation.SetNodeReferenceID(TABLE_REFERENCE, table.GetID())
        _store(segmentation, table, outputs)
        for node in (segmentation, probability, table):
            place_beside(node, reference)
    except Exception:
        for node in created:
            remove_node(node)
        raise
    return LesionResult(segmentation, probability, table, SEGMENT_ID, outputs.statistics)


def remove_node(node: vtkMRMLNode) -> None:
    """Remove a node with the display and storage nodes it made (the scene alone keeps those)."""
    scene = node.GetScene()
    companions = []
    if hasattr(node, "GetNumberOfDisplayNodes"):
        companions += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if hasattr(node, "GetStorageNode"):
        companions.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for companion in companions:
        if companion is not None:
            scene.RemoveNode(companion)


def add_node(scene: vtkMRMLScene, created: list, class_name: str, name: str):
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    created.append(node)
    return node


def _prepare_segmentation(segmentation: vtkMRMLSegmentationNode, reference: vtkMRMLVolumeNode,
                          terminology: LesionTerminology) -> None:
    if segmentation.GetDisplayNode() is None:
        segmentation.CreateDefaultDisplayNodes()
    # The reference geometry is what DICOM SEG export and the Segment Editor need to find the FLAIR.
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    segmentation.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    if segmentation.GetSegmentation().GetSegment(SEGMENT_ID) is None:
        segmentation.GetSegmentation().AddEmptySegment(SEGMENT_ID, terminology.label, terminology.color)
    apply_terminology(segmentation.GetSegmentation().GetSegment(SEGMENT_ID), terminology)


def _fill_probability(node: vtkMRMLScalarVolumeNode, reference: vtkMRMLVolumeNode, image: sitk.Image) -> None:
    update_volume_from_sitk(node, image)
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    scene = node.GetScene()
    color = next((c for c in PROBABILITY_COLORS if scene.GetNodeByID(c) is not None), None)
    if color:
        display.SetAndObserveColorNodeID(color)


def _store(segmentation: vtkMRMLSegmentationNode, table: vtkMRMLTableNode, outputs: Outputs) -> None:
    """Write the label into the segment, the statistics into the table, the settings into attributes."""
    set_segment_labelmap(segmentation, SEGMENT_ID, outputs.label)
    fill_table(table, outputs.statistics)
    stats = outputs.statistics
    settings = {ATTR_MODEL: stats.get("model", ""), ATTR_THRESHOLD: stats.get("threshold", ""),
                ATTR_MIN_SIZE: stats.get("min_lesion_mm3", ""), ATTR_CONNECTIVITY: outputs.connectivity,
                ATTR_WRITTEN: voxels_digest(sitk.GetArrayViewFromImage(outputs.label) > 0)}
    for key, value in settings.items():
        segmentation.SetAttribute(key, str(value))


def set_segment_labelmap(segmentation: vtkMRMLSegmentationNode, segment_id: str, label: sitk.Image) -> None:
    """Replace a segment's voxels with a uint8 label map (1 = inside), resampled if grids differ."""
    logic = vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(sitk_to_oriented_image(sitk.Cast(label > 0, sitk.sitkUInt8)),
                                            segmentation, segment_id, logic.MODE_REPLACE):
        raise SamlessError(f"could not write the lesions into segment {segment_id!r}.")


def fill_table(table: vtkMRMLTableNode, statistics: dict[str, Any]) -> None:
    """One row per lesion; the count and total volume go into table attributes."""
    lesions = statistics["lesions"]
    rows = [[lesion["id"], lesion["volume_mm3"], *lps_to_ras(lesion["centroid_mm"]), lesion["max_probability"],
             lesion["mean_probability"], lesion["voxels"]] for lesion in lesions]
    was_modifying = table.StartModify()
    fill_columns(table, TABLE_COLUMNS, rows)
    table.SetAttribute(ATTR_COUNT, str(statistics["lesion_count"]))
    table.SetAttribute(ATTR_TOTAL_ML, str(statistics["total_volume_ml"]))
    table.EndModify(was_modifying)


def fill_columns(table: vtkMRMLTableNode, columns: Sequence[tuple[str, type, str, str]],
                 rows: Sequence[Sequence[Any]]) -> None:
    """Replace a table's contents: `columns` are (name, int/float/str, unit, description), `rows` their
    values. The table is locked: results, not a form (edits would silently disagree with the segments)."""
    arrays = {int: vtk.vtkIntArray, float: vtk.vtkDoubleArray, str: vtk.vtkStringArray}
    table.RemoveAllColumns()
    for index, (name, kind, unit, description) in enumerate(columns):
        column = arrays[kind]()
        column.SetName(name)
        for row in rows:
            column.InsertNextValue(kind(row[index]))
        table.AddColumn(column)
        table.SetColumnUnitLabel(name, unit)
        table.SetColumnDescription(name, description)
        table.SetColumnTitle(name, f"{name} ({unit})" if unit else name)
    table.SetUseColumnTitleAsColumnHeader(True)
    table.SetLocked(True)


def show_3d(segmentation: vtkMRMLSegmentationNode, visible: bool = True) -> bool:
    """Show the segments as surfaces in the 3D views (made from the voxels once), or hide them; returns whether
    the segmentation now has a surface representation."""
    if visible:
        segmentation.CreateClosedSurfaceRepresentation()
    if segmentation.GetDisplayNode() is None:
        segmentation.CreateDefaultDisplayNodes()
    segmentation.GetDisplayNode().SetVisibility3D(bool(visible))
    surface = vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    return bool(segmentation.GetSegmentation().ContainsRepresentation(surface))


def shown_in_3d(segmentation: vtkMRMLSegmentationNode) -> bool:
    """Whether the segments are shown as surfaces in the 3D views."""
    display = segmentation.GetDisplayNode()
    surface = vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    return bool(display is not None and display.GetVisibility3D()
                and segmentation.GetSegmentation().ContainsRepresentation(surface))


def lps_to_ras(point: Sequence[float]) -> list[float]:
    return [-float(point[0]), -float(point[1]), float(point[2])]


def place_beside(node: vtkMRMLNode, reference: vtkMRMLNode) -> None:
    """Put `node` under the same subject hierarchy parent (the FLAIR's study) as `reference`."""
    shnode = vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    parent = shnode.GetItemParent(shnode.GetItemByDataNode(reference))
    if not parent:
        return  # the reference is not in the hierarchy (a bare scene): leave the node at the top
    item = shnode.GetItemByDataNode(node) or shnode.CreateItem(parent, node)
    shnode.SetItemParent(item, parent)


# --- after the run ------------------------------------------------------------------------------

class EditedByHand(SamlessError):
    """The lesion segment was changed since SAMLess wrote it; replacing it would lose those edits."""


def voxels_digest(voxels: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(np.ascontiguousarray(voxels, dtype=bool)).tobytes()).hexdigest()


def edited_by_hand(segmentation: vtkMRMLSegmentationNode) -> bool:
    """Whether the lesion segment differs from what SAMLess last wrote into it (painted, erased, ...)."""
    written = segmentation.GetAttribute(ATTR_WRITTEN)
    probability = segmentation.GetNodeReference(PROBABILITY_REFERENCE)
    if not written or probability is None:
        return False  # written before edits were tracked: nothing to compare with
    return voxels_digest(segment_voxels(segmentation, SEGMENT_ID, probability)) != written


def refuse_hand_edits(segmentation: vtkMRMLSegmentationNode, replacement: str) -> None:
    """`EditedByHand` if the lesion segment was edited since SAMLess wrote it (`replacement` would undo that)."""
    if segmentation.GetSegmentation().GetSegment(SEGMENT_ID) is not None and edited_by_hand(segmentation):
        raise EditedByHand(f"the MS lesion segment of {segmentation.GetName()!r} was edited by hand since SAMLess "
                           f"wrote it; {replacement} would replace those edits.")


def rethreshold(segmentation: vtkMRMLSegmentationNode, threshold: float, min_lesion_mm3: float,
                replace_edits: bool = False) -> dict[str, Any]:
    """Threshold the stored probability map again and update the segment and table; no network. A segment
    edited by hand since is replaced only with `replace_edits` (else `EditedByHand`: ask the user first)."""
    probability = segmentation.GetNodeReference(PROBABILITY_REFERENCE)
    table = segmentation.GetNodeReference(TABLE_REFERENCE)
    if probability is None or table is None or segmentation.GetSegmentation().GetSegment(SEGMENT_ID) is None:
        raise SamlessError(f"{segmentation.GetName()!r} holds no SAMLess result to re-threshold; run it first.")
    if not replace_edits:
        refuse_hand_edits(segmentation, "a new threshold")
    connectivity = segmentation.GetAttribute(ATTR_CONNECTIVITY) or "full"
    outputs = relabel_probability(volume_to_sitk(probability), threshold, min_lesion_mm3,
                                  segmentation.GetAttribute(ATTR_MODEL) or "", connectivity)
    _store(segmentation, table, outputs)
    return outputs.statistics


def stored_settings(segmentation: vtkMRMLSegmentationNode | None) -> tuple[float, float] | None:
    """(threshold, minimum lesion mm^3) a SAMLess segmentation was last made with, or None."""
    if segmentation is None or segmentation.GetNodeReference(PROBABILITY_REFERENCE) is None:
        return None
    try:
        return float(segmentation.GetAttribute(ATTR_THRESHOLD)), float(segmentation.GetAttribute(ATTR_MIN_SIZE))
    except (TypeError, ValueError):
        return None


def lesion_summary(table: vtkMRMLTableNode | None) -> tuple[int, float] | None:
    """(lesion count, total volume mL) stored on a lesion table, or None."""
    if table is None or table.GetAttribute(ATTR_COUNT) is None:
        return None
    return int(table.GetAttribute(ATTR_COUNT)), float(table.GetAttribute(ATTR_TOTAL_ML))


def lesion_position(table: vtkMRMLTableNode, row: int) -> list[float]:
    """The centroid (RAS, in the FLAIR's own frame) of the lesion in table row `row`."""
    data = table.GetTable()
    if not 0 <= row < data.GetNumberOfRows():
        raise IndexError(f"the lesion table has no row {row}")
    return [data.GetColumnByName(axis).GetValue(row) for axis in ("R", "A", "S")]


def lesion_row(table: vtkMRMLTableNode, lesion_id: int) -> int:
    """The table row of lesion number `lesion_id` (what a sorted table view shows in its first column)."""
    column = table.GetTable().GetColumnByName("Lesion")
    for row in range(table.GetTable().GetNumberOfRows()):
        if column.GetValue(row) == int(lesion_id):
            return row
    raise IndexError(f"the lesion table has no lesion {lesion_id}")


def jump_to_lesion(segmentation: vtkMRMLSegmentationNode, row: int) -> list[float]:
    """Centre every slice view on lesion `row` of the segmentation's table; return the world position."""
    local = lesion_position(segmentation.GetNodeReference(TABLE_REFERENCE), row)
    world = [0.0, 0.0, 0.0]
    segmentation.TransformPointToWorld(local, world)  # the FLAIR may sit under a registration transform
    vtkMRMLSliceNode.JumpAllSlices(segmentation.GetScene(), *world, vtkMRMLSliceNode.CenteredJumpSlice)
    return world


def segment_lesion_summary(segmentation: vtkMRMLSegmentationNode, segment_id: str, reference: vtkMRMLVolumeNode,
                           connectivity: str = "full") -> tuple[int, float]:
    """(lesion count, volume in mL) of what a segment holds now: after the Segment Editor's masking
    (editable area, overwrite policy) and any hand edits, not what the model gave."""
    voxels = segment_voxels(segmentation, segment_id, reference)
    # Components are counted on the voxel grid, so only the spacing matters (for the volume).
    components = sitk.ConnectedComponent(sitk.GetImageFromArray(voxels.astype(np.uint8)), connectivity == "full")
    count = int(sitk.GetArrayViewFromImage(components).max())
    return count, float(voxels.sum()) * float(np.prod(reference.GetSpacing())) / 1000.0


def segment_voxels(segmentation: vtkMRMLSegmentationNode, segment_id: str, reference: vtkMRMLVolumeNode,
                   ) -> np.ndarray:
    """A segment as a (k, j, i) bool array on the reference volume's grid (for checks and exports)."""
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    scene = segmentation.GetScene()
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    scratch = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")  # the export needs a node in the scene
    try:
        if not vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, scratch, reference):
            raise SamlessError(f"could not export segment {segment_id!r}.")
        return sitk.GetArrayFromImage(volume_to_sitk(scratch)) > 0
    finally:
        remove_node(scratch)
        # The export also adds a colour table for the labelmap: a check must leave the scene as it was.
        made = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in [n for n in made if n.GetID() not in before]:
            scene.RemoveNode(node)
