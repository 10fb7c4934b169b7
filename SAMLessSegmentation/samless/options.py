"""How a run segments: one options object for the command line, the Python API and the Slicer module.

Light on purpose (no SimpleITK, no network code): the Slicer module builds its background command from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from samless.errors import SamlessError

__all__ = ["BACKENDS", "DEFAULT_BATCH_SIZE", "DEVICES", "SegmentOptions"]

BACKENDS = ("auto", "torch", "onnx")
DEVICES = ("auto", "cpu", "cuda", "mps")
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class SegmentOptions:
    """How one run segments: post-processing overrides, test-time choices and where the network runs.

    None means the model card's default (threads: the backend's). Checked when made, so a bad value fails
    before any work; `to_argv` gives the `samless segment` / `samless followup` flags that make the same.
    """

    threshold: float | None = None
    min_lesion_mm3: float | None = None
    tta: bool = False
    three_plane: bool | None = None  # fuse axial, coronal and sagittal; None: where the model was trained on all three
    borders: bool | None = None  # grow lesions into their fainter rims; None: as the model card says
    batch_size: int = DEFAULT_BATCH_SIZE
    backend: str = "auto"
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise SamlessError(f"threshold {self.threshold} is outside (0, 1); give a probability such as 0.5.")
        if self.min_lesion_mm3 is not None and not self.min_lesion_mm3 >= 0:
            raise SamlessError(f"minimum lesion size {self.min_lesion_mm3} mm^3 is negative; give 0 or more.")
        if self.batch_size < 1 or (self.threads is not None and self.threads < 1):
            raise SamlessError(f"batch size {self.batch_size} and threads {self.threads} must be 1 or more.")
        if self.backend not in BACKENDS or self.device not in DEVICES:
            raise SamlessError(f"unknown backend {self.backend!r} or device {self.device!r}; backends: "
                               f"{', '.join(BACKENDS)}; devices: {', '.join(DEVICES)}.")

    def to_argv(self) -> list[str]:
        """The command-line flags for these options (defaults left out)."""
        argv: list[str] = []
        if self.threshold is not None:
            argv += ["--threshold", repr(float(self.threshold))]
        if self.min_lesion_mm3 is not None:
            argv += ["--min-lesion-mm3", repr(float(self.min_lesion_mm3))]
        if self.tta:
            argv.append("--tta")
        if self.three_plane is not None:
            argv.append("--three-plane" if self.three_plane else "--no-three-plane")
        if self.borders is not None:
            argv.append("--borders" if self.borders else "--no-borders")
        if self.batch_size != DEFAULT_BATCH_SIZE:
            argv += ["--batch-size", str(self.batch_size)]
        for flag, value in (("--device", self.device), ("--backend", self.backend)):
            if value != "auto":
                argv += [flag, value]
        if self.threads is not None:
            argv += ["--threads", str(self.threads)]
        return argv
