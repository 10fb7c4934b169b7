"""The volume pipeline: geometry, lesions in the right place, backends agreeing, options."""

from __future__ import annotations

import dataclasses
import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import IntensityBackend, dice, rotation, synthetic_head
from samless import pipeline
from samless.errors import SamlessError
from samless.imageio import write_image
from samless.inference import SliceInferer, window_starts
from samless.package import PLANES, load_package
from samless.pipeline import Segmenter, SegmentOptions, relabel
from samless.preprocess import canonical_grid, from_slices, to_slices, with_context

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def intensity_segmenter(tiny_package) -> Segmenter:
    return Segmenter(load_package(tiny_package).card, IntensityBackend())


def three_planes(segmenter: Segmenter) -> None:
    """Make the segmenter's model a three-plane one (its card says so; the network is the same)."""
    card = segmenter.card
    segmenter.card = card.replace(inputs=dataclasses.replace(card.inputs, planes=PLANES))


def assert_same_grid(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def test_lesions_found_in_physical_place_on_oblique_anisotropic_volume(tiny_package, head):
    _, image, truth = head
    result = intensity_segmenter(tiny_package).segment([image], SegmentOptions(min_lesion_mm3=0))
    assert_same_grid(result.label, image)
    assert_same_grid(result.probability, image)
    found = sitk.GetArrayFromImage(result.label)
    assert dice(found, sitk.GetArrayFromImage(truth)) > 0.85
    assert result.statistics["lesion_count"] == 2
    # Centroids are physical (LPS) points: the big lesion sits 5 mm along y from the head centre.
    big = result.statistics["lesions"][0]
    truth_stats = sitk.LabelShapeStatisticsImageFilter()
    truth_stats.Execute(sitk.ConnectedComponent(truth))
    truth_centroids = [truth_stats.GetCentroid(label) for label in truth_stats.GetLabels()]
    assert min(math.dist(big["centroid_mm"], c) for c in truth_centroids) < 1.5
    truth_ml = sitk.GetArrayFromImage(truth).sum() * math.prod(image.GetSpacing()) / 1000
    assert result.statistics["total_volume_ml"] == pytest.approx(truth_ml, rel=0.15)


def test_label_map_read_back_by_simpleitk_and_nibabel(tiny_package, head, tmp_path):
    path, image, _ = head
    result = Segmenter.from_package(load_package(tiny_package), backend="onnx").segment([image])
    out = tmp_path / "label.nii.gz"
    write_image(result.label, out)

    back = sitk.ReadImage(str(out))
    assert back.GetPixelID() == sitk.sitkUInt8
    assert_same_grid(back, sitk.ReadImage(str(path)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(result.label))

    nii = nib.load(str(out))
    assert nii.shape == image.GetSize()
    d = np.array(image.GetDirection()).reshape(3, 3)
    expected = np.eye(4)
    expected[:3, :3] = LPS_TO_RAS @ d @ np.diag(image.GetSpacing())
    expected[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin())
    np.testing.assert_allclose(nii.affine, expected, atol=1e-4)
    np.testing.assert_allclose(nib.load(str(path)).affine, nii.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(nii.dataobj).transpose(2, 1, 0), sitk.GetArrayFromImage(result.label))


def test_torch_and_onnx_backends_agree(tiny_package, head):
    _, image, _ = head
    package = load_package(tiny_package)
    by_torch = Segmenter.from_package(package, backend="torch", device="cpu").segment([image])
    by_onnx = Segmenter.from_package(package, backend="onnx").segment([image])
    p_torch = sitk.GetArrayFromImage(by_torch.probability)
    p_onnx = sitk.GetArrayFromImage(by_onnx.probability)
    assert p_torch.std() > 0  # a real, non-constant prediction
    np.testing.assert_allclose(p_torch, p_onnx, atol=1e-4)
    disagree = (sitk.GetArrayFromImage(by_torch.label) != sitk.GetArrayFromImage(by_onnx.label)).mean()
    assert disagree < 1e-4


def test_thick_slices_and_large_field_of_view_are_tiled(tiny_package):
    # 150 mm across at the model's 1 mm is 150 px: more than the 64 px window, so windows are tiled.
    image, truth = synthetic_head(size=(150, 140, 12), spacing=(1.0, 1.0, 5.0), origin=(-75, -70, -30),
                                  head_radii=(70.0, 65.0, 40.0), lesions=(((45, 0, 0), 8.0), ((-45, 20, 0), 8.0)))
    result = intensity_segmenter(tiny_package).segment([image], SegmentOptions(min_lesion_mm3=0))
    assert_same_grid(result.label, image)
    assert result.statistics["lesion_count"] == 2
    assert dice(sitk.GetArrayFromImage(result.label), sitk.GetArrayFromImage(truth)) > 0.85


def test_windows_cover_extent():
    assert window_starts(10, 50, 64) == [-2]
    starts = window_starts(0, 150, 64)
    assert starts[0] == 0 and starts[-1] == 150 - 64
    assert all(b - a <= 48 for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_slicing_round_trip(plane):
    volume = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    assert np.array_equal(from_slices(to_slices(volume, plane), plane), volume)


def test_context_slices_are_the_neighbours_modality_major_with_edges_repeated():
    slices = np.arange(2 * 5).reshape(2, 5, 1, 1) * np.ones((1, 1, 3, 4))  # value = modality * 5 + slice
    assert np.array_equal(with_context(slices, 2, 0), slices[:, 2])
    assert [int(v) for v in with_context(slices, 2, 1)[:, 0, 0]] == [1, 2, 3, 6, 7, 8]
    assert [int(v) for v in with_context(slices, 0, 2)[:, 0, 0]] == [0, 0, 0, 1, 2, 5, 5, 5, 6, 7]
    assert [int(v) for v in with_context(slices, 4, 1)[:, 0, 0]] == [3, 4, 4, 8, 9, 9]


class RecordingBackend:
    """Returns the centre channel and keeps every batch, to see what the network would be given."""

    name, device = "recording", "cpu"

    def __init__(self):
        self.batches = []

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.copy())
        return np.clip(batch[:, batch.shape[1] // 2], 0, 1).astype(np.float32)


def test_inference_gives_each_slice_its_neighbours(tiny_package):
    # Axial slice k of the volume holds the value k (a constant "head" so every slice is processed).
    volume = np.broadcast_to(np.arange(1, 7, dtype=np.float32)[:, None, None], (6, 40, 40)) / 10
    backend = RecordingBackend()
    prob = SliceInferer(64, batch_size=4, context=1)(volume[None], np.ones(volume.shape, bool), backend, ["axial"])
    batch = np.concatenate(backend.batches)
    assert batch.shape == (6, 3, 64, 64)
    centre = batch[:, :, 32, 32] * 10  # inside the head window
    expected = [[max(k - 1, 1), k, min(k + 1, 6)] for k in range(1, 7)]
    np.testing.assert_allclose(centre, expected, atol=1e-5)
    np.testing.assert_allclose(prob, volume, atol=1e-6)  # the centre slice comes back in its place


def test_canonical_grid_covers_the_input_field_of_view():
    image, _ = synthetic_head(direction=rotation(0.2, 2.0))
    grid = canonical_grid(image, "LPS", [1.5, 1.5], "axial")
    np.testing.assert_allclose(np.abs(np.array(grid.GetDirection()).reshape(3, 3)).max(0), 1, atol=0.25)
    assert grid.GetSpacing()[:2] == (1.5, 1.5)
    # The slicing axis keeps the acquired 3 mm slices.
    assert grid.GetSpacing()[2] == pytest.approx(3.0)


def test_relabel_changes_lesions_without_the_network(tiny_package, head):
    _, image, _ = head
    segmenter = intensity_segmenter(tiny_package)
    result = segmenter.segment([image], SegmentOptions(min_lesion_mm3=0))
    calls = segmenter.backend.calls
    strict = relabel(result.probability, segmenter.card.postprocessing,
                     SegmentOptions(threshold=0.5, min_lesion_mm3=500))
    assert segmenter.backend.calls == calls
    assert strict.statistics["lesion_count"] == 1  # the 4 mm lesion (~268 mm^3) is dropped, 6 mm (~905) stays
    assert strict.statistics["min_lesion_mm3"] == 500
    with pytest.raises(SamlessError, match="threshold"):
        relabel(result.probability, segmenter.card.postprocessing, SegmentOptions(threshold=1.5))


def test_tta_and_three_plane(tiny_package, head):
    _, image, truth = head
    segmenter = intensity_segmenter(tiny_package)
    plain = segmenter.segment([image])
    calls = segmenter.backend.calls
    flipped = segmenter.segment([image], SegmentOptions(tta=True))
    assert segmenter.backend.calls - calls == 2 * calls  # every batch twice
    assert dice(sitk.GetArrayFromImage(flipped.label), sitk.GetArrayFromImage(plain.label)) > 0.9
    with pytest.raises(SamlessError, match="three-plane"):
        segmenter.segment([image], SegmentOptions(three_plane=True))
    three_planes(segmenter)
    calls = segmenter.backend.calls
    fused = segmenter.segment([image], SegmentOptions(three_plane=True, min_lesion_mm3=0))
    assert dice(sitk.GetArrayFromImage(fused.label), sitk.GetArrayFromImage(truth)) > 0.8
    fused_calls, calls = segmenter.backend.calls - calls, segmenter.backend.calls
    # A three-plane model fuses by default; three_plane=False runs its axial slices only.
    by_default = segmenter.segment([image], SegmentOptions(min_lesion_mm3=0))
    assert segmenter.backend.calls - calls == fused_calls
    np.testing.assert_array_equal(sitk.GetArrayFromImage(by_default.probability),
                                  sitk.GetArrayFromImage(fused.probability))
    calls = segmenter.backend.calls
    segmenter.segment([image], SegmentOptions(three_plane=False))
    assert 0 < segmenter.backend.calls - calls < fused_calls


def test_a_three_plane_model_reads_isotropic_volumes_and_reports_one_climb(tiny_package, head, monkeypatch):
    _, image, _ = head  # 3 mm slices
    segmenter = intensity_segmenter(tiny_package)
    grids = []
    real_prepare = pipeline.prepare

    def recording_prepare(*args, **kwargs):
        prepared = real_prepare(*args, **kwargs)
        grids.append(prepared.grid.GetSpacing())
        return prepared

    monkeypatch.setattr(pipeline, "prepare", recording_prepare)
    segmenter.segment([image])
    assert grids[-1][2] == pytest.approx(3.0)  # an axial model keeps the acquired slices
    three_planes(segmenter)
    events = []
    for fuse in (True, False):  # fused or not, it sees the grid it learnt on
        segmenter.segment([image], SegmentOptions(three_plane=fuse),
                          progress=lambda stage, done, total, f=fuse: events.append((f, stage, done, total)))
        assert grids[-1] == pytest.approx((1.0, 1.0, 1.0))
    fused = [e for e in events if e[0]]
    assert {stage for _, stage, _, _ in fused} == {f"inference ({p})" for p in ("axial", "coronal", "sagittal")}
    done = [d for _, _, d, _ in fused]
    assert done == sorted(done) and len({t for *_, t in fused}) == 1 and done[-1] == fused[-1][3]
