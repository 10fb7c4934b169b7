"""The background `samless segment` process: its command line, its progress events, cancel.

The process is started without waiting; two reader threads collect its stdout (one JSON event per
line) and stderr, and the caller polls from its own loop (a QTimer in Slicer), so the application
never blocks. Cancel kills the whole process tree: PythonSlicer is a launcher that starts the real
Python as a child, so killing the launcher alone would leave the work running.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from samless.errors import SamlessError
from samless.options import SegmentOptions

DEVICES = ("auto", "cpu", "gpu")
STDERR_LINES_KEPT = 200


def run_options(device: str = "auto", platform: str = sys.platform, **choices: Any) -> SegmentOptions:
    """The core's options for the panel's choices: `device` is auto, cpu or gpu (the torch backend on CUDA, or
    on MPS on a Mac); the rest (threshold, tta, ...) are SegmentOptions fields, None meaning the model's
    default. CPU keeps the light ONNX path."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if device == "gpu":
        choices.update(device="mps" if platform == "darwin" else "cuda", backend="torch")
    elif device == "cpu":
        choices.update(device="cpu")
    return SegmentOptions(**choices)


def device_arguments(device: str, platform: str = sys.platform) -> list[str]:
    """The core's --device/--backend flags for the panel's device choice."""
    return run_options(device, platform).to_argv()


def segment_command(python: str, inputs: Sequence[str | os.PathLike], output: str | os.PathLike,
                    model: str | os.PathLike, options: SegmentOptions) -> list[str]:
    """`python -m samless segment ...` writing the label map, probability map and statistics."""
    paths = [str(p) for p in inputs]
    if any("," in p for p in paths):  # the core joins a subject's modalities with commas
        raise ValueError(f"input paths may not contain commas: {paths}")
    command = [python, "-m", "samless", "segment", ",".join(paths), "-o", str(output), "--model", str(model),
               "--progress", "json", "--prob", "--stats", "--overwrite"]
    return command + options.to_argv()


def followup_command(python: str, baseline: str | os.PathLike, followup: str | os.PathLike,
                     output: str | os.PathLike, model: str | os.PathLike, options: SegmentOptions,
                     allow_poor_registration: bool = False) -> list[str]:
    """`python -m samless followup ...` writing the change label map, registered baseline and change table
    into the folder `output`. A registration that looks failed stops the run with an error, unless
    `allow_poor_registration` (then the result carries a warning)."""
    command = [python, "-m", "samless", "followup", str(baseline), str(followup), "-o", str(output), "--model",
               str(model), "--progress", "json", "--overwrite"]
    return command + (["--allow-poor-registration"] if allow_poor_registration else []) + options.to_argv()


def process_environment(base: Mapping[str, str], module_dir: str | os.PathLike) -> dict[str, str]:
    """`base` plus what the process needs: `samless` importable from the module folder, unbuffered UTF-8."""
    env = dict(base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(module_dir), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # progress lines must arrive as they are printed
    env["PYTHONIOENCODING"] = "utf-8"
    return env


class ProcessFailed(Exception):
    """The process ended with an error: `message` for the user, `details` (stderr) for the curious."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.message, self.details = message, details


class InferenceProcess:
    """One `samless segment` run (or another helper, such as pip) in a separate process, polled without blocking."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike | None = None, label: str = "the segmentation process"):
        self.command, self.env, self.cwd = list(command), dict(env) if env is not None else None, cwd
        self.label = label  # names the process in error messages
        self.events: list[dict[str, Any]] = []
        self.fraction = 0.0
        self.stage = ""
        self.cancelled = False
        self._proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self._threads: list[threading.Thread] = []

    def start(self) -> InferenceProcess:
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True  # own process group: cancel kills it and all its children
        self._proc = subprocess.Popen(self.command, env=self.env, cwd=self.cwd, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                      encoding="utf-8", errors="replace", **kwargs)
        for stream, sink in ((self._proc.stdout, self._queue.put), (self._proc.stderr, self._stderr.append)):
            thread = threading.Thread(target=_pump, args=(stream, sink), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def finished(self) -> bool:
        """Ended, and every line it printed has been read."""
        return self.returncode is not None and not any(t.is_alive() for t in self._threads)

    def poll(self) -> list[dict[str, Any]]:
        """Events printed since the last call (stdout lines that are not JSON are ignored)."""
        new = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            event = parse_event(line)
            if event is not None:
                new.append(event)
                self._track(event)
        self.events.extend(new)
        return new

    def _track(self, event: dict[str, Any]) -> None:
        if event["event"] == "progress":
            self.fraction = float(event.get("fraction", self.fraction))
            self.stage = str(event.get("stage", self.stage))
        elif event["event"] == "done":
            self.fraction = 1.0

    def error(self) -> ProcessFailed | None:
        """Why the finished run failed, or None if it succeeded (or has not finished)."""
        if not self.finished or (self.returncode == 0 and not self.cancelled):
            return None
        self.poll()  # the last lines may have come after the caller's last poll
        details = "".join(self._stderr).strip()
        if self.cancelled:
            return ProcessFailed("cancelled by the user.", details)
        messages = [e["message"] for e in self.events if e["event"] == "error" and e.get("message")]
        if messages:
            return ProcessFailed(messages[-1], details)
        last = details.splitlines()[-1] if details else f"exit code {self.returncode}"
        return ProcessFailed(f"{self.label} stopped unexpectedly ({last}).", details)

    def log_text(self) -> str:
        """What the panel's log shows: the command, the stages it went through, its messages and its stderr
        (the last STDERR_LINES_KEPT lines)."""
        self.poll()
        lines, stage = ["$ " + " ".join(self.command)], None
        for event in self.events:
            if event["event"] == "progress" and event.get("stage") != stage:
                stage = event.get("stage")
                lines.append(f"[{stage}]")
            elif event["event"] == "done" and not event.get("message"):
                lines.append(f"done: {event.get('lesion_count')} lesions, {event.get('total_volume_ml')} mL, "
                             f"{event.get('seconds')} s")
            elif event.get("message"):
                lines.append(f"{event['event']}: {event['message']}")
        stderr = "".join(self._stderr).strip()
        return "\n".join(lines + ([stderr] if stderr else []))

    def done_event(self) -> dict[str, Any] | None:
        self.poll()
        return next((e for e in reversed(self.events) if e["event"] == "done"), None)

    def cancel(self) -> None:
        """Kill the process and everything it started (children may outlive a launcher that exited)."""
        if self._proc is not None and not self.finished:
            self.cancelled = True
            kill_process_tree(self._proc)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> bool:
        """Poll until finished (for scripts and tests; the GUI polls from a timer instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            if deadline is not None and time.monotonic() > deadline:
                return False
            self.poll()
            time.sleep(interval)
        self.poll()
        return True


def _pump(stream, sink) -> None:
    for line in stream:
        sink(line)
    stream.close()


def parse_event(line: str) -> dict[str, Any] | None:
    """A progress event from one stdout line, or None for anything else."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("event"), str) else None


def kill_process_tree(proc: subprocess.Popen) -> None:
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False,
                       creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))  # no console window flashing
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group started with the process (start_new_session)
        except ProcessLookupError:
            pass
    proc.wait()


def python_executable() -> str:
    """PythonSlicer inside Slicer (it is on Slicer's PATH), the running interpreter elsewhere."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    if _inside_slicer_application():  # there sys.executable is Slicer itself, which cannot run `-m samless`
        raise SamlessError("PythonSlicer, the Python that runs SAMLess in the background, was not found on "
                           "Slicer's PATH; this Slicer installation is incomplete: reinstall Slicer.")
    return sys.executable


def _inside_slicer_application() -> bool:
    slicer = sys.modules.get("slicer")
    return slicer is not None and hasattr(slicer, "app")  # the headless MRML wheel has no application
