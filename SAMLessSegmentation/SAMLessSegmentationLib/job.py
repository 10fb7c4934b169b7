"""One background run from start to results: inputs to files, the process, outputs back into memory.

Used alike by the module panel and the Segment Editor effect; the scene is only touched when the
caller imports the outputs, so a run that fails or is cancelled leaves it as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from samless.errors import SamlessError
from samless.options import SegmentOptions

from .change import ChangeOutputs, read_change_outputs
from .process import (
    InferenceProcess,
    ProcessFailed,
    followup_command,
    process_environment,
    python_executable,
    segment_command,
)
from .results import Outputs, read_outputs
from .volumes import write_image

MODULE_DIR = Path(__file__).resolve().parents[1]  # holds samless/: the process's working folder and PYTHONPATH


class Preparation:
    """One model download or package install at a time, for the module and the effect together: their
    progress dialogs are not modal, and a second Apply meanwhile would run a second pip into the same
    site-packages or download into the same .part file.  `with Preparation(): ...`"""

    active = False

    def __enter__(self) -> Preparation:
        if Preparation.active:
            raise SamlessError("SAMLess is still downloading a model or installing packages; wait for it to "
                               "finish, then click Apply again.")
        Preparation.active = True
        return self

    def __exit__(self, *exc_info) -> None:
        Preparation.active = False


class BackgroundJob:
    """Write the inputs, run one `samless` command in the background, read its outputs back.

    `inputs` are volume nodes, oriented images or sitk images. Subclasses say which command runs
    (`_command`) and how its outputs are read (`_read`).
    """

    what = "the run"  # names the job in messages

    def __init__(self, inputs: Sequence[Any], model: str | os.PathLike, options: SegmentOptions,
                 python: str | None = None, env: Mapping[str, str] | None = None,
                 workdir: str | os.PathLike | None = None):
        self.inputs, self.model, self.options = list(inputs), Path(model), options
        self.python = python or python_executable()
        self.env = process_environment(os.environ if env is None else env, MODULE_DIR)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="samless-"))
        self.process: InferenceProcess | None = None

    def _command(self, paths: list[Path]) -> list[str]:
        raise NotImplementedError

    def _read(self, outputs: dict[str, str]) -> Any:
        raise NotImplementedError

    def start(self) -> BackgroundJob:
        try:
            paths = [write_image(image, self.workdir / f"input{i}.nrrd") for i, image in enumerate(self.inputs)]
            # `-m samless` finds the package in the working folder even if a launcher resets PYTHONPATH.
            self.process = InferenceProcess(self._command(paths), self.env, cwd=MODULE_DIR,
                                            label=f"{self.what} process").start()
        except Exception:
            self.cleanup()
            raise
        return self

    def poll(self) -> list[dict[str, Any]]:
        return self.process.poll() if self.process else []

    @property
    def fraction(self) -> float:
        return self.process.fraction if self.process else 0.0

    @property
    def finished(self) -> bool:
        return self.process is not None and self.process.finished

    def cancel(self) -> None:
        if self.process:
            self.process.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        return self.process.wait(timeout) if self.process else True

    def outputs(self) -> Any:
        """What the run wrote, read into memory; raises ProcessFailed if it failed."""
        if self.process is None or not self.process.finished:
            raise SamlessError(f"{self.what} has not finished yet.")
        failure = self.process.error()
        if failure is not None:
            raise failure
        done = self.process.done_event()
        if done is None:
            raise ProcessFailed(f"{self.what} process ended without results.", "")
        return self._read(done["outputs"])

    def cleanup(self) -> None:
        """Remove the temporary files (kill the process first if it still runs)."""
        self.cancel()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class SegmentationJob(BackgroundJob):
    """`samless segment` of one subject: `inputs` in the model's modality order; outputs are `Outputs`."""

    what = "the segmentation"

    @property
    def label_path(self) -> Path:
        return self.workdir / "lesions.nrrd"

    def _command(self, paths: list[Path]) -> list[str]:
        return segment_command(self.python, paths, self.label_path, self.model, self.options)

    def _read(self, outputs: dict[str, str]) -> Outputs:
        return read_outputs(outputs)


class FollowupJob(BackgroundJob):
    """`samless followup`: `inputs` are (baseline, follow-up) FLAIRs; outputs are `ChangeOutputs`.
    `allow_poor_registration` classes the lesions even where the registration looks failed (with a warning)."""

    what = "the follow-up"

    def __init__(self, *args: Any, allow_poor_registration: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.allow_poor_registration = allow_poor_registration

    def _command(self, paths: list[Path]) -> list[str]:
        if len(paths) != 2:
            raise ValueError(f"a follow-up takes a baseline and a follow-up scan, not {len(paths)} inputs.")
        return followup_command(self.python, paths[0], paths[1], self.workdir / "change", self.model, self.options,
                                self.allow_poor_registration)

    def _read(self, outputs: dict[str, str]) -> ChangeOutputs:
        return read_change_outputs(outputs)
