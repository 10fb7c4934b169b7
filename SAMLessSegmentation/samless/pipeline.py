"""One volume in, lesions out: the whole inference path behind `samless segment` and the Slicer module."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import SimpleITK as sitk

from samless.backends import Backend, create_backend
from samless.borders import BorderGrowth
from samless.card import ModelCard, Postprocessing
from samless.contrast import contrast_problem
from samless.errors import SamlessError
from samless.imageio import check_volume, read_image
from samless.inference import Progress, SliceInferer
from samless.lesions import label_map, lesion_components, lesion_statistics
from samless.options import SegmentOptions
from samless.package import ModelPackage, load_package, resolve_model
from samless.preprocess import PreparedVolume, prepare


@dataclass
class Segmentation:
    label: sitk.Image  # uint8, 1 = lesion, on the input's grid
    probability: sitk.Image  # float32 in [0, 1], on the input's grid
    statistics: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)


def load_inputs(paths: Sequence[str | os.PathLike], modalities: Sequence[str], *,
                check_contrast: bool = False) -> list[sitk.Image]:
    """Read and check one subject's volumes, in the model's modality order.

    `check_contrast` also refuses a FLAIR input that looks T1- or T2-weighted (what a user's command
    should do; training and evaluation read their own known cases without it).
    """
    if len(paths) != len(modalities):
        raise SamlessError(
            f"the model needs {len(modalities)} input volume(s) ({', '.join(modalities)}, in that order) "
            f"but {len(paths)} were given."
        )
    images = []
    for path, modality in zip(paths, modalities):
        image = read_image(path)
        check_volume(image, f"{modality} input {path}")
        if check_contrast and modality.lower() == "flair":
            problem = contrast_problem(image, f"{modality} input {path}")
            if problem:
                raise SamlessError(problem)
        images.append(image)
    return images


class Segmenter:
    """A model ready to segment many volumes: its card (how to prepare inputs and read the output) and a
    backend that runs its network (a package's ONNX or torch network, or a module being trained)."""

    def __init__(self, card: ModelCard, backend: Backend):
        self.card = card
        self.borders = BorderGrowth.from_card(card.postprocessing)  # a bad card fails before any work
        if self.borders and self.modalities[0].lower() != "flair":
            raise SamlessError(f"model {card.name}: lesion borders grow on a FLAIR first input, not on "
                               f"{self.modalities[0]}; remove postprocessing.borders from its card.")
        self.backend = backend

    @classmethod
    def from_package(cls, package: ModelPackage, backend: str = "auto", device: str = "auto",
                     threads: int | None = None) -> Segmenter:
        """The package's network on the backend ('auto', 'onnx' or 'torch'), device and threads asked for."""
        return cls(package.card, create_backend(package, backend, device, threads))

    @classmethod
    def from_model(cls, model: str | os.PathLike | None = None, **kwargs: Any) -> Segmenter:
        return cls.from_package(load_package(resolve_model(model)), **kwargs)

    @classmethod
    def for_options(cls, package: ModelPackage, options: SegmentOptions) -> Segmenter:
        """The model on the backend, device and threads the options ask for."""
        return cls.from_package(package, options.backend, options.device, options.threads)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def modalities(self) -> list[str]:
        return list(self.card.inputs.modalities)

    def planes(self, options: SegmentOptions) -> list[str]:
        """The planes to predict on and fuse: all three for a model trained on them, unless told otherwise."""
        inputs = self.card.inputs
        if options.three_plane is False or (options.three_plane is None and not inputs.three_plane):
            return [inputs.slicing_axis]
        if not inputs.three_plane:
            raise SamlessError(
                f"model {self.name} was trained on {', '.join(inputs.planes)} slices only; "
                "three-plane fusion needs a model trained on all three planes: drop --three-plane."
            )
        return list(inputs.planes)

    def segment(self, images: Sequence[sitk.Image], options: SegmentOptions | None = None,
                progress: Progress | None = None) -> Segmentation:
        """Segment one subject (images in the model's modality order, first = reference grid)."""
        options = options or SegmentOptions()
        if len(images) != len(self.modalities):
            raise SamlessError(f"the model needs {len(self.modalities)} input volume(s) "
                               f"({', '.join(self.modalities)}) but {len(images)} were given.")
        borders = self.borders_for(options)  # asked for and missing: fails before any work
        ticks = {"start": time.perf_counter()}
        prepared = self.prepare(images)
        ticks["preprocess"] = time.perf_counter()
        prob = self.predict(prepared, options, progress)
        ticks["inference"] = time.perf_counter()
        probability = self.input_probability(prob, prepared, images[0], borders)
        segmentation = self.relabel(probability, options)
        segmentation.statistics["borders"] = borders.to_json() if borders else None
        ticks["postprocess"] = time.perf_counter()
        segmentation.seconds = _durations(ticks)
        return segmentation

    def borders_for(self, options: SegmentOptions) -> BorderGrowth | None:
        """The border growth a run uses: the card's settings, where the options or the card's default ask."""
        post = self.card.postprocessing
        wanted = (self.borders is not None and post.borders_by_default) if options.borders is None else options.borders
        if wanted and self.borders is None:
            raise SamlessError(f"model {self.name} has no lesion border settings in its card: run without "
                               "--borders, or choose them with `samless tune --rim-fractions ... --reach-mm ...`.")
        return self.borders if wanted else None

    def prepare(self, images: Sequence[sitk.Image]) -> PreparedVolume:
        """The inputs on the model's canonical grid, normalised."""
        # A three-plane model learnt on isotropic volumes: it gets them even when run on one plane.
        return prepare(list(images), self.card, isotropic=self.card.inputs.three_plane)

    def predict(self, prepared: PreparedVolume, options: SegmentOptions,
                progress: Progress | None = None) -> np.ndarray:
        """The network's lesion probability on the canonical grid."""
        inferer = SliceInferer(self.card.architecture.input_size, options.batch_size, options.tta,
                               self.card.inputs.context_slices)
        return inferer(prepared.channels, prepared.foreground, self.backend, self.planes(options), progress)

    def input_probability(self, prob: np.ndarray, prepared: PreparedVolume, reference: sitk.Image,
                          borders: BorderGrowth | None, threshold: float | None = None,
                          min_lesion_mm3: float | None = None) -> sitk.Image:
        """A network map with its lesions' borders grown (`borders`, if any), on the reference input's grid.

        Lesions grow from the card's threshold and minimum size (or those given: what a card with them would
        do), not a run's: the stored map is the same whatever a user asks later."""
        if borders:
            post = self.card.postprocessing
            prob = borders(prob, prepared.channels[0], prepared.foreground, tuple(reversed(prepared.grid.GetSpacing())),
                           post.threshold if threshold is None else threshold,
                           post.min_lesion_mm3 if min_lesion_mm3 is None else min_lesion_mm3)
        return self._to_input_grid(prob, prepared.grid, reference)

    def relabel(self, probability: sitk.Image, options: SegmentOptions | None = None) -> Segmentation:
        """Lesions from a probability map with this model's defaults (or the options' overrides)."""
        return relabel(probability, self.card.postprocessing, options, self.name)

    @staticmethod
    def _to_input_grid(prob: np.ndarray, grid: sitk.Image, reference: sitk.Image) -> sitk.Image:
        prob_image = sitk.GetImageFromArray(prob.astype(np.float32, copy=False))
        prob_image.CopyInformation(grid)
        out = sitk.Resample(prob_image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        return sitk.Clamp(out, sitk.sitkFloat32, 0.0, 1.0)


def relabel(probability: sitk.Image, post: Postprocessing, options: SegmentOptions | None = None,
            model: str = "") -> Segmentation:
    """Threshold a stored probability map again (new sensitivity or minimum size), no network needed: with the
    card's post-processing `post` where the options leave a setting open."""
    options = options or SegmentOptions()
    # the card's defaults go through the same checks as an override
    options = replace(options, threshold=post.threshold if options.threshold is None else options.threshold,
                      min_lesion_mm3=post.min_lesion_mm3 if options.min_lesion_mm3 is None
                      else options.min_lesion_mm3)
    return threshold_lesions(probability, options.threshold, options.min_lesion_mm3, post.connectivity, model)


def threshold_lesions(probability: sitk.Image, threshold: float, min_lesion_mm3: float, connectivity: str = "full",
                      model: str = "") -> Segmentation:
    """Lesions of a probability map: voxels at `threshold` or above, joined by `connectivity` (full or face),
    components smaller than `min_lesion_mm3` dropped; statistics say which settings made them."""
    SegmentOptions(threshold=threshold, min_lesion_mm3=min_lesion_mm3)  # the same checks as any run's
    components = lesion_components(probability, threshold, min_lesion_mm3, connectivity)
    stats = lesion_statistics(components, probability)
    stats.update({"model": model, "threshold": threshold, "min_lesion_mm3": min_lesion_mm3,
                  "connectivity": connectivity})
    return Segmentation(label=label_map(components), probability=probability, statistics=stats)


def _durations(ticks: dict[str, float]) -> dict[str, float]:
    names = list(ticks)
    out = {b: round(ticks[b] - ticks[a], 3) for a, b in zip(names, names[1:])}
    out["total"] = round(ticks[names[-1]] - ticks[names[0]], 3)
    return out
