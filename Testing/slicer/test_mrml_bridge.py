"""The Qt-free MRML bridge against real MRML (slicer-core wheel), without running the network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import vtk
from samless_slicer_helpers import MODULE_DIR, Scene, add_slice_node, graded_probability, slice_centre

from conftest import rotation, synthetic_head
from samless.errors import SamlessError

# isort: split
import slicerio
from SAMLessSegmentationLib import results, terminology, volumes
from slicer import (
    vtkMRMLLinearTransformNode,
    vtkMRMLSegmentationNode,
    vtkMRMLSegmentationStorageNode,
    vtkSlicerTerminologiesModuleLogic,
    vtkSlicerTerminologyEntry,
)

TERM_FILE = MODULE_DIR / "Resources" / terminology.TERMINOLOGY_FILE


@pytest.fixture()
def head():
    """An oblique, anisotropic FLAIR-like head and its two lesions."""
    return synthetic_head(direction=rotation(0.35, 0.25))


@pytest.fixture()
def lesion_terms():
    return terminology.load_terminology(TERM_FILE)


def outputs_for(truth: sitk.Image, threshold: float = 0.5) -> results.Outputs:
    """What a run would have produced for a probability map graded by lesion (0.9 and 0.6)."""
    return results.relabel_probability(graded_probability(truth), threshold, 0.0, "test-model")


# --- volumes ------------------------------------------------------------------------------------

def test_volume_node_round_trip_keeps_voxels_and_physical_positions(head):
    image, _ = head
    node = volumes.new_scalar_volume(image, "FLAIR")
    back = volumes.volume_to_sitk(node)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert volumes.same_grid(back, image, tolerance_mm=1e-9)
    # Voxel (i, j, k) of the node sits at the LPS point of the image, in RAS.
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    for index in [(0, 0, 0), (69, 0, 0), (3, 41, 17), (69, 79, 23)]:
        ras = matrix.MultiplyPoint([*index, 1.0])[:3]
        lps = image.TransformIndexToPhysicalPoint(index)
        assert np.allclose(ras, [-lps[0], -lps[1], lps[2]], atol=1e-9)


def test_oriented_image_with_an_offset_extent_keeps_its_place(head):
    image, _ = head
    oriented = volumes.sitk_to_oriented_image(image)
    cropped = volumes.oriented_image_to_sitk(oriented)
    assert volumes.same_grid(cropped, image, tolerance_mm=1e-9)
    # A segment labelmap stores only its extent, which rarely starts at 0.
    extract = vtk.vtkExtractVOI()
    extract.SetInputData(oriented)
    extract.SetVOI(5, 30, 7, 40, 2, 20)
    extract.Update()
    part = volumes.sitk_to_oriented_image(image)
    part.ShallowCopy(extract.GetOutput())
    matrix = vtk.vtkMatrix4x4()
    oriented.GetImageToWorldMatrix(matrix)
    part.SetImageToWorldMatrix(matrix)
    sub = volumes.oriented_image_to_sitk(part)
    assert sub.GetSize() == (26, 34, 19)
    assert np.allclose(sub.GetOrigin(), image.TransformIndexToPhysicalPoint((5, 7, 2)), atol=1e-9)
    assert np.array_equal(sitk.GetArrayFromImage(sub), sitk.GetArrayFromImage(image)[2:21, 7:41, 5:31])


def test_written_file_is_read_back_identically(head, tmp_path):
    image, _ = head
    node = volumes.new_scalar_volume(image, "FLAIR")
    path = volumes.write_image(node, tmp_path / "flair.nrrd")
    back = sitk.ReadImage(str(path))
    assert volumes.same_grid(back, image, tolerance_mm=1e-9)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_multi_component_volumes_are_refused():
    data = vtk.vtkImageData()
    data.SetDimensions(4, 4, 4)
    data.AllocateScalars(vtk.VTK_FLOAT, 3)
    node = volumes.vtkMRMLScalarVolumeNode()
    node.SetAndObserveImageData(data)
    with pytest.raises(ValueError, match="3 components"):
        volumes.volume_to_sitk(node)
    with pytest.raises(SamlessError, match="3 components.*choose the scalar FLAIR"):  # shown as a plain error
        volumes.volume_to_sitk(node)


# --- terminology --------------------------------------------------------------------------------

def test_terminology_entry_is_the_one_slicer_builds_from_our_file(lesion_terms):
    logic = vtkSlicerTerminologiesModuleLogic()
    context = terminology.register_terminology(logic, TERM_FILE)
    entry = vtkSlicerTerminologyEntry()
    assert logic.FindTypeInTerminologyBy3dSlicerLabel(context, "MS lesion", entry)
    entry.SetRegionContextName(terminology.REGION_CONTEXT)
    region = entry.GetRegionObject()
    region.SetCodingSchemeDesignator("SCT")
    region.SetCodeValue("389080008")
    region.SetCodeMeaning("White Matter")
    assert logic.SerializeTerminologyEntry(entry) == lesion_terms.serialize()
    assert lesion_terms.category == ("SCT", "49755003", "Morphologically Altered Structure")
    assert lesion_terms.type == ("SCT", "32693004", "Demyelination")
    assert entry.GetTypeObject().GetRecommendedDisplayRGBValue() == (255, 165, 0)


# --- results into the scene ---------------------------------------------------------------------

class Slicer58Segment:
    """A real vtkSegment seen as Slicer 5.8 shows it: without `GetTerminology` (added in 5.10)."""

    def __init__(self, segment):
        self.GetTag = segment.GetTag
        self.GetTerminologyEntryTagName = segment.GetTerminologyEntryTagName


def test_results_make_a_coded_segment_a_probability_volume_and_a_table(head, lesion_terms):
    image, truth = head
    mrml = Scene()
    flair = mrml.add_volume(image)
    _, study = mrml.put_in_study(flair)
    outputs = outputs_for(truth)
    result = results.import_results(mrml.scene, flair, outputs, lesion_terms)

    segment = result.segmentation.GetSegmentation().GetSegment(result.segment_id)
    assert segment.GetName() == "MS lesion"
    assert np.allclose(segment.GetColor(), (1.0, 165 / 255, 0.0))
    assert terminology.segment_terminology(segment) == segment.GetTerminology() == lesion_terms.serialize()
    assert terminology.segment_terminology(Slicer58Segment(segment)) == lesion_terms.serialize()
    assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()
    # The FLAIR is the reference geometry (what DICOM SEG export needs) and the segment is the label map.
    assert result.segmentation.GetNodeReference("referenceImageGeometryRef") is flair
    voxels = results.segment_voxels(result.segmentation, result.segment_id, flair)
    assert np.array_equal(voxels, sitk.GetArrayFromImage(truth) > 0)
    # Probability volume: the map itself, on the FLAIR's grid.
    probability = volumes.volume_to_sitk(result.probability)
    assert volumes.same_grid(probability, image, tolerance_mm=1e-9)
    assert np.array_equal(sitk.GetArrayFromImage(probability), sitk.GetArrayFromImage(outputs.probability))
    # All three outputs sit in the FLAIR's study.
    for node in (result.segmentation, result.probability, result.table):
        assert mrml.parent_item(node) == study


def test_table_has_one_row_per_lesion_with_ras_centroids(head, lesion_terms):
    image, truth = head
    mrml = Scene()
    flair = mrml.add_volume(image)
    outputs = outputs_for(truth)
    table = results.import_results(mrml.scene, flair, outputs, lesion_terms).table
    lesions = outputs.statistics["lesions"]
    data = table.GetTable()
    assert data.GetNumberOfRows() == len(lesions) == 2
    assert table.GetColumnUnitLabel("Volume") == "mm3"
    assert results.lesion_summary(table) == (2, outputs.statistics["total_volume_ml"])
    truth_voxels = np.argwhere(sitk.GetArrayFromImage(truth) > 0)  # (k, j, i)
    spacing_volume = float(np.prod(image.GetSpacing()))
    assert sum(data.GetValueByName(r, "Volume").ToDouble() for r in range(2)) == pytest.approx(
        len(truth_voxels) * spacing_volume, rel=1e-4)
    for row, lesion in enumerate(lesions):
        lps = lesion["centroid_mm"]
        assert results.lesion_position(table, row) == pytest.approx([-lps[0], -lps[1], lps[2]], abs=1e-3)
        assert data.GetValueByName(row, "Max probability").ToDouble() == pytest.approx(lesion["max_probability"])
    assert table.GetLocked()


def test_rethreshold_uses_the_stored_probability_only(head, lesion_terms):
    image, truth = head
    mrml = Scene()
    flair = mrml.add_volume(image)
    result = results.import_results(mrml.scene, flair, outputs_for(truth), lesion_terms)
    before = results.segment_voxels(result.segmentation, result.segment_id, flair).sum()

    stats = results.rethreshold(result.segmentation, 0.7, 0.0)  # drops the 0.6 lesion

    after = results.segment_voxels(result.segmentation, result.segment_id, flair)
    expected = sitk.GetArrayFromImage(graded_probability(truth)) >= 0.7
    assert np.array_equal(after, expected) and 0 < after.sum() < before
    assert stats["lesion_count"] == 1 and result.table.GetTable().GetNumberOfRows() == 1
    assert results.stored_settings(result.segmentation) == (0.7, 0.0)
    # A minimum size above the remaining lesion's volume leaves nothing.
    assert results.rethreshold(result.segmentation, 0.7, 1e6)["lesion_count"] == 0
    assert results.segment_voxels(result.segmentation, result.segment_id, flair).sum() == 0


def test_rethreshold_does_not_replace_hand_edits_unless_told(head, lesion_terms):
    image, truth = head
    mrml = Scene()
    flair = mrml.add_volume(image)
    result = results.import_results(mrml.scene, flair, outputs_for(truth), lesion_terms)
    assert not results.edited_by_hand(result.segmentation)
    results.rethreshold(result.segmentation, 0.7, 0.0)  # its own writes are not edits
    assert not results.edited_by_hand(result.segmentation)
    # The radiologist paints a lesion the model missed (a real write into the segment, as an editor makes).
    painted = results.segment_voxels(result.segmentation, result.segment_id, flair)
    painted[2:4, 5:9, 5:9] = True
    edit = sitk.GetImageFromArray(painted.astype(np.uint8))
    edit.CopyInformation(image)
    results.set_segment_labelmap(result.segmentation, result.segment_id, edit)
    assert results.edited_by_hand(result.segmentation)
    with pytest.raises(results.EditedByHand, match="edited by hand"):
        results.rethreshold(result.segmentation, 0.5, 0.0)
    assert np.array_equal(results.segment_voxels(result.segmentation, result.segment_id, flair), painted)
    assert results.stored_settings(result.segmentation) == (0.7, 0.0)  # nothing changed
    # Told to, it replaces them; and then the segment is SAMLess's again.
    results.rethreshold(result.segmentation, 0.5, 0.0, replace_edits=True)
    assert not results.edited_by_hand(result.segmentation)
    assert not results.segment_voxels(result.segmentation, result.segment_id, flair)[2:4, 5:9, 5:9].all()


def test_a_second_run_does_not_replace_hand_edits_unless_told(head, lesion_terms):
    image, truth = head
    mrml = Scene()
    flair = mrml.add_volume(image)
    first = results.import_results(mrml.scene, flair, outputs_for(truth), lesion_terms)
    painted = results.segment_voxels(first.segmentation, first.segment_id, flair)
    painted[2:4, 5:9, 5:9] = True
    edit = sitk.GetImageFromArray(painted.astype(np.uint8))
    edit.CopyInformation(image)
    results.set_segment_labelmap(first.segmentation, first.segment_id, edit)
    nodes = mrml.node_ids()
    with pytest.raises(results.EditedByHand, match="the new result would replace those edits"):
        results.import_results(mrml.scene, flair, outputs_for(truth, 0.7), lesion_terms,
                               segmentation=first.segmentation)
    assert mrml.node_ids() == nodes
    assert np.array_equal(results.segment_voxels(first.segmentation, first.segment_id, flair), painted)
    results.import_results(mrml.scene, flair, outputs_for(truth, 0.7), lesion_terms,
                           segmentation=first.segmentation, replace_edits=True)
    assert not results.edited_by_hand(first.segmentation)


def test_rethreshold_keeps_the_model_connectivity(lesion_terms):
    """Two voxels touching at a corner: one lesion for 'full' connectivity, two for 'face'."""
    voxels = np.zeros((8, 8, 8), np.float32)
    voxels[2, 2, 2] = voxels[3, 3, 3] = 0.9
    probability = sitk.GetImageFromArray(voxels)
    mrml = Scene()
    flair = mrml.add_volume(probability * 100)
    outputs = results.relabel_probability(probability, 0.5, 0.0, "m", connectivity="face")
    assert outputs.statistics["lesion_count"] == 2
    result = results.import_results(mrml.scene, flair, outputs, lesion_terms)
    assert results.rethreshold(result.segmentation, 0.6, 0.0)["lesion_count"] == 2
    assert results.relabel_probability(probability, 0.6, 0.0).statistics["lesion_count"] == 1


def test_rethreshold_refuses_a_segmentation_without_a_result():
    mrml = Scene()
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(SamlessError, match="no SAMLess result"):
        results.rethreshold(segmentation, 0.5, 3.0)
    assert results.stored_settings(segmentation) is None


def test_a_second_run_updates_the_same_nodes_and_keeps_other_segments(head, lesion_terms):
    image, truth = head
    mrml = Scene()
    flair = mrml.add_volume(image)
    first = results.import_results(mrml.scene, flair, outputs_for(truth), lesion_terms)
    other = first.segmentation.GetSegmentation().AddEmptySegment("", "my notes")
    nodes = mrml.node_ids()
    second = results.import_results(mrml.scene, flair, outputs_for(truth, 0.7), lesion_terms,
                                    segmentation=first.segmentation)
    assert mrml.node_ids() == nodes
    assert (second.probability, second.table) == (first.probability, first.table)
    assert second.segmentation.GetSegmentation().GetSegment(other) is not None
    assert second.table.GetTable().GetNumberOfRows() == 1


def test_mismatched_results_leave_the_scene_unchanged(head, lesion_terms):
    image, truth = head
    mrml = Scene()
    flair = mrml.add_volume(image)
    nodes = mrml.node_ids()
    shifted = outputs_for(truth)
    shifted.label.SetOrigin([o + 5.0 for o in shifted.label.GetOrigin()])
    with pytest.raises(SamlessError, match="does not match the grid"):
        results.import_results(mrml.scene, flair, shifted, lesion_terms)
    assert mrml.node_ids() == nodes


def test_a_failure_half_way_removes_what_was_added(head, lesion_terms, monkeypatch):
    image, truth = head
    mrml = Scene()
    flair = mrml.add_volume(image)
    nodes = mrml.node_ids()

    def broken_table(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(results, "fill_table", broken_table)
    with pytest.raises(RuntimeError, match="disk full"):
        results.import_results(mrml.scene, flair, outputs_for(truth), lesion_terms)
    assert mrml.node_ids() == nodes


def test_jump_to_lesion_centres_the_slice_views_in_world_coordinates(head, lesion_terms):
    image, truth = head
    mrml = Scene()
    flair = mrml.add_volume(image)
    # The FLAIR sits under a registration transform: the views must follow it.
    transform = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 10.0)
    matrix.SetElement(2, 3, -4.0)
    vtkMRMLLinearTransformNode.SafeDownCast(transform).SetMatrixTransformToParent(matrix)
    flair.SetAndObserveTransformNodeID(transform.GetID())
    result = results.import_results(mrml.scene, flair, outputs_for(truth), lesion_terms)
    assert result.segmentation.GetTransformNodeID() == transform.GetID()
    red, yellow = add_slice_node(mrml.scene, "Red"), add_slice_node(mrml.scene, "Yellow")
    for row in range(2):
        local = results.lesion_position(result.table, row)
        world = results.jump_to_lesion(result.segmentation, row)
        assert world == pytest.approx([local[0] + 10.0, local[1], local[2] - 4.0])
        for node in (red, yellow):
            assert slice_centre(node) == pytest.approx(world, abs=1e-6)


def test_saved_segmentation_is_read_correctly_by_slicerio(head, lesion_terms, tmp_path):
    image, truth = head
    mrml = Scene()
    flair = mrml.add_volume(image)
    result = results.import_results(mrml.scene, flair, outputs_for(truth), lesion_terms)
    storage = vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(tmp_path / "lesions.seg.nrrd"))
    assert storage.WriteData(result.segmentation)

    segmentation = slicerio.read_segmentation(str(tmp_path / "lesions.seg.nrrd"))
    (segment,) = segmentation["segments"]
    assert segment["name"] == "MS lesion"
    assert segment["terminology"]["type"] == ["SCT", "32693004", "Demyelination"]
    assert segment["terminology"]["category"] == ["SCT", "49755003", "Morphologically Altered Structure"]
    assert segment["terminology"]["anatomicRegion"] == ["SCT", "389080008", "White Matter"]
    assert segment["color"] == pytest.approx([1.0, 165 / 255, 0.0], abs=1e-3)
    # Voxels: slicerio gives (i, j, k) from the stored extent; place them on the FLAIR grid.
    voxels = segmentation["voxels"]
    offset = segmentation["referenceImageExtentOffset"]
    on_grid = np.zeros(image.GetSize(), bool)
    i, j, k = offset
    on_grid[i:i + voxels.shape[0], j:j + voxels.shape[1], k:k + voxels.shape[2]] = voxels == segment["labelValue"]
    assert np.array_equal(on_grid.transpose(2, 1, 0), sitk.GetArrayFromImage(truth) > 0)
    # Geometry: the stored IJK-to-LPS matrix is the FLAIR's.
    expected = np.eye(4)
    expected[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    expected[:3, 3] = image.GetOrigin()
    assert np.allclose(segmentation["ijkToLPS"], expected, atol=1e-6)


def test_segment_editor_write_honours_masking_and_undo(head):
    """What the effect does (saveStateForUndo, then modify the selected segment), on the real editor logic."""
    from slicer import vtkSlicerSegmentEditorLogic

    image, truth = head
    mrml = Scene()
    flair = mrml.add_volume(image)
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(flair)
    editor_node = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor_node.SetAndObserveSegmentationNode(segmentation)
    editor = vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(mrml.scene)
    editor.SetSegmentEditorNode(editor_node)
    editor.SetSourceVolumeNode(flair)
    # The user's own segment "brain": the editable area is inside it (only the lower half of the head).
    brain = segmentation.GetSegmentation().AddEmptySegment("brain", "brain")
    half = np.zeros(sitk.GetArrayFromImage(truth).shape, np.uint8)
    half[:12] = 1
    brain_image = sitk.GetImageFromArray(half)
    brain_image.CopyInformation(image)
    results.set_segment_labelmap(segmentation, brain, brain_image)
    target = segmentation.GetSegmentation().AddEmptySegment("target", "Segment_1")
    editor_node.SetSelectedSegmentID(target)
    editor_node.SetMaskMode(vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor_node.SetMaskSegmentID(brain)

    assert editor.SaveStateForUndo()
    labelmap = volumes.sitk_to_oriented_image(truth)
    editor.ModifySegmentByLabelmap(segmentation, target, labelmap, vtkSlicerSegmentEditorLogic.ModificationModeSet,
                                   True, False)
    written = results.segment_voxels(segmentation, target, flair)
    expected = (sitk.GetArrayFromImage(truth) > 0) & (half > 0)
    assert expected.sum() > 0 and np.array_equal(written, expected)
    # What the effect reports: the lesions the segment holds after masking, not the model's.
    from scipy import ndimage

    count, ml = results.segment_lesion_summary(segmentation, target, flair)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    assert count == ndimage.label(expected, np.ones((3, 3, 3)))[1] < ndimage.label(sitk.GetArrayFromImage(truth))[1]
    assert ml == pytest.approx(expected.sum() * voxel_ml)
    editor.Undo()
    assert results.segment_voxels(segmentation, target, flair).sum() == 0


def test_terminology_file_is_valid_json_with_one_lesion_type():
    data = json.loads(TERM_FILE.read_text(encoding="utf-8"))
    types = [t for c in data["SegmentationCodes"]["Category"] for t in c["Type"]]
    assert [t["3dSlicerLabel"] for t in types] == ["MS lesion"]


def test_show_3d_builds_surfaces_from_the_voxels_and_hides_them(head):
    image, mask = head
    mrml = Scene()
    flair = mrml.add_volume(image)
    result = results.import_results(mrml.scene, flair, outputs_for(mask), terminology.load_terminology(TERM_FILE))
    seg = result.segmentation
    assert not results.shown_in_3d(seg)  # voxels only, until asked
    assert results.show_3d(seg) and seg.GetDisplayNode().GetVisibility3D() and results.shown_in_3d(seg)
    surface = seg.GetClosedSurfaceInternalRepresentation(results.SEGMENT_ID)
    assert surface.GetNumberOfPoints() > 100
    bounds = np.array(surface.GetBounds()).reshape(3, 2)  # RAS: the lesions' extent
    voxels = np.argwhere(sitk.GetArrayFromImage(mask))[:, ::-1]
    lps = np.array([image.TransformIndexToPhysicalPoint([int(i) for i in idx]) for idx in voxels])
    lesion_ras = lps * [-1, -1, 1]
    assert np.all(bounds[:, 0] <= lesion_ras.min(0) + 1.5) and np.all(bounds[:, 1] >= lesion_ras.max(0) - 1.5)
    assert results.show_3d(seg, False) and not seg.GetDisplayNode().GetVisibility3D()
    assert not results.shown_in_3d(seg)
