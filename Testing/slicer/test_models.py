"""Model registry, user cache, verified downloads (from a local HTTP server) and the model card."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import threading
import zipfile

import pytest
from samless_slicer_helpers import MODULE_DIR, REPO

from samless.card import ModelCard
from samless.errors import SamlessError
from samless.package import load_package

# isort: split
from SAMLessSegmentationLib import bundled_model_dirs, dependencies, models, resource_path


def zip_folder(folder, path) -> tuple:
    """Zip a package folder (with its top folder, as people zip folders); return (path, sha256, size)."""
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(folder.iterdir()):
            archive.write(file, f"tiny/{file.name}")
    data = path.read_bytes()
    return path, hashlib.sha256(data).hexdigest(), len(data)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client that hangs up (a cancelled download) is expected here


@contextlib.contextmanager
def serving(folder):
    """http://127.0.0.1:PORT serving `folder`."""
    httpd = QuietServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


@pytest.fixture(scope="module")
def zipped(tiny_package, tmp_path_factory):
    return zip_folder(tiny_package, tmp_path_factory.mktemp("served") / "tiny.zip")


@pytest.fixture(scope="module")
def server(zipped):
    with serving(zipped[0].parent) as url:
        yield url


def entry_for(zipped, server, **changes) -> models.ModelEntry:
    _, digest, size = zipped
    fields = {"name": "tiny", "title": "Tiny test model", "url": f"{server}/tiny.zip", "sha256": digest,
              "size_bytes": size, "license": "Apache-2.0", "intended_use": "tests only"}
    fields.update(changes)
    return models.ModelEntry(**fields)


def test_the_shipped_registry_lists_the_bundled_demo_model():
    registry = models.load_registry(REPO / "Resources" / "Models.json")
    demo = next(e for e in registry if e.name == "samless-demo")
    assert demo.bundled and demo.modalities == ("FLAIR",)
    assert "not for clinical use" in demo.intended_use.lower()
    assert demo.extra["demo"] is True and demo.extra["training_data"]
    assert resource_path("Models.json") == REPO / "Resources" / "Models.json"
    assert bundled_model_dirs()[-1] == REPO / "Resources" / "Models"


@pytest.mark.parametrize("change, message", [
    ({"sha256": None}, "no valid sha256"),
    ({"sha256": "abc"}, "no valid sha256"),
    ({"size_bytes": None}, "no size_bytes"),
])
def test_registry_entries_that_could_not_be_verified_are_refused(tmp_path, change, message):
    item = {"name": "m", "url": "https://example.org/m.zip", "sha256": "0" * 64, "size_bytes": 10, **change}
    path = tmp_path / "Models.json"
    path.write_text(json.dumps({"models": [item]}))
    with pytest.raises(SamlessError, match=message):
        models.load_registry(path)
    path.write_text(json.dumps({"models": [{"name": "a", "url": None}, {"name": "a", "url": None}]}))
    with pytest.raises(SamlessError, match="twice"):
        models.load_registry(path)


def test_download_is_verified_and_kept_in_the_cache(zipped, server, tmp_path):
    entry = entry_for(zipped, server)
    seen = []
    assert models.local_path(entry, tmp_path, []) is None  # not downloaded yet
    path = models.download(entry, tmp_path, progress=lambda done, total: seen.append((done, total)))
    assert path == tmp_path / "models" / f"tiny-{entry.sha256[:12]}.zip"
    assert models.file_sha256(path) == entry.sha256
    assert seen[-1] == (entry.size_bytes, entry.size_bytes) and seen == sorted(seen)
    assert load_package(path).name == "tiny-test"
    assert models.local_path(entry, tmp_path, []) == path
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [path.name]  # no leftovers


def test_downloaded_models_can_be_listed_and_freed(zipped, server, tmp_path, tiny_package):
    assert models.cached_downloads(tmp_path) == [] and models.remove_downloads(tmp_path) == 0
    path = models.download(entry_for(zipped, server), tmp_path)
    (path.parent / f"{path.name}.part").write_bytes(b"half")  # a download that stopped half-way
    models.acknowledge(load_package(path), tmp_path)
    assert models.cached_downloads(tmp_path) == [(path, path.stat().st_size)]
    assert models.remove_downloads(tmp_path) == zipped[0].stat().st_size + 4
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["acknowledged.json"]
    assert (tiny_package / "model.json").exists()  # only the cache is touched
    assert models.local_path(entry_for(zipped, server), tmp_path, []) is None  # downloaded again when chosen


@pytest.mark.parametrize("change", [{"sha256": "0" * 64}, {"size_bytes": 1000}])
def test_a_download_that_fails_verification_is_refused_and_not_kept(zipped, server, tmp_path, change):
    entry = entry_for(zipped, server, **change)
    with pytest.raises(SamlessError, match="failed verification"):
        models.download(entry, tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_a_registry_entry_matching_a_tampered_zip_is_still_refused(tiny_package, zipped, tmp_path):
    """The zip's own sha256 may match (a bad registry), but the package's per-file check does not."""
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_package, tampered)
    (tampered / "model.onnx").write_bytes(b"not a network")
    (tmp_path / "served").mkdir()
    _, digest, size = zip_folder(tampered, tmp_path / "served" / "tiny.zip")
    with serving(tmp_path / "served") as url:
        entry = entry_for(zipped, url, sha256=digest, size_bytes=size)
        with pytest.raises(SamlessError, match="sha256"):
            models.download(entry, tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_an_unreachable_server_gives_a_readable_error(zipped, server, tmp_path):
    entry = entry_for(zipped, server, url=f"{server}/missing.zip")
    with pytest.raises(SamlessError, match="could not download .*missing.zip.*local package"):
        models.download(entry, tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_a_cancelled_download_keeps_nothing(zipped, server, tmp_path):
    entry = entry_for(zipped, server)
    cancel = threading.Event()

    def progress(done, total):
        cancel.set()  # cancel after the first chunk

    with pytest.raises(models.DownloadCancelled):
        models.download(entry, tmp_path, progress=progress, cancel=cancel)
    assert list((tmp_path / "models").iterdir()) == []


def test_background_download_reports_progress_and_result(zipped, server, tmp_path):
    job = models.BackgroundDownload(entry_for(zipped, server), tmp_path).start()
    assert job.wait(timeout=30)
    assert job.error is None and job.path.exists()
    assert job.done_bytes == job.total_bytes == zipped[2]
    cancelled = models.BackgroundDownload(entry_for(zipped, server, name="other"), tmp_path)
    cancelled.cancel()
    cancelled.start().wait(timeout=30)
    assert isinstance(cancelled.error, models.DownloadCancelled) and cancelled.path is None


def test_a_cached_model_changed_on_disk_is_refused_and_removed(zipped, server, tmp_path):
    entry = entry_for(zipped, server)
    path = models.download(entry, tmp_path)
    path.write_bytes(path.read_bytes() + b"tampered")
    with pytest.raises(SamlessError, match="failed verification.*download it again"):
        models.local_path(entry, tmp_path, [])
    assert not path.exists()


def test_a_cached_model_is_hashed_once_per_version_of_the_file(zipped, server, tmp_path, monkeypatch):
    # The panel asks on every open and model change: a zip must not be read again on the GUI thread.
    entry = entry_for(zipped, server)
    path = models.download(entry, tmp_path)
    reads = []
    real = models.file_sha256
    monkeypatch.setattr(models, "file_sha256", lambda p: reads.append(p) or real(p))
    for _ in range(3):
        assert models.local_path(entry, tmp_path, []) == path
    assert len(reads) == 1
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, changed bytes, a new modification time
    before = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))  # whatever the clock's resolution
    with pytest.raises(SamlessError, match="failed verification"):
        models.local_path(entry, tmp_path, [])
    assert len(reads) == 2 and not path.exists()


def test_bundled_models_are_found_in_the_resource_folders(tiny_package, tmp_path):
    folder = tmp_path / "Models"
    shutil.copytree(tiny_package, folder / "samless-demo")
    demo = models.ModelEntry(name="samless-demo", title="demo", url=None)
    assert models.local_path(demo, tmp_path / "cache", [tmp_path / "nowhere", folder]) == folder / "samless-demo"
    with pytest.raises(SamlessError, match="bundled model samless-demo is missing"):
        models.local_path(demo, tmp_path / "cache", [tmp_path / "nowhere"])
    with pytest.raises(SamlessError, match="nothing to download"):
        models.download(demo, tmp_path)


def test_the_sample_is_found_when_the_installation_has_one(tmp_path, monkeypatch):
    import SAMLessSegmentationLib as lib

    monkeypatch.setattr(lib, "RESOURCE_DIRS", (tmp_path / "module", tmp_path / "extension"))
    assert lib.sample_volume_path() is None  # no sample yet: the self-test builds a synthetic head
    (tmp_path / "extension" / "Sample").mkdir(parents=True)
    for name in ("README.md", "sub-01_T1w.nii.gz", "sub-01_FLAIR.nii.gz"):
        (tmp_path / "extension" / "Sample" / name).write_bytes(b"")
    assert lib.sample_volume_path() == tmp_path / "extension" / "Sample" / "sub-01_FLAIR.nii.gz"


def test_the_sample_is_offered_to_sample_data_from_the_installation(tmp_path):
    """Slicer's Sample Data fetches a source's URIs with urllib into its cache and checks the checksum: the
    bundled sample's file URL gives the very file, offline."""
    import urllib.request

    import SAMLessSegmentationLib as lib

    source = lib.sample_data_source()
    sample = lib.sample_volume_path()
    target = tmp_path / source["fileNames"]
    urllib.request.urlretrieve(source["uris"], target)
    algorithm, digest = source["checksums"].split(":")
    assert algorithm == "SHA256" and hashlib.sha256(target.read_bytes()).hexdigest() == digest
    assert target.read_bytes() == sample.read_bytes() and target.name.endswith(".nii.gz")
    assert source["loadFileTypes"] == "VolumeFile" and os.path.isfile(source["thumbnailFileName"])
    # the parameters of SampleDataLogic.registerCustomSampleDataSource, the same in v5.8.1, v5.10.0 and v5.12.3
    parameters = {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader",
                  "thumbnailFileName", "loadFileTypes", "loadFiles", "loadFileProperties", "checksums", "loadFileType"}
    assert set(source) <= parameters


def test_choices_name_a_registry_model_or_a_local_package(tiny_package, tmp_path):
    demo = models.ModelEntry(name="samless-demo", title="demo", url=None)
    shutil.copytree(tiny_package, tmp_path / "Models" / "samless-demo")
    choice = models.local_choice(tiny_package / "model.json")
    assert choice == models.local_choice(tiny_package) == f"local:{tiny_package}"
    assert models.resolve_choice(choice, [demo], tmp_path, []) == (None, tiny_package)
    assert models.resolve_choice("samless-demo", [demo], tmp_path, [tmp_path / "Models"]) == (
        demo, tmp_path / "Models" / "samless-demo")
    with pytest.raises(SamlessError, match="not in the model registry"):
        models.resolve_choice("other", [demo], tmp_path, [])
    with pytest.raises(SamlessError, match="does not exist any more"):
        models.resolve_choice(models.local_choice(tmp_path / "gone"), [demo], tmp_path, [])


def test_module_and_effect_start_from_the_card_defaults_and_keep_the_users_values(tiny_package, zipped,
                                                                                 server, tmp_path):
    card = ModelCard.from_json(json.loads((tiny_package / "model.json").read_text()))
    card_post = card.postprocessing.to_json()
    choice = models.local_choice(tiny_package)
    # A package on disk: its card's threshold, minimum size and connectivity.
    assert models.choice_card(choice, [], tmp_path, []) == card
    key, defaults = models.defaults_update("", choice, card)
    assert defaults == {**defaults, **card_post}
    # Nothing changed since: the user's slider values stay.
    assert models.defaults_update(key, choice, card) == (key, None)
    # A registry model not yet downloaded: the core's defaults, until the download reveals its card.
    entry = entry_for(zipped, server)
    assert models.choice_card("tiny", [entry], tmp_path / "cache", []) is None
    unknown_key, unknown = models.defaults_update(key, "tiny", None)
    assert unknown == models.DEFAULT_POSTPROCESSING and unknown_key != key
    other = card.replace(postprocessing=card.postprocessing.updated({"threshold": 0.3, "min_lesion_mm3": 7.0}))
    later_key, later = models.defaults_update(unknown_key, "tiny", other)
    assert later["threshold"] == 0.3 and later["min_lesion_mm3"] == 7.0 and later_key != unknown_key
    # A broken choice gives no card (it is reported where it is chosen), not an exception here.
    assert models.choice_card(models.local_choice(tmp_path / "gone"), [], tmp_path, []) is None
    assert models.choice_card("not-registered", [entry], tmp_path, []) is None


def test_neither_the_module_nor_the_effect_hard_codes_postprocessing_defaults():
    for path in (MODULE_DIR / "SAMLessSegmentation.py",
                 MODULE_DIR / "SegmentEditorSAMLessLib" / "SegmentEditorEffect.py"):
        text = path.read_text(encoding="utf-8")
        assert "models.defaults_update(" in text, path
        assert not re.search(r'setParameterDefault\("(Threshold|MinimumLesionMm3)", *[0-9]', text), path


def test_the_model_card_is_shown_once_per_version(tiny_package, tmp_path):
    package = load_package(tiny_package)
    text = models.card_text(package)
    for expected in ("Model: tiny-test", "Intended use:", "Training data:", "Metrics:", "Licence: Apache-2.0",
                     "Inputs: FLAIR", "not for clinical use"):
        assert expected in text
    assert "synthetic phantoms" not in text  # the demo warning is for the demo model
    assert not models.is_acknowledged(package, tmp_path)
    models.acknowledge(package, tmp_path)
    assert models.is_acknowledged(package, tmp_path)
    package.card = package.card.replace(metrics={"dice": 0.7})  # a new version of the card must be read again
    assert not models.is_acknowledged(package, tmp_path)
    assert "dice" in models.card_text(package)
    package.card = package.card.replace(name="samless-demo")
    assert "synthetic phantoms" in models.card_text(package)


def test_the_cache_is_per_user_and_never_the_install_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = models.default_cache_dir()
    assert MODULE_DIR not in cache.parents and REPO not in cache.parents
    if not (models.sys.platform == "win32" or models.sys.platform == "darwin"):
        assert cache == tmp_path / "xdg" / "SAMLessSegmentation"
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "mine"))
    assert models.default_cache_dir() == tmp_path / "mine"


def test_dependencies_never_replace_what_slicer_ships(monkeypatch):
    pins = dependencies.constraints()
    import numpy
    import SimpleITK

    assert f"numpy=={numpy.__version__}" in pins
    assert any(p.lower().startswith("simpleitk==") and SimpleITK.Version_VersionString() in p for p in pins)
    monkeypatch.setattr(dependencies, "is_installed", lambda module: module not in ("onnxruntime", "torch"))
    assert dependencies.missing_requirements("cpu") == ["onnxruntime>=1.17"]
    assert dependencies.missing_requirements("auto") == ["onnxruntime>=1.17"]
    assert dependencies.missing_requirements("gpu") == [] and dependencies.needs_torch("gpu")
    assert not dependencies.needs_torch("cpu")
    monkeypatch.setattr(dependencies, "is_installed", lambda module: True)
    assert dependencies.missing_requirements("cpu") == [] and not dependencies.needs_torch("gpu")


def test_the_log_names_each_package_and_its_installed_version():
    import numpy
    import onnxruntime

    versions = dependencies.package_versions()
    assert versions["numpy"] == numpy.__version__ and versions["onnxruntime"] == onnxruntime.__version__
    assert {"torch", "safetensors", "tqdm", "SimpleITK", "vtk"} <= set(versions)
    assert all(v is None or v[0].isdigit() for v in versions.values())


@pytest.mark.parametrize("installed, too_old", [("2.1.2", True), ("1.13.1+cu117", True), ("2.2.0", False),
                                               ("2.5.1+cu121", False), ("2.10.0.dev20250101", False)])
def test_the_gpu_path_says_when_the_installed_torch_is_too_old(monkeypatch, installed, too_old):
    monkeypatch.setattr(dependencies, "is_installed", lambda module: True)
    monkeypatch.setattr(dependencies.importlib.metadata, "version", lambda name: installed)
    message = dependencies.torch_too_old("gpu")
    assert (message is not None) == too_old
    assert message is None or (installed in message and f">={dependencies.MIN_TORCH}" in message)
    assert dependencies.torch_too_old("cpu") is None  # the CPU path never runs torch


def test_one_download_or_install_at_a_time_for_module_and_effect_together():
    from SAMLessSegmentationLib.job import Preparation

    with Preparation():
        with pytest.raises(SamlessError, match="still downloading a model or installing packages"):
            with Preparation():
                pass
        assert Preparation.active
    assert not Preparation.active
    with pytest.raises(RuntimeError), Preparation():  # a failure inside frees it too
        raise RuntimeError("download failed")
    with Preparation():
        pass
