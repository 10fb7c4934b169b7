"""The whole path as the module runs it: FLAIR node -> file -> `samless segment` process -> scene."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
from samless_slicer_helpers import MODULE_DIR, Scene

from conftest import rotation, synthetic_head
from samless.errors import SamlessError
from samless.package import load_package

# isort: split
from SAMLessSegmentationLib import process, results, terminology, volumes
from SAMLessSegmentationLib.job import SegmentationJob

TERMS = terminology.load_terminology(MODULE_DIR / "Resources" / terminology.TERMINOLOGY_FILE)
CPU = process.run_options("cpu", threads=1)


def run(inputs, model, options=CPU) -> SegmentationJob:
    job = SegmentationJob(inputs, model, options).start()
    assert job.wait(timeout=120), "the segmentation process did not finish"
    return job


@pytest.fixture(scope="module")
def flair_image():
    image, _ = synthetic_head(direction=rotation(0.35, 0.25))
    return image


@pytest.fixture()
def mrml(flair_image):
    scene = Scene()
    flair = scene.add_volume(flair_image, "FLAIR")
    scene.put_in_study(flair)
    return scene, flair


def lesion_points_lps(segmentation, segment_id) -> np.ndarray:
    """Physical (LPS) centres of the segment's voxels, from its own stored labelmap and geometry."""
    labelmap = segmentation.GetSegmentation().GetSegment(segment_id).GetRepresentation("Binary labelmap")
    image = volumes.oriented_image_to_sitk(labelmap)
    indices = np.argwhere(sitk.GetArrayFromImage(image) > 0)[:, ::-1]
    return np.array([image.TransformIndexToPhysicalPoint([int(i) for i in index]) for index in indices])


def test_flair_node_to_segment_matches_the_label_map_voxel_for_voxel_and_in_space(mrml, tiny_package):
    mrml, flair = mrml
    job = run([flair], tiny_package)
    outputs = job.outputs()
    files = job.process.done_event()["outputs"]
    label = sitk.ReadImage(files["label"])
    probability_file = sitk.GetArrayFromImage(sitk.ReadImage(files["probability"]))
    result = results.import_results(mrml.scene, flair, outputs, TERMS)
    job.cleanup()
    assert not job.workdir.exists()

    truth = sitk.GetArrayFromImage(label) > 0
    assert truth.sum() > 0  # random weights still call something a lesion: the comparison is not empty
    # Voxel for voxel on the FLAIR grid...
    assert np.array_equal(results.segment_voxels(result.segmentation, result.segment_id, flair), truth)
    # ... and in physical space: every stored segment voxel falls on a lesion voxel of the file.
    points = lesion_points_lps(result.segmentation, result.segment_id)
    assert len(points) == truth.sum()
    hits = [label[label.TransformPhysicalPointToIndex([float(c) for c in p])] for p in points]
    assert all(h == 1 for h in hits)

    segment = result.segmentation.GetSegmentation().GetSegment(result.segment_id)
    assert segment.GetName() == "MS lesion" and segment.GetTerminology() == TERMS.serialize()
    assert np.allclose(segment.GetColor(), TERMS.color)
    probability = sitk.GetArrayFromImage(volumes.volume_to_sitk(result.probability))
    assert np.array_equal(probability, probability_file)
    assert 0.0 <= probability.min() and probability.max() <= 1.0
    stats = outputs.statistics
    assert result.table.GetTable().GetNumberOfRows() == stats["lesion_count"] > 0
    assert results.lesion_summary(result.table) == (stats["lesion_count"], stats["total_volume_ml"])
    assert result.segmentation.GetAttribute(results.ATTR_CONNECTIVITY) == "full"  # from the model card
    study = mrml.parent_item(flair)
    assert study and all(mrml.parent_item(n) == study for n in (result.segmentation, result.probability, result.table))


def test_progress_events_arrive_in_order_and_reach_one(mrml, tiny_package):
    _, flair = mrml
    job = run([flair], tiny_package)
    events = job.process.events
    kinds = [e["event"] for e in events]
    assert kinds[0] == "model" and kinds[1] == "start" and kinds[-1] == "done"
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert job.fraction == 1.0 and job.process.error() is None
    log = job.process.log_text()  # the stages and the final message, for the panel's log pane
    assert log.index("[reading]") < log.index("[inference (axial)]") < log.index("[writing]") < log.index("done: ")
    job.cleanup()


def test_rethresholding_after_the_run_needs_no_process(mrml, tiny_package, monkeypatch):
    mrml, flair = mrml
    job = run([flair], tiny_package)
    outputs = job.outputs()
    result = results.import_results(mrml.scene, flair, outputs, TERMS)
    job.cleanup()  # the run's files are gone: only the probability volume in the scene is left
    before = results.segment_voxels(result.segmentation, result.segment_id, flair)

    def no_process(*args, **kwargs):
        raise AssertionError("re-thresholding must not start a process")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    threshold = float(np.quantile(sitk.GetArrayFromImage(outputs.probability), 0.995))
    stats = results.rethreshold(result.segmentation, threshold, 0.0)
    after = results.segment_voxels(result.segmentation, result.segment_id, flair)
    expected = results.relabel_probability(outputs.probability, threshold, 0.0).label
    assert np.array_equal(after, sitk.GetArrayFromImage(expected) > 0)
    assert 0 < after.sum() < before.sum()
    assert result.table.GetTable().GetNumberOfRows() == stats["lesion_count"]
    assert results.stored_settings(result.segmentation) == (threshold, 0.0)


def test_results_are_found_without_polling_first(mrml, tiny_package):
    """The done and error events may arrive after the GUI's last poll: reading the outcome drains them."""
    _, flair = mrml
    job = SegmentationJob([flair], tiny_package, CPU).start()
    while not job.finished:
        time.sleep(0.05)  # no poll() at all
    assert job.process.events == []
    assert job.outputs().statistics["lesion_count"] == job.process.done_event()["lesion_count"]
    job.cleanup()


def test_threshold_and_size_options_reach_the_process(mrml, tiny_package):
    _, flair = mrml
    job = run([flair], tiny_package, process.run_options("cpu", threshold=0.9, min_lesion_mm3=50.0))
    stats = job.outputs().statistics
    assert (stats["threshold"], stats["min_lesion_mm3"]) == (0.9, 50.0)
    assert all(lesion["volume_mm3"] >= 50.0 for lesion in stats["lesions"])
    job.cleanup()


def tampered_copy(package, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(package, bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    return bad


def test_a_tampered_model_is_refused_and_the_scene_is_left_as_it_was(mrml, tiny_package, tmp_path):
    mrml, flair = mrml
    bad = tampered_copy(tiny_package, tmp_path)
    with pytest.raises(SamlessError, match="sha256"):
        load_package(bad)  # what the panel checks before starting
    nodes = mrml.node_ids()
    job = run([flair], bad)  # and what the process says if it is started anyway
    with pytest.raises(process.ProcessFailed, match="sha256") as failure:
        job.outputs()
    assert "re-download" in failure.value.message
    assert mrml.node_ids() == nodes
    job.cleanup()


def test_an_unusable_volume_fails_with_the_core_message_and_changes_nothing(tiny_package):
    mrml = Scene()
    constant = sitk.Image([40, 40, 10], sitk.sitkFloat32) + 7.0
    flair = mrml.add_volume(constant)
    nodes = mrml.node_ids()
    job = run([flair], tiny_package)
    with pytest.raises(process.ProcessFailed, match="constant") as failure:
        job.outputs()
    assert "error" in failure.value.details  # stderr reaches the details
    assert mrml.node_ids() == nodes
    job.cleanup()


def test_wrong_number_of_inputs_is_reported(mrml, tiny_package):
    _, flair = mrml
    job = run([flair, flair], tiny_package)  # a FLAIR-only model given FLAIR,T1
    with pytest.raises(process.ProcessFailed, match="1 volume"):
        job.outputs()
    job.cleanup()


def test_cancel_stops_a_real_run(mrml, tiny_package):
    _, flair = mrml
    big = sitk.Expand(volumes.volume_to_sitk(flair), [3, 3, 3])  # long enough to be caught running
    job = SegmentationJob([big], tiny_package, CPU).start()
    job.cancel()
    assert job.wait(timeout=30)
    with pytest.raises(process.ProcessFailed, match="cancelled"):
        job.outputs()
    job.cleanup()
    assert not job.workdir.exists()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"  # zombies have ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cancel_kills_the_whole_process_tree():
    # A launcher (like PythonSlicer) that starts the real worker as a child and waits for it.
    launcher = ("import json, subprocess, sys, time;"
                "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
                "print(json.dumps({'event': 'start', 'child': child.pid}), flush=True);"
                "child.wait()")
    proc = process.InferenceProcess([sys.executable, "-c", launcher]).start()
    for _ in range(200):
        if proc.poll() or proc.events:
            break
        proc.wait(timeout=0.05)
    child = proc.events[0]["child"]
    assert alive(child) and proc.running
    proc.cancel()
    assert proc.wait(timeout=10)
    assert not alive(child) and not proc.running
    assert proc.error().message == "cancelled by the user."


def test_a_crash_without_an_error_event_still_reads_well():
    crash = ("import sys; print('starting');"
             "sys.stderr.write('Traceback...\\nMemoryError: out of memory\\n'); sys.exit(3)")
    proc = process.InferenceProcess([sys.executable, "-c", crash]).start()
    assert proc.wait(timeout=20)
    failure = proc.error()
    assert failure.message == "the segmentation process stopped unexpectedly (MemoryError: out of memory)."
    assert "Traceback" in failure.details
    pip = process.InferenceProcess([sys.executable, "-c", crash], label="pip").start()  # the same runner installs
    assert pip.wait(timeout=20) and pip.error().message.startswith("pip stopped unexpectedly")
    log = proc.log_text().splitlines()  # what the panel's log pane shows
    assert log[0].startswith("$ ") and sys.executable in log[0] and log[-1] == "MemoryError: out of memory"


def test_command_line(tmp_path):
    options = process.run_options("gpu", threshold=0.4, min_lesion_mm3=10, tta=True)
    command = process.segment_command("PythonSlicer", [tmp_path / "f.nrrd", tmp_path / "t1.nrrd"],
                                      tmp_path / "out.nrrd", tmp_path / "model", options)
    assert command[:5] == ["PythonSlicer", "-m", "samless", "segment", f"{tmp_path}/f.nrrd,{tmp_path}/t1.nrrd"]
    for flag in ("--prob", "--stats", "--tta", "--overwrite"):
        assert flag in command
    assert "--no-three-plane" not in command  # the model's planes, fused where it has three
    assert process.segment_command("python", ["f.nrrd"], "o.nrrd", "m", process.run_options(three_plane=False)
                                   )[-1] == "--no-three-plane"
    assert command[command.index("--progress") + 1] == "json"
    assert command[command.index("--threshold") + 1] == "0.4"
    assert command[command.index("--min-lesion-mm3") + 1] == "10.0"
    assert command[command.index("--device") + 1] in ("cuda", "mps")
    assert process.device_arguments("cpu") == ["--device", "cpu"]
    assert process.device_arguments("gpu", platform="darwin")[:2] == ["--device", "mps"]
    with pytest.raises(ValueError, match="commas"):
        process.segment_command("python", ["/a,b/f.nrrd"], "o.nrrd", "m", options)
    with pytest.raises(ValueError, match="unknown device"):
        process.device_arguments("tpu")


def test_environment_and_python(tmp_path, monkeypatch):
    env = process.process_environment({"PYTHONPATH": "/elsewhere", "HOME": "/h"}, MODULE_DIR)
    assert env["PYTHONPATH"] == f"{MODULE_DIR}{os.pathsep}/elsewhere" and env["HOME"] == "/h"
    assert env["PYTHONUNBUFFERED"] == "1"
    monkeypatch.setenv("PATH", str(tmp_path))
    assert process.python_executable() == sys.executable
    fake = tmp_path / "PythonSlicer"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert process.python_executable() == str(fake)
    # Inside the Slicer application (it has slicer.app) sys.executable is Slicer itself: say what is wrong.
    fake.unlink()
    monkeypatch.setattr(sys.modules["slicer"], "app", object(), raising=False)
    with pytest.raises(SamlessError, match="PythonSlicer.*reinstall Slicer"):
        process.python_executable()


def test_events_are_parsed_leniently():
    assert process.parse_event('{"event": "progress", "fraction": 0.5}\n') == {"event": "progress", "fraction": 0.5}
    assert process.parse_event("some warning from a library") is None
    assert process.parse_event("{not json") is None
    assert process.parse_event('{"no": "event"}') is None
