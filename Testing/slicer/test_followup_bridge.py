"""The module's follow-up below the Qt layer, against real MRML (slicer-core): change segments with their
terminology, the registered baseline for flicking, the change table and jumping to a lesion, and a real
`samless followup` process run from volume nodes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from samless_slicer_helpers import MODULE_DIR, Scene, add_slice_node, slice_centre

from conftest import rotation, sample_change_pair, synthetic_head
from samless.errors import SamlessError
from samless.followup import ENLARGING, NEW, STABLE
from samless.package import resolve_model

# isort: split
import slicerio
from SAMLessSegmentationLib import change, process, results, terminology, volumes
from SAMLessSegmentationLib.job import FollowupJob
from slicer import (
    vtkMRMLSegmentationStorageNode,
    vtkMRMLSliceCompositeNode,
    vtkSlicerTerminologiesModuleLogic,
    vtkSlicerTerminologyEntry,
)

TERM_FILE = MODULE_DIR / "Resources" / terminology.TERMINOLOGY_FILE
TERMS = {label: terminology.load_terminology(TERM_FILE, label) for _, _, label in change.CHANGE_SEGMENTS}
CPU = process.run_options("cpu", threads=1)


@pytest.fixture(scope="module")
def demo_model():
    return resolve_model(None)  # the bundled default model


@pytest.fixture()
def pair():
    """A follow-up head with three lesions, a change map classing them, and a stand-in registered baseline."""
    lesions = (((0, 5, 0), 6.0), ((-12, -10, 6), 4.0), ((12, -12, -6), 4.0))
    image, mask = synthetic_head(direction=rotation(0.35, 0.25), lesions=lesions)
    parts = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(mask, True), sortByObjectSize=True))
    label = np.zeros(parts.shape, np.uint8)
    label[parts == 1], label[parts == 2], label[parts == 3] = STABLE, NEW, ENLARGING
    change_map = sitk.GetImageFromArray(label)
    change_map.CopyInformation(image)
    centroids = {k: image.TransformContinuousIndexToPhysicalPoint(np.argwhere(parts == k).mean(0)[::-1].tolist())
                 for k in (1, 2, 3)}
    rows = [{"id": 1, "timepoint": "followup", "class": "stable", "volume_baseline_mm3": 900.0,
             "volume_followup_mm3": 905.0, "change_mm3": 5.0, "evidence_mm3": 3.0, "centroid_mm": list(centroids[1])},
            {"id": 2, "timepoint": "followup", "class": "new", "volume_baseline_mm3": 0.0,
             "volume_followup_mm3": 260.0, "change_mm3": 260.0, "evidence_mm3": 240.0,
             "centroid_mm": list(centroids[2])},
            {"id": 3, "timepoint": "followup", "class": "enlarging", "volume_baseline_mm3": 80.0,
             "volume_followup_mm3": 260.0, "change_mm3": 180.0, "evidence_mm3": 150.0,
             "centroid_mm": list(centroids[3])},
            {"id": 1, "timepoint": "baseline", "class": "disappeared", "volume_baseline_mm3": 40.0,
             "volume_followup_mm3": 0.0, "change_mm3": -40.0, "centroid_mm": [1.0, 2.0, 3.0]}]
    summary = {"new_lesions": 1, "enlarging_lesions": 1, "stable_lesions": 1, "disappeared_lesions": 1,
               "volume_baseline_ml": 1.02, "volume_followup_ml": 1.43, "volume_change_ml": 0.41}
    report = {"summary": summary, "registration": {"correlation": 0.97}, "warnings": [], "lesions": rows}
    outputs = change.ChangeOutputs(label=change_map, baseline_registered=sitk.Cast(image * 0.9, sitk.sitkFloat32),
                                   report=report)
    return image, outputs, centroids


def test_change_terminology_is_what_slicer_finds_for_each_label():
    logic = vtkSlicerTerminologiesModuleLogic()
    context = terminology.register_terminology(logic, TERM_FILE)
    codes = {"New MS lesion": "7147002", "Enlarging MS lesion": "35105006", "Stable MS lesion": "58158008"}
    for label, code in codes.items():
        entry = vtkSlicerTerminologyEntry()
        assert logic.FindTypeInTerminologyBy3dSlicerLabel(context, label, entry), label
        assert entry.GetTypeModifierObject().GetCodeValue() == code
        assert entry.GetTypeObject().GetCodeMeaning() == "Demyelination"
        entry.SetRegionContextName(terminology.REGION_CONTEXT)
        region = entry.GetRegionObject()
        region.SetCodingSchemeDesignator("SCT")
        region.SetCodeValue("389080008")
        region.SetCodeMeaning("White Matter")
        assert logic.SerializeTerminologyEntry(entry) == TERMS[label].serialize()
        rgb = entry.GetTypeModifierObject().GetRecommendedDisplayRGBValue()
        assert tuple(c / 255 for c in rgb) == pytest.approx(TERMS[label].color)
    # the plain lesion entry is unchanged by the modifiers beside it
    assert terminology.load_terminology(TERM_FILE).modifier == ("", "", "")
    with pytest.raises(ValueError, match="no terminology type or modifier"):
        terminology.load_terminology(TERM_FILE, "Shrinking MS lesion")


def test_import_change_builds_segments_table_and_registered_baseline(pair, tmp_path):
    image, outputs, centroids = pair
    mrml = Scene()
    followup = mrml.add_volume(image, "FLAIR 2024")
    _, study = mrml.put_in_study(followup)
    result = change.import_change(mrml.scene, followup, "FLAIR 2023", outputs, TERMS)
    seg = result.segmentation
    assert seg.GetName() == "FLAIR 2024 lesion change"
    label = sitk.GetArrayFromImage(outputs.label)
    for value, segment_id, term_label in change.CHANGE_SEGMENTS:
        segment = seg.GetSegmentation().GetSegment(segment_id)
        assert segment.GetName() == term_label
        assert terminology.segment_terminology(segment) == TERMS[term_label].serialize()
        voxels = results.segment_voxels(seg, segment_id, followup)
        assert np.array_equal(voxels, label == value), term_label
    # the registered baseline on the follow-up grid, referenced from the segmentation
    moved = seg.GetNodeReference(change.BASELINE_REFERENCE)
    assert moved is result.baseline_registered and moved.GetName() == "FLAIR 2023 registered to FLAIR 2024"
    assert volumes.same_grid(volumes.volume_to_sitk(moved), image)
    for node in (seg, moved, result.table):
        assert mrml.parent_item(node) == study
    # the table: changes first, RAS centroids, and what the panel shows
    table = result.table.GetTable()
    assert [table.GetColumnByName("Class").GetValue(r) for r in range(table.GetNumberOfRows())] == [
        "new", "enlarging", "stable", "disappeared"]
    assert [table.GetColumnByName("Brighter").GetValue(r) for r in range(4)] == [240.0, 150.0, 3.0, 0.0]
    assert result.table.GetColumnUnitLabel("Change") == "mm3"
    assert change.change_report(seg)["summary"]["new_lesions"] == 1 and result.summary["volume_change_ml"] == 0.41
    assert change.change_report(mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")) is None
    # jump to the new lesion (row 0): every slice view centred on its centroid, in RAS
    red = add_slice_node(mrml.scene)
    assert change.change_row(result.table, 1, "baseline") == 3 and change.change_row(result.table, 2, "followup") == 0
    with pytest.raises(IndexError):
        change.change_row(result.table, 9, "followup")
    world = results.jump_to_lesion(seg, change.change_row(result.table, 2, "followup"))
    lps = centroids[2]
    assert world == pytest.approx([-lps[0], -lps[1], lps[2]], abs=1e-6)
    assert slice_centre(red) == pytest.approx(world, abs=1e-6)
    # saved as .seg.nrrd and read back by an independent reader: three named segments
    path = tmp_path / "change.seg.nrrd"
    storage = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    assert isinstance(storage, vtkMRMLSegmentationStorageNode)
    storage.SetFileName(str(path))
    assert storage.WriteData(seg)
    names = sorted(s["name"] for s in slicerio.read_segmentation(str(path), skip_voxels=True)["segments"])
    assert names == ["Enlarging MS lesion", "New MS lesion", "Stable MS lesion"]


def test_flicking_between_the_timepoints(pair):
    image, outputs, _ = pair
    mrml = Scene()
    followup = mrml.add_volume(image, "FLAIR 2024")
    assert change.flick(mrml.scene) == 0.0  # no views: nothing to do
    views = [mrml.scene.AddNode(vtkMRMLSliceCompositeNode()) for _ in range(3)]
    result = change.import_change(mrml.scene, followup, "FLAIR 2023", outputs, TERMS)
    assert change.show_for_flicking(mrml.scene, followup, result.baseline_registered) == 3
    for view in views:
        assert view.GetBackgroundVolumeID() == followup.GetID()
        assert view.GetForegroundVolumeID() == result.baseline_registered.GetID()
        assert view.GetForegroundOpacity() == 0.0
    assert change.flick(mrml.scene) == 1.0 and all(v.GetForegroundOpacity() == 1.0 for v in views)
    assert change.flick(mrml.scene) == 0.0 and all(v.GetForegroundOpacity() == 0.0 for v in views)


def test_a_result_for_another_grid_changes_nothing(pair):
    image, outputs, _ = pair
    mrml = Scene()
    other = mrml.add_volume(sitk.Resample(image, [35, 40, 12], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                                          [2 * s for s in image.GetSpacing()], image.GetDirection()), "other")
    before = mrml.node_ids()
    with pytest.raises(SamlessError, match="does not match the grid"):
        change.import_change(mrml.scene, other, "FLAIR 2023", outputs, TERMS)
    assert mrml.node_ids() == before
    # a failure half-way removes what was made
    broken = change.ChangeOutputs(outputs.label, outputs.baseline_registered, {**outputs.report, "lesions": [{}]})
    followup = mrml.add_volume(image, "FLAIR 2024")
    before = mrml.node_ids()
    with pytest.raises(KeyError):
        change.import_change(mrml.scene, followup, "FLAIR 2023", broken, TERMS)
    assert mrml.node_ids() == before


def test_unreadable_or_foreign_outputs_are_refused(pair, tmp_path):
    image, outputs, _ = pair
    paths = {"change": tmp_path / "change.nii.gz", "baseline_registered": tmp_path / "b.nii.gz",
             "json": tmp_path / "change.json"}
    sitk.WriteImage(outputs.label, str(paths["change"]))
    sitk.WriteImage(outputs.baseline_registered, str(paths["baseline_registered"]))
    paths["json"].write_text(json.dumps(outputs.report))
    assert change.read_change_outputs(paths).report["summary"]["new_lesions"] == 1
    paths["json"].write_text(json.dumps({"summary": {}}))
    with pytest.raises(SamlessError, match="not a follow-up report"):
        change.read_change_outputs(paths)
    paths["json"].write_text("{")
    with pytest.raises(SamlessError, match="could not be read"):
        change.read_change_outputs(paths)
    sitk.WriteImage(image[::2, :, :], str(paths["baseline_registered"]))
    paths["json"].write_text(json.dumps(outputs.report))
    with pytest.raises(SamlessError, match="different grids"):
        change.read_change_outputs(paths)


def test_command_line_of_the_followup(tmp_path):
    options = process.run_options("cpu", threshold=0.3, min_lesion_mm3=5.0, tta=True, threads=2)
    command = process.followup_command("PythonSlicer", tmp_path / "b.nrrd", tmp_path / "f.nrrd", tmp_path / "out",
                                       "model.zip", options)
    assert command[:5] == ["PythonSlicer", "-m", "samless", "followup", str(tmp_path / "b.nrrd")]
    for flag, value in (("-o", str(tmp_path / "out")), ("--model", "model.zip"), ("--threshold", "0.3"),
                        ("--min-lesion-mm3", "5.0"), ("--threads", "2"), ("--device", "cpu"),
                        ("--progress", "json")):
        assert command[command.index(flag) + 1] == value
    assert "--tta" in command and "--overwrite" in command  # the job's own fresh folder
    assert "--allow-poor-registration" not in command
    assert "--allow-poor-registration" in process.followup_command("p", "b", "f", "o", "m", options, True)
    with pytest.raises(ValueError, match="baseline and a follow-up"):
        FollowupJob([image_of(1)], "model.zip", CPU)._command([tmp_path / "a.nrrd"])


def image_of(value: float) -> sitk.Image:
    image = sitk.Image([8, 8, 8], sitk.sitkFloat32) + value
    return image


def test_followup_job_runs_the_real_process_from_volume_nodes(demo_model):
    """The sample with a lesion painted out of its moved baseline: the bundled model runs in a real
    `samless followup` process from two volume nodes, and the lesion comes back into the scene as new."""
    base_image, follow_image, centre = sample_change_pair()
    mrml = Scene()
    baseline = mrml.add_volume(base_image, "baseline")
    followup = mrml.add_volume(follow_image, "followup")
    job = FollowupJob([baseline, followup], demo_model, process.run_options("cpu", threads=2)).start()
    try:
        assert job.wait(timeout=300), "the follow-up process did not finish"
        assert job.fraction == 1.0
        outputs = job.outputs()
    finally:
        job.cleanup()
    assert not job.workdir.exists()
    result = change.import_change(mrml.scene, followup, baseline.GetName(), outputs, TERMS)
    assert result.summary["new_lesions"] == 1 and result.warnings == []
    assert change.change_report(result.segmentation)["registration"]["correlation"] > 0.95
    label = sitk.GetArrayFromImage(outputs.label)
    for value, segment_id, _ in change.CHANGE_SEGMENTS:
        voxels = results.segment_voxels(result.segmentation, segment_id, followup)
        assert np.array_equal(voxels, label == value)
    assert results.segment_voxels(result.segmentation, "MSLesionNew", followup)[centre]
    table = result.table.GetTable()
    assert table.GetColumnByName("Class").GetValue(0) == "new"


def test_a_refused_pair_fails_with_the_core_message(demo_model):
    head, _ = synthetic_head(size=(60, 60, 30), spacing=(1.0, 1.0, 2.0))
    arr = sitk.GetArrayFromImage(head)
    noise = sitk.GetImageFromArray(np.random.default_rng(3).permutation(arr.ravel()).reshape(arr.shape))
    noise.CopyInformation(head)
    job = FollowupJob([noise, head], demo_model, CPU).start()
    try:
        assert job.wait(timeout=300)
        with pytest.raises(process.ProcessFailed) as failure:
            job.outputs()
    finally:
        job.cleanup()
    assert "different patients" in failure.value.message
    # the panel's "compare even if the registration looks failed": a result, with the warning
    job = FollowupJob([noise, head], demo_model, CPU, allow_poor_registration=True).start()
    try:
        assert job.wait(timeout=300)
        outputs = job.outputs()
    finally:
        job.cleanup()
    assert outputs.report["warnings"] and "do not trust" in outputs.report["warnings"][0]
