"""Which models exist and where their packages are: the registry, the user cache, downloads.

Resources/Models.json lists the models (bundled ones have "url": null). Downloaded packages are
kept, as the verified .zip, in a per-user cache folder, never in the extension's install folder
(it may be read-only and is replaced on every update). A download is checked against the
registry's size and sha256 before it is kept, and every package is checked file by file (the
model card's sha256s) before it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samless.card import ModelCard, Postprocessing
from samless.errors import SamlessError
from samless.imageio import atomic_output
from samless.package import CARD_NAME, DEFAULT_MODEL, ModelPackage, load_package

REGISTRY_FILE = "Models.json"
CACHE_ENV = "SAMLESS_CACHE_DIR"
CHUNK_BYTES = 1 << 16
RESEARCH_WARNING = "Research software: not for clinical use."
DEMO_WARNING = ("The demo model was trained on synthetic phantoms only: it has not been validated on patient data "
                "and its results mean nothing clinically.")
Progress = Callable[[int, int], None]  # (bytes done, bytes expected)


class DownloadCancelled(Exception):
    """The user cancelled a download; nothing was kept."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of the registry."""

    name: str
    title: str
    url: str | None  # None: bundled with the extension
    sha256: str | None = None  # of the downloaded .zip
    size_bytes: int | None = None
    license: str = ""
    intended_use: str = ""
    description: str = ""
    modalities: tuple[str, ...] = ("FLAIR",)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def bundled(self) -> bool:
        return self.url is None


def load_registry(path: str | os.PathLike) -> list[ModelEntry]:
    """The models listed in a Models.json; raises SamlessError naming the first problem."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        entries = [_entry(item) for item in data["models"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SamlessError(f"the model registry {path} is unreadable ({exc}).") from None
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise SamlessError(f"the model registry {path} lists a model twice.")
    return entries


def _entry(item: dict[str, Any]) -> ModelEntry:
    known = {"name", "title", "url", "sha256", "size_bytes", "license", "intended_use", "description", "modalities"}
    entry = ModelEntry(
        name=item["name"], title=item.get("title", item["name"]), url=item.get("url"), sha256=item.get("sha256"),
        size_bytes=item.get("size_bytes"), license=item.get("license", ""), intended_use=item.get("intended_use", ""),
        description=item.get("description", ""), modalities=tuple(item.get("modalities", ["FLAIR"])),
        extra={k: v for k, v in item.items() if k not in known},
    )
    if not entry.bundled:
        digest = entry.sha256 or ""
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
            raise ValueError(f"model {entry.name} has a url but no valid sha256")
        if not isinstance(entry.size_bytes, int) or entry.size_bytes <= 0:
            raise ValueError(f"model {entry.name} has a url but no size_bytes")
    return entry


# --- where packages live ------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """The per-user cache folder ($SAMLESS_CACHE_DIR overrides it)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "SAMLessSegmentation"


def cached_path(entry: ModelEntry, cache_dir: str | os.PathLike) -> Path:
    """Where a downloaded model is kept (its digest in the name: a new version never reuses an old file)."""
    return Path(cache_dir) / "models" / f"{entry.name}-{entry.sha256[:12]}.zip"


def cached_downloads(cache_dir: str | os.PathLike) -> list[tuple[Path, int]]:
    """The downloaded model zips in the cache and their sizes in bytes (bundled models are never there)."""
    folder = Path(cache_dir) / "models"
    files = sorted(folder.glob("*.zip")) if folder.is_dir() else []
    return [(path, path.stat().st_size) for path in files]


def remove_downloads(cache_dir: str | os.PathLike) -> int:
    """Delete the downloaded model zips (and any download left half-way); returns the bytes freed. A model
    removed here is downloaded again, and checked again, the next time it is chosen."""
    folder = Path(cache_dir) / "models"
    freed = 0
    for path in [*folder.glob("*.zip"), *folder.glob("*.zip.*")] if folder.is_dir() else []:
        freed += path.stat().st_size
        path.unlink()
    return freed


def find_bundled(name: str, folders: Sequence[str | os.PathLike]) -> Path | None:
    """A bundled package folder or .zip called `name` in the first folder that has it."""
    for folder in folders:
        for candidate in (Path(folder) / name, Path(folder) / f"{name}.zip"):
            if candidate.exists():
                return candidate
    return None


def local_path(entry: ModelEntry, cache_dir: str | os.PathLike, bundled_folders: Sequence[str | os.PathLike],
               ) -> Path | None:
    """The model's package on this computer, or None if it must be downloaded first.

    A cached download whose sha256 no longer matches the registry is refused (deleted, so that the
    next attempt downloads it again).
    """
    if entry.bundled:
        path = find_bundled(entry.name, bundled_folders)
        if path is None:
            raise SamlessError(f"the bundled model {entry.name} is missing from this installation "
                               f"(looked in {', '.join(str(f) for f in bundled_folders)}); reinstall the extension.")
        return path
    path = cached_path(entry, cache_dir)
    if not path.exists():
        return None
    if known_sha256(path) != entry.sha256.lower():
        path.unlink()
        raise SamlessError(f"the downloaded model {entry.name} in {path} failed verification (sha256 mismatch) "
                           "and was deleted; download it again.")
    return path


# sha256 of files already read, by (path, size, modification time): the panel asks each time it opens or
# the model changes, and hashing a large zip on the GUI thread would freeze it for seconds every time.
_HASHED: dict[tuple[str, int, int], str] = {}


def known_sha256(path: str | os.PathLike) -> str:
    """`file_sha256`, read once per file version (a file changed in size or time is read again)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = file_sha256(path)
    return _HASHED[key]


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- downloads ----------------------------------------------------------------------------------

def download(entry: ModelEntry, cache_dir: str | os.PathLike, progress: Progress | None = None,
             cancel: threading.Event | None = None, timeout: float = 30.0) -> Path:
    """Download a registry model into the cache, verified; nothing is kept unless it checks out."""
    if entry.bundled:
        raise SamlessError(f"model {entry.name} is bundled; there is nothing to download.")
    target = cached_path(entry, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(target) as partial:  # kept only once it checks out
        digest, size = _fetch(entry.url, partial, entry.size_bytes, progress, cancel, timeout)
        if size != entry.size_bytes or digest != entry.sha256.lower():
            raise SamlessError(
                f"the download of model {entry.name} failed verification ({size} bytes, sha256 {digest[:12]}..., "
                f"expected {entry.size_bytes} bytes, {entry.sha256[:12]}...); it was not kept. Try again later or "
                "download the package by hand and choose it as a local package."
            )
        load_package(partial)
    return target


def _fetch(url: str, path: Path, expected: int, progress: Progress | None, cancel: threading.Event | None,
           timeout: float) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(path, "wb") as out:
            for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                if cancel is not None and cancel.is_set():
                    raise DownloadCancelled(f"download of {url} cancelled")
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                if progress:
                    progress(size, expected)
                if size > expected:  # never fill the disk with something that is not the model
                    break
    except OSError as exc:  # URLError, HTTPError, timeouts, a full disk
        raise SamlessError(f"could not download {url} ({getattr(exc, 'reason', exc)}); check the network "
                           "connection, or download the package by hand and choose it as a local package.") from None
    return digest.hexdigest(), size


class BackgroundDownload:
    """`download` in a thread, polled from the GUI (which must not block on a slow network)."""

    def __init__(self, entry: ModelEntry, cache_dir: str | os.PathLike):
        self.entry, self.cache_dir = entry, cache_dir
        self.done_bytes, self.total_bytes = 0, entry.size_bytes or 0
        self.path: Path | None = None
        self.error: Exception | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> BackgroundDownload:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.path = download(self.entry, self.cache_dir, self._progress, self._cancel)
        except Exception as exc:  # handed to the GUI thread, which shows it
            self.error = exc

    def _progress(self, done: int, total: int) -> None:
        self.done_bytes, self.total_bytes = done, total

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self.finished


# --- the model card -----------------------------------------------------------------------------

def card_text(package: ModelPackage, entry: ModelEntry | None = None) -> str:
    """The model card as plain text: what the user must read before the first use."""
    card = package.card
    provenance = card.provenance
    training = card.extra.get("training_data") or provenance.get("training_data") or provenance.get("data")
    lines = [
        f"Model: {card.name} ({entry.title if entry else package.source})",
        card.description,
        f"Intended use: {card.intended_use or (entry.intended_use if entry else '') or 'not stated'}",
        f"Training data: {_flat(training) if training else 'not stated'}",
        f"Metrics: {_flat(dict(card.metrics)) if card.metrics else 'not stated'}",
        f"Licence: {card.license or (entry.license if entry else '') or 'not stated'}",
        f"Inputs: {', '.join(card.inputs.modalities)}",
        RESEARCH_WARNING,
    ]
    if is_demo(package, entry):
        lines.append(DEMO_WARNING)
    return "\n".join(line for line in lines if line)


def is_demo(package: ModelPackage, entry: ModelEntry | None = None) -> bool:
    return (package.name == DEFAULT_MODEL or bool(package.card.extra.get("demo"))
            or bool(entry and entry.extra.get("demo")))


def _flat(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def card_digest(package: ModelPackage) -> str:
    """Identifies the card: a changed card (a new version) must be read again."""
    return hashlib.sha256(json.dumps(package.card.to_json(), sort_keys=True).encode("utf-8")).hexdigest()


def _acknowledged_file(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / "acknowledged.json"


def is_acknowledged(package: ModelPackage, cache_dir: str | os.PathLike) -> bool:
    try:
        seen = json.loads(_acknowledged_file(cache_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return seen.get(package.name) == card_digest(package)


def acknowledge(package: ModelPackage, cache_dir: str | os.PathLike) -> None:
    """Remember that the user has read this model's card."""
    path = _acknowledged_file(cache_dir)
    try:
        seen = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        seen = {}
    seen[package.name] = card_digest(package)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(seen, indent=2) + "\n", encoding="utf-8")


def peek_card(path: str | os.PathLike) -> ModelCard:
    """A package's model card read without checking its files (to show inputs and defaults quickly)."""
    path = Path(path)
    try:
        if path.is_file():
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if Path(n).name == CARD_NAME)
                data = json.loads(archive.read(name).decode("utf-8"))
        else:
            data = json.loads((path / CARD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, StopIteration, zipfile.BadZipFile) as exc:
        raise SamlessError(f"{path} is not a readable model package ({exc or 'no model.json'}).") from None
    return ModelCard.from_json(data, path)


def postprocessing_defaults(card: ModelCard | None) -> dict[str, Any]:
    """Threshold, minimum lesion size and connectivity a run starts from, for the module and the effect
    alike: the model card's, or the core's defaults while the card is unknown (a model not yet downloaded)."""
    post = card.postprocessing if card else Postprocessing()
    return {k: v for k, v in post.to_json().items() if k != "borders"}


# The settings a run starts from while a model's card is unknown (not yet downloaded): the core's own.
DEFAULT_POSTPROCESSING = postprocessing_defaults(None)


def choice_card(choice: str, registry: Sequence[ModelEntry], cache_dir: str | os.PathLike,
                bundled_folders: Sequence[str | os.PathLike]) -> ModelCard | None:
    """The card of the model `choice` names where it is on disk; None until it is downloaded, or where
    the choice is broken (that is reported where it is made, and on Apply)."""
    try:
        _, path = resolve_choice(choice, registry, cache_dir, bundled_folders)
        return peek_card(path) if path else None
    except SamlessError:
        return None


def defaults_update(previous_key: str, choice: str, card: ModelCard | None) -> tuple[str, dict | None]:
    """(key, defaults to put on the sliders or None). The sliders take a model's defaults when the model
    or what is known of its card changes (a download reveals the card), and keep the user's values otherwise."""
    defaults = postprocessing_defaults(card)
    key = f"{choice} {json.dumps(defaults, sort_keys=True)}"
    return key, (defaults if key != previous_key else None)



# --- the user's choice ----------------------------------------------------------------------------

LOCAL_PREFIX = "local:"


def local_choice(path: str | os.PathLike) -> str:
    """The choice string for a package on disk (a folder, its model.json, or a .zip)."""
    path = Path(path)
    return LOCAL_PREFIX + str(path.parent if path.name == "model.json" else path)


def resolve_choice(choice: str, registry: Sequence[ModelEntry], cache_dir: str | os.PathLike,
                   bundled_folders: Sequence[str | os.PathLike]) -> tuple[ModelEntry | None, Path | None]:
    """(registry entry or None for a local package, package path or None if it must be downloaded)."""
    if choice.startswith(LOCAL_PREFIX):
        path = Path(choice[len(LOCAL_PREFIX):])
        if not path.exists():
            raise SamlessError(f"the local model package {path} does not exist any more; choose it again.")
        return None, path
    entry = next((e for e in registry if e.name == choice), None)
    if entry is None:
        raise SamlessError(f"model {choice!r} is not in the model registry; choose another model.")
    return entry, local_path(entry, cache_dir, bundled_folders)
