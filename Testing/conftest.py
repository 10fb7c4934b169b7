"""Shared fixtures: small synthetic heads with known lesions, and a small real model package."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

SAMPLE = Path(__file__).resolve().parents[1] / "Resources" / "Sample"  # the bundled sample case


def rotation(ax: float, az: float) -> tuple[float, ...]:
    """A direction matrix rotated `ax` rad about x then `az` rad about z (an oblique acquisition)."""
    cx, sx, cz, sz = math.cos(ax), math.sin(ax), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return tuple((rz @ rx).ravel())


def synthetic_head(size=(70, 80, 24), spacing=(0.9, 1.1, 3.0), origin=(-30.0, -40.0, -35.0),
                   direction=None, lesions=(((0, 5, 0), 6.0), ((-12, -10, 6), 4.0)), seed=0,
                   head_radii=(27.0, 32.0, 30.0)) -> tuple[sitk.Image, sitk.Image]:
    """A FLAIR-like head (brain ~100, CSF ~35, scalp ~150, air ~5, noise) with bright spherical lesions (~260).

    `lesions` are (centre in physical mm relative to the head centre, radius mm). Returns the image
    and its exact lesion mask (uint8) on the same grid.
    """
    image = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    if direction is not None:
        image.SetDirection(direction)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3).astype(float)
    d = np.array(image.GetDirection()).reshape(3, 3)
    phys = (idx * np.array(spacing)) @ d.T + np.array(origin)  # voxel centres in physical space
    centre = phys.mean(axis=0)
    rel = phys - centre
    radius = np.sqrt(((rel / np.array(head_radii)) ** 2).sum(1))
    head = radius <= 1
    mask = np.zeros(len(rel), bool)
    for offset, lesion_radius in lesions:
        mask |= ((rel - np.array(offset)) ** 2).sum(1) <= lesion_radius ** 2
    mask &= head
    rng = np.random.default_rng(seed)
    # Brain ~100, dark CSF (ventricles, ~35), a bright scalp shell ~150 (as fat is on FLAIR), air ~5.
    values = np.where(head, np.where(radius > 0.88, 150.0, 100.0), 5.0)
    ventricles = (((rel - np.array([0.0, -0.45 * head_radii[1], 0.0])) / (0.3 * np.array(head_radii))) ** 2).sum(1) <= 1
    values[ventricles & ~mask] = 35.0
    values += rng.normal(0, 3, len(rel))
    values[mask] = 260 + rng.normal(0, 3, mask.sum())
    to_zyx = (size[0], size[1], size[2])
    arr = values.reshape(to_zyx).transpose(2, 1, 0).astype(np.float32)
    truth = mask.reshape(to_zyx).transpose(2, 1, 0).astype(np.uint8)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection(direction or (1, 0, 0, 0, 1, 0, 0, 0, 1))
    truth_image = sitk.GetImageFromArray(truth)
    truth_image.CopyInformation(image)
    return image, truth_image


class IntensityBackend:
    """A known function in place of the network: bright pixels are lesions.

    After normalisation (1st head percentile, in CSF -> 0; head median -> 1) the brain sits near 1,
    the scalp near 1.8 and lesions near 3.7: cut at 2.7.

    With it the pipeline's geometry can be checked exactly: lesions must come back where they are.
    """

    name = "intensity"
    device = "cpu"

    def __init__(self):
        self.calls = 0

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        return (1.0 / (1.0 + np.exp(-(batch[:, 0] - 2.7) * 10.0))).astype(np.float32)


def moved(image: sitk.Image, angles=(0.05, -0.03, 0.08), shift=(4.0, -3.0, 2.0)):
    """The same voxels, the scan physically turned and shifted (as a head moves between sessions); and the
    transform from the original's points to the moved scan's."""
    motion = sitk.Euler3DTransform()
    motion.SetCenter(image.TransformContinuousIndexToPhysicalPoint([s / 2 for s in image.GetSize()]))
    motion.SetRotation(*angles)
    motion.SetTranslation(shift)
    out = sitk.Image(image)
    rot = np.array(motion.GetMatrix()).reshape(3, 3)
    out.SetDirection(tuple((rot @ np.array(image.GetDirection()).reshape(3, 3)).ravel()))
    out.SetOrigin(motion.TransformPoint(image.GetOrigin()))
    return out, motion


def sample_change_pair() -> tuple[sitk.Image, sitk.Image, tuple[int, int, int]]:
    """A follow-up pair with one new lesion: the baseline is the bundled sample with its largest lesion painted
    over with the white matter round it, then moved; the follow-up is the sample itself. Returns (baseline,
    follow-up, the new lesion's centre as a follow-up index z y x)."""
    image = sitk.ReadImage(str(SAMPLE / "flair.nii.gz"))
    lesions = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.ReadImage(str(SAMPLE / "mask.nii.gz")), True),
                                    sortByObjectSize=True)
    largest = sitk.Cast(lesions == 1, sitk.sitkUInt8)
    cover = sitk.GetArrayFromImage(sitk.BinaryDilate(largest, [2, 2, 1])).astype(bool)
    ring = sitk.GetArrayFromImage(sitk.BinaryDilate(largest, [5, 5, 1])).astype(bool) & ~cover
    arr = sitk.GetArrayFromImage(image)
    ring &= sitk.GetArrayFromImage(lesions) == 0
    painted = arr.copy()
    painted[cover] = np.median(arr[ring])
    base = sitk.GetImageFromArray(painted)
    base.CopyInformation(image)
    base, _ = moved(base)
    centre = np.round(np.argwhere(sitk.GetArrayFromImage(largest)).mean(axis=0)).astype(int)
    return base, image, tuple(int(c) for c in centre)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())


def build_tiny_package(folder: Path) -> Path:
    """A real model package (light backbone at 64 px, random weights) with weights and ONNX (needs torch)."""
    import torch

    from samless.card import ModelCard
    from samless.modeling import NetConfig, build_model
    from samless.package_write import save_package

    torch.manual_seed(0)
    config = NetConfig(backbone="hardnet39ds", input_size=64, embed_size=16)
    card = ModelCard(name="tiny-test", architecture=config, description="random weights, for tests",
                     license="Apache-2.0")
    return save_package(build_model(config), card, Path(folder))


# Runs without torch (the light core, as Slicer runs it: .ci/other_pythons) take the tiny package built
# beforehand by a full install (SAMLESS_TINY_PACKAGE) and leave out what needs torch itself.
HAS_TORCH = importlib.util.find_spec("torch") is not None
collect_ignore = [] if HAS_TORCH else ["core/test_modeling.py", "core/test_package.py",
                                       "core/test_inputs_and_backends.py", "training", "packaging"]


def pytest_collection_modifyitems(config, items):
    if HAS_TORCH:
        return
    skip = pytest.mark.skip(reason="needs torch, which this light install lacks")
    for item in items:
        if "torch" in item.name:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory) -> Path:
    """A real model package (light backbone at 64 px, random weights) with weights and ONNX."""
    folder = tmp_path_factory.mktemp("models") / "tiny"
    prebuilt = os.environ.get("SAMLESS_TINY_PACKAGE")
    if prebuilt:
        return Path(shutil.copytree(prebuilt, folder))
    return build_tiny_package(folder)


@pytest.fixture()
def head(tmp_path) -> tuple[Path, sitk.Image, sitk.Image]:
    """An oblique, anisotropic synthetic head written as NIfTI, with its truth."""
    image, truth = synthetic_head(direction=rotation(0.35, 0.25))
    path = tmp_path / "flair.nii.gz"
    sitk.WriteImage(image, str(path))
    return path, image, truth


def write_cases(root: Path, n: int = 5, seed: int = 0) -> Path:
    """n small synthetic heads with lesions (flair.nii.gz + mask.nii.gz per case folder)."""
    for i in range(n):
        lesions = (((0, 5, 0), 6.0), ((-12, -10, 6), 4.0 + i % 3))
        image, truth = synthetic_head(seed=seed + i, lesions=lesions)
        case = root / f"case{i:02d}"
        case.mkdir(parents=True)
        sitk.WriteImage(image, str(case / "flair.nii.gz"))
        sitk.WriteImage(truth, str(case / "mask.nii.gz"))
    return root


@pytest.fixture(scope="session")
def small_split(tmp_path_factory) -> Path:
    """A 2-fold split file of 5 synthetic cases (fold0: 2 train, 2 val; 1 test)."""
    from samless.training.split import make_split

    root = write_cases(tmp_path_factory.mktemp("data"))
    return make_split(root, root / "split.json", ["flair"], folds=2, test_fraction=0.2, seed=0)


# --- trained runs, shared by the training tests (trained once a session) --------------------------

def small_config(split, out, phase: int, **overrides):
    """A TrainConfig small enough for a test (real segment_anything classes at random weights)."""
    from samless.training.train import TrainConfig

    settings = dict(phase=phase, split=str(split), out=str(out), input_size=128, embed_size=64, epochs=1,
                    samples_per_epoch=8, batch_size=4, workers=0, device="cpu", val_max_cases=1,
                    sam_type="vit_tiny", seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="session")
def phase1_run(small_split, tmp_path_factory):
    from samless.training.train import train

    out = tmp_path_factory.mktemp("runs") / "phase1"
    train(small_config(small_split, out, 1, val_every=0))
    return out


@pytest.fixture(scope="session")
def phase2_run(small_split, phase1_run, tmp_path_factory):
    from samless.training.train import train

    out = tmp_path_factory.mktemp("runs") / "phase2"
    train(small_config(small_split, out, 2, init=str(phase1_run / "checkpoints" / "last"), epochs=2))
    return out
