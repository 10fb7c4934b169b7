"""DICOM and multi-modal inputs, backend/device choice, and the torch-free ONNX path."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import IntensityBackend, dice, rotation, synthetic_head
from samless.backends import OnnxBackend, TorchBackend, create_backend, pick_torch_device
from samless.card import Inputs, ModelCard
from samless.cli import main
from samless.errors import SamlessError
from samless.imageio import read_image
from samless.modeling import NetConfig, build_model
from samless.package import load_package
from samless.package_write import save_package
from samless.pipeline import Segmenter, load_inputs


def write_dicom_series(image: sitk.Image, folder) -> None:
    """Write `image` as a DICOM series (one file per slice, int16), as a scanner would."""
    folder.mkdir()
    image = sitk.Cast(sitk.RescaleIntensity(image, 0, 2000), sitk.sitkInt16)
    direction = image.GetDirection()
    series_uid = "1.2.826.0.1.3680043.2.1125.1"
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        tags = {
            "0008|0060": "MR", "0020|000e": series_uid, "0020|000d": series_uid + ".0",
            "0020|0013": str(k + 1), "0028|0030": "\\".join(str(s) for s in image.GetSpacing()[:2]),
            "0018|0050": str(image.GetSpacing()[2]),
            "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "\\".join(str(v) for v in (direction[0], direction[3], direction[6],
                                                    direction[1], direction[4], direction[7])),
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)


def test_dicom_series_folder_is_segmented_on_its_own_grid(tiny_package, tmp_path):
    image, truth = synthetic_head(direction=rotation(0.2, 0.1))
    write_dicom_series(image, tmp_path / "dicom")
    series = read_image(tmp_path / "dicom")
    np.testing.assert_allclose(series.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(series.GetDirection(), image.GetDirection(), atol=1e-4)
    segmenter = Segmenter(load_package(tiny_package).card, IntensityBackend())
    result = segmenter.segment(load_inputs([tmp_path / "dicom"], ["FLAIR"]))
    assert result.label.GetSize() == series.GetSize()
    assert dice(sitk.GetArrayFromImage(result.label), sitk.GetArrayFromImage(truth)) > 0.8

    out = tmp_path / "dicom_lesions.nii.gz"
    assert main(["segment", str(tmp_path / "dicom"), "-o", str(out), "--model", str(tiny_package),
                 "--progress", "none"]) == 0
    np.testing.assert_allclose(sitk.ReadImage(str(out)).GetOrigin(), series.GetOrigin(), atol=1e-4)


def test_folder_with_two_series_asks_for_one(tmp_path):
    image = synthetic_head()[0]
    write_dicom_series(image, tmp_path / "a")
    other = tmp_path / "a" / "other.dcm"
    second = sitk.Cast(image[:, :, 0], sitk.sitkInt16)
    second.SetMetaData("0020|000e", "1.2.3.4.5.6.7")
    second.SetMetaData("0008|0060", "MR")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(other))
    writer.Execute(second)
    with pytest.raises(SamlessError, match="2 DICOM series"):
        read_image(tmp_path / "a")


@pytest.fixture(scope="module")
def three_channel_package(tmp_path_factory):
    torch.manual_seed(1)
    config = NetConfig(backbone="hardnet39ds", in_channels=3, input_size=64, embed_size=16)
    card = ModelCard(name="tiny-multimodal", architecture=config, inputs=Inputs(modalities=("FLAIR", "T1", "T2")))
    return save_package(build_model(config), card, tmp_path_factory.mktemp("mm") / "pkg")


def test_multimodal_subject_from_commas_and_from_subject_folders(three_channel_package, tmp_path, capsys):
    flair, _ = synthetic_head(seed=1)
    t1 = sitk.InvertIntensity(flair, 300)
    t2 = sitk.Resample(flair, flair, sitk.TranslationTransform(3, (1.0, 0, 0)))  # different content, same grid
    subject = tmp_path / "cases" / "sub01"
    subject.mkdir(parents=True)
    paths = []
    for name, image in (("flair", flair), ("t1", t1), ("t2", t2)):
        paths.append(subject / f"sub01_{name}.nii.gz")
        sitk.WriteImage(image, str(paths[-1]))
    out = tmp_path / "one.nii.gz"
    assert main(["segment", ",".join(map(str, paths)), "-o", str(out), "--model", str(three_channel_package),
                 "--progress", "none"]) == 0
    assert sitk.ReadImage(str(out)).GetSize() == flair.GetSize()

    assert main(["segment", str(tmp_path / "cases"), "-o", str(tmp_path / "batch"), "--model",
                 str(three_channel_package), "--progress", "none"]) == 0
    batch = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "batch" / "sub01_lesions.nii.gz")))
    np.testing.assert_array_equal(batch, sitk.GetArrayFromImage(sitk.ReadImage(str(out))))

    # Only the FLAIR given to a three-modality model: refused, naming what is needed.
    assert main(["segment", str(paths[0]), "-o", str(tmp_path / "x.nii.gz"),
                 "--model", str(three_channel_package)]) == 1
    assert "FLAIR,T1,T2" in capsys.readouterr().err


def test_device_choice_on_a_machine_without_gpu(tiny_package):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert pick_torch_device("auto") in ("cpu", "mps")
    with pytest.raises(SamlessError, match="no CUDA GPU"):
        pick_torch_device("cuda")
    package = load_package(tiny_package)
    assert isinstance(create_backend(package, "auto", "cpu"), OnnxBackend)  # the light path on CPU
    assert isinstance(create_backend(package, "torch", "cpu"), TorchBackend)
    with pytest.raises(SamlessError, match="CPU only"):
        create_backend(package, "onnx", "cuda")
    package.files.pop("model.onnx")
    assert isinstance(create_backend(package, "auto", "cpu"), TorchBackend)  # falls back to torch
    with pytest.raises(SamlessError, match="no model.onnx"):
        create_backend(package, "onnx")


def test_onnx_path_runs_without_torch_or_segment_anything(tiny_package, head, tmp_path):
    """What a Slicer user without PyTorch runs: torch and SAM must never be imported."""
    script = textwrap.dedent(f"""
        import sys
        for blocked in ("torch", "torchvision", "segment_anything", "slicer", "qt"):
            sys.modules[blocked] = None  # any import of these now fails
        from samless.cli import main
        code = main(["segment", {str(head[0])!r}, "-o", {str(tmp_path / "out.nii.gz")!r},
                     "--model", {str(tiny_package)!r}, "--progress", "none"])
        assert code == 0, code
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
    assert (tmp_path / "out.nii.gz").exists()


def test_save_package_is_atomic_when_export_fails(tmp_path, monkeypatch):
    config = NetConfig(backbone="hardnet39ds", input_size=64, embed_size=16)
    card = ModelCard(name="x", architecture=config)

    def broken_export(*args, **kwargs):
        raise RuntimeError("export failed")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(RuntimeError):
        save_package(build_model(config), card, tmp_path / "pkg")
    assert list(tmp_path.iterdir()) == []
