"""SAMLess MS lesion segmentation: the module, its panel and its self-test.

Qt glue only. Files, the background process, the results in the scene, models and downloads are
in SAMLessSegmentationLib (tested headless); the helpers at the top are shared with the Segment
Editor effect (SegmentEditorSAMLessLib).
"""

from __future__ import annotations

import functools
import importlib
import logging
import subprocess
import time
import traceback
from pathlib import Path

import numpy as np
import qt
import SimpleITK as sitk
import slicer
from SAMLessSegmentationLib import (
    TERMINOLOGY_FILE,
    bundled_model_dirs,
    change,
    dependencies,
    models,
    resource_path,
    results,
    sample_data_source,
    sample_volume_path,
    terminology,
    volumes,
)
from SAMLessSegmentationLib.job import FollowupJob, Preparation, SegmentationJob
from SAMLessSegmentationLib.process import InferenceProcess, ProcessFailed, python_executable, run_options
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from samless.errors import SamlessError
from samless.options import SegmentOptions
from samless.package import DEFAULT_MODEL, ModelCard, ModelPackage, load_package

SETTINGS = "SAMLessSegmentation"
REQUESTER = "SAMLess"
# Panel selectors for the modalities a model may ask for, by the name its card uses.
MODALITY_SELECTORS = {"FLAIR": "inputVolumeSelector", "T1": "t1VolumeSelector", "T2": "t2VolumeSelector"}


class SAMLessSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SAMLess MS Lesions")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "Terminologies"]
        self.parent.contributors = ["SAMLessSegmentation developers"]
        self.parent.helpText = _(
            "One-click segmentation of multiple sclerosis lesions on brain FLAIR MRI (MS-SAMLess: a small "
            "network that learned from the Segment Anything Model, which it no longer needs). Choose the FLAIR "
            "and click Apply. Research software, not for clinical use. "
            '<a href="https://github.com/SAMLessSegmentation/SAMLessSegmentation/blob/main/docs/slicer.md">'
            "User guide</a>."
        )
        self.parent.acknowledgementText = _(
            "The method follows MS-SAMLess and AutoSAM. Inference runs in a separate process with ONNX Runtime "
            "or PyTorch."
        )
        slicer.app.connect("startupCompleted()", registerTerminology)
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerTerminology() -> None:
    """Offer "MS lesion" in Slicer's terminology selector."""
    try:
        terminology.register_terminology(slicer.modules.terminologies.logic(), resource_path(TERMINOLOGY_FILE))
    except (AttributeError, ValueError) as exc:
        logging.warning(f"SAMLess: could not register the MS lesion terminology: {exc}")


def packageReport() -> str:
    """What the Log shows before the first run: the core's version and those of the packages it runs with."""
    from samless import __version__

    installed = [f"{name} {version or _('not installed')}" for name, version in dependencies.package_versions().items()]
    return _("SAMLess {version}; packages: {packages}").format(version=__version__, packages=", ".join(installed))


def registerSampleData() -> None:
    """The bundled sample FLAIR in the Sample Data module: one click to try SAMLess, read from the
    installation (no download)."""
    source = sample_data_source()
    if source is None:
        return
    try:
        import SampleData

        SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        logging.warning(f"SAMLess: could not offer the sample in Sample Data: {exc}")


# --- shared with the Segment Editor effect ------------------------------------------------------------

def setting(key: str, default: str = "") -> str:
    value = qt.QSettings().value(f"{SETTINGS}/{key}")
    return str(value) if value not in (None, "") else default


def setSetting(key: str, value: str) -> None:
    qt.QSettings().setValue(f"{SETTINGS}/{key}", value)


def modelChoice() -> str:
    """The model chosen in the panel: a registry name or models.local_choice(path)."""
    return setting("Model", DEFAULT_MODEL)


def deviceChoice() -> str:
    return setting("Device", "auto")


def modelCard(choice: str) -> dict | None:
    """The card of `choice` where the package is on disk (None until a registry model is downloaded)."""
    return models.choice_card(choice, registry(), cacheDir(), bundled_model_dirs())


def threePlaneOption(checked: bool) -> bool | None:
    """The panel's three-plane box as the core's option: checked, the model's own planes (fused where it was
    trained on three); unchecked, axial slices only."""
    return None if checked else False


def threePlaneChoice() -> bool:
    """Fuse the three planes of a model trained on them (the module's checkbox; the effect follows it)."""
    return setting("ThreePlane", "true") != "false"


def bordersOption(checked: bool) -> bool | None:
    """The panel's borders box as the core's option: checked, as the model card says (grown where it has
    border settings); unchecked, the network's own borders."""
    return None if checked else False


def bordersChoice() -> bool:
    """Grow lesion borders where the model has border settings (the module's checkbox; the effect follows it)."""
    return setting("GrowBorders", "true") != "false"


def cacheDir() -> Path:
    return Path(setting("CacheDirectory") or models.default_cache_dir())


def registry() -> list[models.ModelEntry]:
    try:
        return models.load_registry(resource_path(models.REGISTRY_FILE))
    except SamlessError as exc:
        logging.error(str(exc))
        return []


@functools.lru_cache(maxsize=1)
def lesionTerminology() -> terminology.LesionTerminology:
    return terminology.load_terminology(resource_path(TERMINOLOGY_FILE))


def changeTerminologies() -> dict[str, terminology.LesionTerminology]:
    """The entries of the follow-up's New, Enlarging and Stable segments."""
    path = resource_path(TERMINOLOGY_FILE)
    return {label: terminology.load_terminology(path, label) for _, _, label in change.CHANGE_SEGMENTS}


def showError(message: str, details: str = "") -> None:
    extra = {"detailedText": details} if details else {}
    slicer.util.errorDisplay(message, windowTitle=_("SAMLess"), **extra)


def runGuarded(function, *args) -> None:
    """Run a GUI action; problems a user can fix are shown plainly, others with their traceback."""
    try:
        function(*args)
    except SamlessError as exc:
        showError(str(exc))
    except Exception as exc:
        logging.exception("SAMLess")
        showError(_("Unexpected error: {error}").format(error=exc), traceback.format_exc())


def prepareModel(choice: str) -> tuple[Path, ModelPackage] | None:
    """The verified package of `choice` (downloaded and its card read first if needed); None if declined."""
    entry, path = models.resolve_choice(choice, registry(), cacheDir(), bundled_model_dirs())
    if path is None:
        path = downloadModel(entry)
        if path is None:
            return None
    package = load_package(path)
    if not models.is_acknowledged(package, cacheDir()):
        if not showModelCard(package, entry, ask=True):
            return None
        models.acknowledge(package, cacheDir())
    return path, package


def downloadModel(entry: models.ModelEntry) -> Path | None:
    """Download a registry model into the user cache with a cancellable progress dialog."""
    size = f"{entry.size_bytes / 1e6:.0f} MB"
    if not slicer.util.confirmOkCancelDisplay(
            _("Model \"{title}\" ({size}) is not on this computer yet. Download it now from\n{url}?").format(
                title=entry.title, size=size, url=entry.url), windowTitle=_("SAMLess")):
        return None
    download = models.BackgroundDownload(entry, cacheDir()).start()
    dialog = slicer.util.createProgressDialog(labelText=_("Downloading {title}...").format(title=entry.title),
                                              windowTitle=_("SAMLess"), maximum=100)
    while not download.finished:  # the download runs in a thread; keep the application responsive
        if dialog.wasCanceled:
            download.cancel()
        dialog.value = int(100 * download.done_bytes / max(download.total_bytes, 1))
        slicer.app.processEvents()
        time.sleep(0.05)
    dialog.close()
    if isinstance(download.error, models.DownloadCancelled):
        return None
    if download.error is not None:
        raise download.error
    return download.path


def showModelCard(package: ModelPackage, entry: models.ModelEntry | None = None, ask: bool = False) -> bool:
    """Show the model card; with `ask`, return whether the user accepted it."""
    if slicer.app.testingEnabled():
        return True  # self-tests run unattended
    box = qt.QMessageBox(slicer.util.mainWindow())
    box.setWindowTitle(_("Model card: {name}").format(name=package.name))
    box.setIcon(qt.QMessageBox.Information)
    box.setText(models.card_text(package, entry))
    if ask:
        box.setInformativeText(_("Please read the model card before the first use."))
        box.setStandardButtons(qt.QMessageBox.Ok | qt.QMessageBox.Cancel)
        box.button(qt.QMessageBox.Ok).setText(_("I have read it"))
    return box.exec_() == qt.QMessageBox.Ok


def ensureDependencies(device: str) -> bool:
    """Install what the background process needs, asking first; never replace what Slicer ships."""
    if dependencies.torch_too_old(device):
        raise SamlessError(dependencies.torch_too_old(device))
    if dependencies.needs_torch(device) and not installTorch():
        return False
    missing = dependencies.missing_requirements(device)
    if not missing:
        return True
    constraints = constraintsFile()
    try:
        packaging = importlib.import_module("slicer.packaging")
    except ImportError:
        packaging = None
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        try:  # asks the user, shows progress, keeps the application responsive
            packaging.pip_ensure(missing, constraints=constraints, requester=REQUESTER)
        except RuntimeError:  # declined
            return False
        except subprocess.CalledProcessError as exc:  # pip itself failed
            raise SamlessError(_("Installing Python packages failed (pip exit code {code}); see the Python "
                                 "console for pip's messages.").format(code=exc.returncode)) from None
    else:  # Slicer 5.8 and 5.10 have no slicer.packaging (5.12 has): ask, then run pip in the background ourselves
        if not slicer.util.confirmOkCancelDisplay(
                _("SAMLess needs a few Python packages (ONNX Runtime and small helpers). Install them now?"),
                windowTitle=_("SAMLess"), detailedText="\n".join(missing)):
            return False
        if not pipInstall([*missing, "-c", constraints]):
            return False
    return not dependencies.missing_requirements(device)


def pipInstall(arguments: list[str]) -> bool:
    """`pip install` in a background process with a busy dialog (Slicer stays responsive). It cannot be
    cancelled: pip stopped half-way can leave a broken package in Slicer's Python."""
    pip = InferenceProcess([python_executable(), "-m", "pip", "install", *arguments],
                           env=slicer.util.startupEnvironment(), label="pip").start()
    dialog = slicer.util.createProgressDialog(labelText=_("Installing Python packages (about a minute)..."),
                                              windowTitle=_("SAMLess"), maximum=0)
    try:
        dialog.setCancelButton(None)
    except (AttributeError, TypeError, ValueError):  # no button to hide: a cancel is ignored below anyway
        pass
    try:
        while not pip.finished:  # never pip.cancel(): see above
            slicer.app.processEvents()
            time.sleep(0.05)
    finally:
        dialog.close()
    failure = pip.error()
    if failure is not None:
        raise SamlessError(_("Installing Python packages failed: {message}\n\n{details}").format(
            message=failure.message, details=failure.details[-2000:]))
    return True


def constraintsFile() -> str:
    """A pip constraints file pinning what Slicer ships (numpy, SimpleITK), so installs never replace it."""
    path = cacheDir() / "pip-constraints.txt"  # one file, rewritten each time: no temporary folder left behind
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(dependencies.constraints()) + "\n", encoding="utf-8")
    return str(path)


def installTorch() -> bool:
    """PyTorch through the PyTorch extension, which picks the build that matches the GPU driver."""
    try:
        import PyTorchUtils
    except ImportError:
        showError(_("GPU inference needs the PyTorch extension. Install \"PyTorch\" from the Extensions Manager "
                    "and restart Slicer, or choose CPU."))
        return False
    return PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=True, torchVersionRequirement=f">={dependencies.MIN_TORCH}") is not None


def startJob(inputs, path: Path, options: SegmentOptions) -> SegmentationJob:
    """Start `samless segment` in the background, in the environment Slicer was started with."""
    return SegmentationJob(inputs, path, options, env=slicer.util.startupEnvironment()).start()


def showProgress(progressBar, job) -> None:
    """A running job's fraction done and stage on a progress bar."""
    stage = job.process.stage if job.process else ""
    progressBar.value = int(100 * job.fraction)
    progressBar.setFormat(f"{stage} %p%" if stage else "%p%")


def finishJob(job, statusLabel, failedTitle: str, importResults, logView=None) -> None:
    """Bring a finished job's results in with `importResults(job)`, or say why there are none (cancelled,
    failed with the core's message, or an unexpected error with its traceback); its files go either way.
    `logView` (a text box) gets the run's log."""
    if logView is not None and job.process is not None:
        logView.setPlainText(job.process.log_text())
    try:
        importResults(job)
    except ProcessFailed as exc:
        if job.process.cancelled:
            statusLabel.text = _("Cancelled.")
        else:
            statusLabel.text = _("Failed.")
            showError(_("{title}: {message}").format(title=failedTitle, message=exc.message), exc.details)
    except SamlessError as exc:
        statusLabel.text = _("Failed.")
        showError(str(exc))
    except Exception as exc:
        logging.exception("SAMLess")
        statusLabel.text = _("Failed.")
        showError(_("Unexpected error: {error}").format(error=exc), traceback.format_exc())
    finally:
        job.cleanup()


class JobMonitor:
    """Polls a running job from a timer, so Slicer stays responsive while the process works."""

    def __init__(self, onProgress, onFinished, intervalMs: int = 200):
        self.job = None
        self.onProgress, self.onFinished = onProgress, onFinished
        self.timer = qt.QTimer()
        self.timer.setInterval(intervalMs)
        self.timer.connect("timeout()", self._poll)

    def start(self, job: SegmentationJob) -> None:
        self.job = job
        self.timer.start()

    def stop(self) -> None:
        """Stop polling (the job itself is left as it is)."""
        self.timer.stop()
        self.job = None

    def _poll(self) -> None:
        job = self.job
        if job is None:
            self.timer.stop()
            return
        job.poll()
        self.onProgress(job)
        if job.finished:
            self.timer.stop()
            self.job = None
            self.onFinished(job)


# --- the panel ----------------------------------------------------------------------------------------

def confirmReplaceEdits(segmentation) -> bool:
    """Ask before SAMLess replaces a lesion segment the user has edited by hand."""
    return slicer.util.confirmYesNoDisplay(
        _("The MS lesion segment of {name} was edited by hand since SAMLess wrote it. Replace your edits with "
          "the new result?").format(name=segmentation.GetName()), windowTitle=_("SAMLess"))


class SAMLessSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.job = None
        self.jobNodes = None  # (reference volume, output segmentation or None) of the running job
        self.followupJob = None
        self.followupNodes = None  # (baseline, follow-up) volumes of the running follow-up
        self.changeSegmentation = None  # the follow-up result the panel shows
        self.replaceEdits = False  # the user agreed, before this run, to replace their edits of its output
        self.defaultsKey = ""  # which model's defaults the sliders were last given (models.defaults_update)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAMLessSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.monitor = JobMonitor(self.onProgress, self.onJobFinished)
        self.followupMonitor = JobMonitor(self.onFollowupProgress, self.onFollowupFinished)
        self.rethresholdTimer = qt.QTimer()  # waits for the slider to settle
        self.rethresholdTimer.setSingleShot(True)
        self.rethresholdTimer.setInterval(250)
        self.rethresholdTimer.connect("timeout()", lambda: runGuarded(self.onRethreshold))

        for text, device in ((_("Auto"), "auto"), (_("CPU"), "cpu"), (_("GPU"), "gpu")):
            self.ui.deviceComboBox.addItem(text, device)
        self.ui.deviceComboBox.currentIndex = max(0, self.ui.deviceComboBox.findData(deviceChoice()))
        self.ui.ttaCheckBox.checked = setting("TestTimeAugmentation") == "true"
        self.ui.threePlaneCheckBox.checked = threePlaneChoice()
        self.ui.bordersCheckBox.checked = bordersChoice()
        self.fillModels()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", lambda index: self.onModelChanged())
        self.ui.browseModelButton.connect("clicked(bool)", lambda checked: runGuarded(self.onBrowseModel))
        self.ui.modelCardButton.connect("clicked(bool)", lambda checked: runGuarded(self.onShowModelCard))
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.ttaCheckBox.connect("toggled(bool)", lambda on: setSetting("TestTimeAugmentation", str(on).lower()))
        self.ui.threePlaneCheckBox.connect("toggled(bool)", lambda on: setSetting("ThreePlane", str(on).lower()))
        self.ui.bordersCheckBox.connect("toggled(bool)", lambda on: setSetting("GrowBorders", str(on).lower()))
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateApplyButton)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged)
        self.ui.thresholdSliderWidget.connect("valueChanged(double)", self.onSettingsChanged)
        self.ui.minimumSizeSliderWidget.connect("valueChanged(double)", self.onSettingsChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.lesionTableView.connect("selectionChanged()", lambda: runGuarded(self.onLesionSelected))
        self.ui.baselineVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateFollowupButton)
        self.ui.followupVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateFollowupButton)
        self.ui.followupApplyButton.connect("clicked(bool)", self.onFollowupButton)
        self.ui.flickButton.connect("clicked(bool)", lambda checked: change.flick(slicer.mrmlScene))
        self.ui.show3DButton.connect("toggled(bool)", lambda on: runGuarded(self.onShow3D, on))
        self.ui.freeDownloadsButton.connect("clicked(bool)", lambda checked: runGuarded(self.onFreeDownloads))
        self.ui.changeTableView.connect("selectionChanged()", lambda: runGuarded(self.onChangeSelected))
        self.onModelChanged()
        self.onOutputChanged(self.ui.outputSegmentationSelector.currentNode())
        self.updateApplyButton()
        self.showChange(None)
        self.showDownloads()
        self.ui.logTextEdit.setPlainText(packageReport())

    def cleanup(self) -> None:
        self.removeObservers()
        for monitor in (self.monitor, self.followupMonitor):
            monitor.timer.stop()
        for job in (self.job, self.followupJob):
            if job:
                job.cleanup()

    def onSceneStartClose(self, caller, event) -> None:
        for job in (self.job, self.followupJob):
            if job:
                job.cancel()  # the job's nodes are going away
        self.showChange(None)

    # Models and settings

    def fillModels(self) -> None:
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for entry in registry():
            combo.addItem(entry.title, entry.name)
        choice = modelChoice()
        if choice.startswith(models.LOCAL_PREFIX):
            combo.addItem(_("Local: {name}").format(name=Path(choice[len(models.LOCAL_PREFIX):]).name), choice)
        combo.currentIndex = max(0, combo.findData(choice))
        combo.blockSignals(wasBlocked)

    def currentModelChoice(self) -> str:
        return self.ui.modelComboBox.itemData(self.ui.modelComboBox.currentIndex) or DEFAULT_MODEL

    def selectModel(self, choice: str) -> None:
        setSetting("Model", choice)
        self.fillModels()
        self.onModelChanged()

    def onModelChanged(self) -> None:
        """Show the chosen model's inputs (T1/T2 selectors only if it needs them) and use its defaults."""
        setSetting("Model", self.currentModelChoice())
        try:
            entry, path = models.resolve_choice(self.currentModelChoice(), registry(), cacheDir(),
                                                bundled_model_dirs())
            card = models.peek_card(path) if path else None
        except SamlessError as exc:  # shown where the model is chosen; Apply reports it again
            self.ui.modelInfoLabel.text = str(exc)
            self.showPlaneChoice(None)
            return
        modalities = list(card.inputs.modalities) if card else list(entry.modalities)
        for modality in ("T1", "T2"):
            getattr(self.ui, MODALITY_SELECTORS[modality]).visible = modality in modalities
            getattr(self.ui, f"{modality.lower()}Label").visible = modality in modalities
        self.showPlaneChoice(card)
        self.ui.modelInfoLabel.text = _("Inputs: {inputs}{download}").format(
            inputs=", ".join(modalities), download="" if path else _(" (downloaded on first use)"))
        self.applyModelDefaults(card)

    def applyModelDefaults(self, card: ModelCard | None) -> None:
        """The model card's threshold and minimum size on the sliders (the effect does the same), unless the
        output segmentation keeps the settings it was made with."""
        self.defaultsKey, defaults = models.defaults_update(self.defaultsKey, self.currentModelChoice(), card)
        if defaults and results.stored_settings(self.ui.outputSegmentationSelector.currentNode()) is None:
            self.setSliders(defaults["threshold"], defaults["min_lesion_mm3"])

    def showPlaneChoice(self, card: ModelCard | None) -> None:
        """The Three planes checkbox, only for a model trained on them, and the borders checkbox, only for a
        model with border settings (both unknown until it is downloaded)."""
        for widget in (self.ui.threePlaneCheckBox, self.ui.threePlaneLabel):
            widget.visible = bool(card) and card.inputs.three_plane
        for widget in (self.ui.bordersCheckBox, self.ui.bordersLabel):
            widget.visible = bool(card) and bool(card.postprocessing.borders)

    def onBrowseModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Choose a model package"), "",
                                              _("Model package (model.json *.zip)"))
        if not path:
            return
        load_package(Path(path).parent if Path(path).name == "model.json" else path)
        self.selectModel(models.local_choice(path))

    def onShowModelCard(self) -> None:
        entry, path = models.resolve_choice(self.currentModelChoice(), registry(), cacheDir(), bundled_model_dirs())
        if path is None:
            slicer.util.infoDisplay(entry.description + "\n\n" + entry.intended_use, windowTitle=entry.title)
            return
        showModelCard(load_package(path), entry)

    def onDeviceChanged(self, index: int) -> None:
        setSetting("Device", self.ui.deviceComboBox.itemData(index))

    def currentDevice(self) -> str:
        return self.ui.deviceComboBox.itemData(self.ui.deviceComboBox.currentIndex)

    def setSliders(self, threshold: float, minimumSize: float) -> None:
        for slider, value in ((self.ui.thresholdSliderWidget, threshold), (self.ui.minimumSizeSliderWidget,
                                                                            minimumSize)):
            wasBlocked = slider.blockSignals(True)
            slider.value = value
            slider.blockSignals(wasBlocked)

    # Running

    def updateApplyButton(self, *args) -> None:
        running = self.job is not None
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = running or self.ui.inputVolumeSelector.currentNode() is not None
        self.ui.progressBar.visible = running
        for name in ("inputsCollapsibleButton", "settingsCollapsibleButton", "outputsCollapsibleButton"):
            getattr(self.ui, name).enabled = not running

    def inputNodes(self, modalities: list[str]) -> list:
        nodes = []
        for modality in modalities:
            selector = MODALITY_SELECTORS.get(modality)
            node = getattr(self.ui, selector).currentNode() if selector else None
            if node is None:
                raise SamlessError(_("This model needs a {modality} volume: select one under Inputs.").format(
                    modality=modality))
            nodes.append(node)
        return nodes

    def onApplyButton(self) -> None:
        if self.job:
            self.job.cancel()  # the button reads Cancel while running
            return
        runGuarded(self.startSegmentation)

    def startSegmentation(self) -> None:
        output = self.ui.outputSegmentationSelector.currentNode()
        self.replaceEdits = False
        if output is not None and results.edited_by_hand(output):  # ask before the wait, not after it
            if not confirmReplaceEdits(output):
                return
            self.replaceEdits = True
        prepared = self.prepareRun()
        if prepared is None:
            return
        path, package = prepared
        inputs = self.inputNodes(package.modalities)
        options = self.panelOptions()
        self.jobNodes = (inputs[0], self.ui.outputSegmentationSelector.currentNode())
        self.job = startJob(inputs, path, options)
        self.monitor.start(self.job)
        self.ui.statusLabel.text = _("Segmenting {name}...").format(name=inputs[0].GetName())
        self.ui.progressBar.value = 0
        self.updateApplyButton()

    def prepareRun(self) -> tuple[Path, ModelPackage] | None:
        """The chosen model, downloaded and verified, with the packages its device needs; None if the user
        stopped that. The sliders take the card's defaults where they still showed another model's."""
        with Preparation():
            prepared = prepareModel(self.currentModelChoice())
            if prepared is None or not ensureDependencies(self.currentDevice()):
                return None
        self.showDownloads()  # a model may have been downloaded just now
        card = prepared[1].card
        self.showPlaneChoice(card)  # a model downloaded just now: its card is known only from here
        self.applyModelDefaults(card)
        return prepared

    def panelOptions(self) -> SegmentOptions:
        """The core's options for what the panel shows (device, threshold, minimum size, TTA, planes)."""
        return run_options(self.currentDevice(), threshold=self.ui.thresholdSliderWidget.value,
                           min_lesion_mm3=self.ui.minimumSizeSliderWidget.value, tta=self.ui.ttaCheckBox.checked,
                           three_plane=threePlaneOption(self.ui.threePlaneCheckBox.checked),
                           borders=bordersOption(self.ui.bordersCheckBox.checked))

    def onProgress(self, job: SegmentationJob) -> None:
        showProgress(self.ui.progressBar, job)

    def onJobFinished(self, job: SegmentationJob) -> None:
        finishJob(job, self.ui.statusLabel, _("Segmentation failed"), self.importResults, self.ui.logTextEdit)
        self.job = None
        self.updateApplyButton()

    def importResults(self, job: SegmentationJob) -> None:
        outputs = job.outputs()
        reference, output = self.jobNodes
        if not slicer.mrmlScene.IsNodePresent(reference):
            raise SamlessError(_("The input volume was removed during the run; nothing was added."))
        if output is not None and not slicer.mrmlScene.IsNodePresent(output):
            output = None
        try:
            result = results.import_results(slicer.mrmlScene, reference, outputs, lesionTerminology(), output,
                                            replace_edits=self.replaceEdits)
        except results.EditedByHand:  # edited while the network ran
            if not confirmReplaceEdits(output):
                self.ui.statusLabel.text = _("Not written: the lesion segment keeps your edits.")
                return
            result = results.import_results(slicer.mrmlScene, reference, outputs, lesionTerminology(), output,
                                            replace_edits=True)
        self.ui.outputSegmentationSelector.setCurrentNode(result.segmentation)
        slicer.util.setSliceViewerLayers(background=reference, fit=True)
        seconds = job.process.done_event().get("seconds", 0)
        self.ui.statusLabel.text = _("Done in {seconds:.0f} s.").format(seconds=seconds)

    # Results

    def onOutputChanged(self, node) -> None:
        stored = results.stored_settings(node)
        if stored:
            self.setSliders(*stored)
        self.showResult(node)

    def showResult(self, segmentation) -> None:
        table = segmentation.GetNodeReference(results.TABLE_REFERENCE) if segmentation else None
        summary = results.lesion_summary(table)
        self.ui.resultsCollapsibleButton.visible = summary is not None
        self.ui.lesionTableView.setMRMLTableNode(table)
        wasBlocked = self.ui.show3DButton.blockSignals(True)
        self.ui.show3DButton.checked = segmentation is not None and results.shown_in_3d(segmentation)
        self.ui.show3DButton.blockSignals(wasBlocked)
        if summary:
            count, totalMl = summary
            self.ui.lesionCountLabel.text = str(count)
            self.ui.totalVolumeLabel.text = _("{ml:.2f} mL ({mm3:.0f} mm³)").format(ml=totalMl, mm3=totalMl * 1000)

    def onSettingsChanged(self, value: float) -> None:
        if self.job is None and results.stored_settings(self.ui.outputSegmentationSelector.currentNode()):
            self.rethresholdTimer.start()

    def onRethreshold(self) -> None:
        """Apply the new threshold / minimum size to the stored probability map (no network)."""
        segmentation = self.ui.outputSegmentationSelector.currentNode()
        if self.job is not None or results.stored_settings(segmentation) is None:
            return
        settings = (self.ui.thresholdSliderWidget.value, self.ui.minimumSizeSliderWidget.value)
        try:
            results.rethreshold(segmentation, *settings)
        except results.EditedByHand:
            if not confirmReplaceEdits(segmentation):
                self.setSliders(*results.stored_settings(segmentation))  # the sliders show what the segment holds
                return
            results.rethreshold(segmentation, *settings, replace_edits=True)
        self.showResult(segmentation)

    def onLesionSelected(self) -> None:
        segmentation = self.ui.outputSegmentationSelector.currentNode()
        indexes = self.ui.lesionTableView.selectionModel().selectedIndexes()
        if segmentation is None or not indexes:
            return
        lesionId = int(indexes[0].sibling(indexes[0].row(), 0).data())  # column 0: lesion number
        table = segmentation.GetNodeReference(results.TABLE_REFERENCE)
        results.jump_to_lesion(segmentation, results.lesion_row(table, lesionId))


    def onShow3D(self, on: bool) -> None:
        segmentation = self.ui.outputSegmentationSelector.currentNode()
        if segmentation is not None:
            results.show_3d(segmentation, on)

    def showDownloads(self) -> None:
        downloads = models.cached_downloads(cacheDir())
        megabytes = sum(size for _, size in downloads) / 1e6
        self.ui.downloadsInfoLabel.text = _("{count} ({mb:.0f} MB)").format(count=len(downloads), mb=megabytes)
        self.ui.freeDownloadsButton.enabled = bool(downloads)

    def onFreeDownloads(self) -> None:
        if self.job is not None or self.followupJob is not None or Preparation.active:
            raise SamlessError(_("Wait for the running job or download to finish, then free the downloads."))
        if not slicer.util.confirmYesNoDisplay(_("Delete the models SAMLess downloaded? Bundled models stay; a "
                                                 "model is downloaded again when it is next chosen."),
                                               windowTitle=_("SAMLess")):
            return
        freed = models.remove_downloads(cacheDir())
        self.showDownloads()
        self.onModelChanged()
        slicer.util.showStatusMessage(_("SAMLess: {mb:.0f} MB freed.").format(mb=freed / 1e6), 5000)

    # Follow-up

    def updateFollowupButton(self, *args) -> None:
        running = self.followupJob is not None
        nodes = (self.ui.baselineVolumeSelector.currentNode(), self.ui.followupVolumeSelector.currentNode())
        ready = all(nodes) and nodes[0] is not nodes[1]
        self.ui.followupApplyButton.text = _("Cancel") if running else _("Compare")
        self.ui.followupApplyButton.enabled = running or ready
        self.ui.followupProgressBar.visible = running
        for widget in (self.ui.baselineVolumeSelector, self.ui.followupVolumeSelector):
            widget.enabled = not running

    def onFollowupButton(self) -> None:
        if self.followupJob:
            self.followupJob.cancel()  # the button reads Cancel while running
            return
        runGuarded(self.startFollowup)

    def startFollowup(self) -> None:
        prepared = self.prepareRun()
        if prepared is None:
            return
        path, package = prepared
        if len(package.modalities) != 1:
            raise SamlessError(_("Follow-up needs a FLAIR-only model; {name} takes {inputs}. Choose another model "
                                 "under Inputs.").format(name=package.name, inputs=", ".join(package.modalities)))
        nodes = (self.ui.baselineVolumeSelector.currentNode(), self.ui.followupVolumeSelector.currentNode())
        self.followupNodes = nodes
        self.followupJob = FollowupJob(list(nodes), path, self.panelOptions(), env=slicer.util.startupEnvironment(),
                                       allow_poor_registration=self.ui.allowPoorRegistrationCheckBox.checked).start()
        self.followupMonitor.start(self.followupJob)
        self.ui.followupStatusLabel.text = _("Comparing {baseline} with {followup}...").format(
            baseline=nodes[0].GetName(), followup=nodes[1].GetName())
        self.ui.followupProgressBar.value = 0
        self.updateFollowupButton()

    def onFollowupProgress(self, job: FollowupJob) -> None:
        showProgress(self.ui.followupProgressBar, job)

    def onFollowupFinished(self, job: FollowupJob) -> None:
        finishJob(job, self.ui.followupStatusLabel, _("Follow-up failed"), self.importChange, self.ui.logTextEdit)
        self.followupJob = None
        self.updateFollowupButton()

    def importChange(self, job: FollowupJob) -> None:
        outputs = job.outputs()
        baseline, followup = self.followupNodes
        if not all(slicer.mrmlScene.IsNodePresent(node) for node in (baseline, followup)):
            raise SamlessError(_("A volume of the pair was removed during the run; nothing was added."))
        result = change.import_change(slicer.mrmlScene, followup, baseline.GetName(), outputs, changeTerminologies())
        slicer.util.setSliceViewerLayers(background=followup, fit=True)
        change.show_for_flicking(slicer.mrmlScene, followup, result.baseline_registered)
        self.showChange(result.segmentation)
        seconds = job.process.done_event().get("seconds", 0)
        self.ui.followupStatusLabel.text = _("Done in {seconds:.0f} s.").format(seconds=seconds)

    def showChange(self, segmentation) -> None:
        """The summary and table of a follow-up result (None: hide them)."""
        report = change.change_report(segmentation)
        table = segmentation.GetNodeReference(results.TABLE_REFERENCE) if report else None
        self.changeSegmentation = segmentation if report else None
        for widget in (self.ui.changeSummaryLabel, self.ui.flickButton, self.ui.changeTableView):
            widget.visible = report is not None
        self.ui.changeTableView.setMRMLTableNode(table)
        if report:
            s = report["summary"]
            text = _("{new} new, {enlarging} enlarging, {stable} stable lesions; lesion volume {before:.2f} mL "
                     "→ {after:.2f} mL.").format(new=s["new_lesions"], enlarging=s["enlarging_lesions"],
                                                 stable=s["stable_lesions"], before=s["volume_baseline_ml"],
                                                 after=s["volume_followup_ml"])
            warnings = report.get("warnings") or []
            self.ui.changeSummaryLabel.text = "\n".join([text, *(_("Warning: ") + w for w in warnings)])

    def onChangeSelected(self) -> None:
        segmentation = self.changeSegmentation
        indexes = self.ui.changeTableView.selectionModel().selectedIndexes()
        if segmentation is None or not indexes:
            return
        lesionId = int(indexes[0].sibling(indexes[0].row(), 0).data())  # column 0: lesion number
        timepoint = str(indexes[0].sibling(indexes[0].row(), 2).data())  # column 2: its timepoint
        table = segmentation.GetNodeReference(results.TABLE_REFERENCE)
        results.jump_to_lesion(segmentation, change.change_row(table, lesionId, timepoint))


class SAMLessSegmentationLogic(ScriptedLoadableModuleLogic):
    """Scripting entry point: segment a volume and wait (the panel uses the non-blocking path)."""

    def segment(self, flair, model: str = DEFAULT_MODEL, options: SegmentOptions | None = None,
                timeoutSeconds: float = 3600) -> results.LesionResult:
        prepared = prepareModel(model)
        if prepared is None:
            raise SamlessError("the model was not accepted.")
        job = startJob([flair], prepared[0], options or run_options())
        try:
            waitFor(lambda: (job.poll(), job.finished)[1], timeoutSeconds)
            return results.import_results(slicer.mrmlScene, flair, job.outputs(), lesionTerminology())
        finally:
            job.cleanup()


def waitFor(condition, timeoutSeconds: float) -> None:
    """Process events until `condition()` holds (scripts and tests; the panel never waits)."""
    deadline = time.monotonic() + timeoutSeconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"still running after {timeoutSeconds} s")
        slicer.app.processEvents()
        time.sleep(0.05)


# --- self-test ----------------------------------------------------------------------------------------

def syntheticFlair(name: str = "SyntheticFLAIR"):
    """A FLAIR-like head with bright lesions, when the installation has no sample (numpy only)."""
    size = np.array([40, 112, 96])  # k, j, i
    spacing = np.array([3.0, 1.2, 1.2])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1) * spacing
    centre = grid.reshape(-1, 3).mean(0)
    radius = np.sqrt((((grid - centre) / np.array([55.0, 62.0, 50.0])) ** 2).sum(-1))
    voxels = np.where(radius <= 1, np.where(radius > 0.88, 150.0, 100.0), 5.0)
    for offset, r in (((0, 10, 12), 6.0), ((6, -15, -10), 4.0), ((-9, 5, -18), 3.5)):
        voxels[((grid - centre - np.array(offset)) ** 2).sum(-1) <= r * r] = 260.0
    voxels += np.random.default_rng(0).normal(0, 3, voxels.shape)
    image = sitk.GetImageFromArray(voxels.astype(np.float32))
    image.SetSpacing([float(s) for s in spacing[::-1]])
    node = slicer.mrmlScene.AddNode(volumes.new_scalar_volume(image, name))
    node.CreateDefaultDisplayNodes()
    return node


class SAMLessSegmentationTest(ScriptedLoadableModuleTest):
    """Runs the effect and the module on the bundled sample (or a synthetic head) with the demo model."""

    def setUp(self):
        slicer.mrmlScene.Clear()
        setSetting("Model", DEFAULT_MODEL)
        setSetting("Device", "cpu")
        missing = dependencies.missing_requirements("cpu")
        if missing:  # pip_ensure installs nothing in testing mode: install directly
            slicer.util.pip_install([*missing, "-c", constraintsFile()])

    def runTest(self):
        self.setUp()
        self.test_effect_writes_the_selected_segment_and_undo_restores_it()
        self.setUp()
        self.test_module_segments_rethresholds_and_jumps()

    def loadFlair(self):
        path = sample_volume_path()
        return slicer.util.loadVolume(str(path)) if path else syntheticFlair()

    def lowThreshold(self, probability) -> float:
        """A threshold (within the sliders' range) that keeps something, whatever the model thinks of this volume."""
        highest = float(sitk.GetArrayViewFromImage(probability).max())
        self.assertGreater(highest, 0.1, "the model sees no lesion at all in this volume")
        return round(min(max(highest / 2, 0.05), 0.95), 2)  # the sliders keep two decimals

    def test_effect_writes_the_selected_segment_and_undo_restores_it(self):
        self.delayDisplay("Segment Editor effect")
        flair = self.loadFlair()
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(flair)
        segmentId = segmentation.GetSegmentation().AddEmptySegment()
        editor = slicer.qMRMLSegmentEditorWidget()
        editor.setMRMLScene(slicer.mrmlScene)
        editor.setMRMLSegmentEditorNode(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode"))
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(flair)
        editor.setCurrentSegmentID(segmentId)
        editor.setActiveEffectByName("SAMLess MS lesions")
        effect = editor.activeEffect()
        self.assertIsNotNone(effect, "the SAMLess effect is not registered")
        effect.self().onApply()
        waitFor(lambda: effect.self().job is None, 900)
        probability = effect.self().probability
        self.assertIsNotNone(probability, "the effect's run failed (see the log)")

        threshold = self.lowThreshold(probability)
        slider = effect.self().thresholdSlider
        wasBlocked = slider.blockSignals(True)  # one re-threshold, now, not another from the timer later
        slider.value = threshold
        slider.blockSignals(wasBlocked)
        self.assertAlmostEqual(slider.value, threshold)
        effect.self().onRethreshold()
        written = results.segment_voxels(segmentation, segmentId, flair)
        expected = results.relabel_probability(probability, threshold, effect.self().minimumSizeSlider.value).label
        self.assertGreater(written.sum(), 0)
        self.assertTrue(np.array_equal(written, sitk.GetArrayFromImage(expected) > 0))

        editor.undo()  # the re-threshold
        editor.undo()  # the first result
        self.assertEqual(results.segment_voxels(segmentation, segmentId, flair).sum(), 0)
        self.delayDisplay("Effect test passed")

    def test_module_segments_rethresholds_and_jumps(self):
        self.delayDisplay("Module panel")
        flair = self.loadFlair()
        slicer.util.selectModule("SAMLessSegmentation")
        widget = slicer.modules.samlesssegmentation.widgetRepresentation().self()
        widget.selectModel(DEFAULT_MODEL)
        widget.ui.deviceComboBox.currentIndex = widget.ui.deviceComboBox.findData("cpu")
        widget.ui.inputVolumeSelector.setCurrentNode(flair)
        widget.ui.outputSegmentationSelector.setCurrentNode(None)
        widget.onApplyButton()
        waitFor(lambda: widget.job is None, 900)

        segmentation = widget.ui.outputSegmentationSelector.currentNode()
        self.assertIsNotNone(segmentation, "the module's run failed (see the log)")
        segment = segmentation.GetSegmentation().GetSegment(results.SEGMENT_ID)
        self.assertEqual(segment.GetName(), "MS lesion")
        self.assertEqual(terminology.segment_terminology(segment), lesionTerminology().serialize())
        self.assertIs(segmentation.GetNodeReference("referenceImageGeometryRef"), flair)
        probabilityNode = segmentation.GetNodeReference(results.PROBABILITY_REFERENCE)
        probability = volumes.volume_to_sitk(probabilityNode)
        low, high = probabilityNode.GetImageData().GetScalarRange()
        self.assertTrue(0.0 <= low <= high <= 1.0)

        threshold = self.lowThreshold(probability)
        widget.ui.thresholdSliderWidget.value = threshold
        widget.ui.minimumSizeSliderWidget.value = 0.0
        self.assertAlmostEqual(widget.ui.thresholdSliderWidget.value, threshold)
        widget.onRethreshold()
        table = segmentation.GetNodeReference(results.TABLE_REFERENCE)
        count, _total = results.lesion_summary(table)
        self.assertGreater(count, 0)
        self.assertEqual(table.GetTable().GetNumberOfRows(), count)
        self.assertEqual(widget.ui.lesionCountLabel.text, str(count))
        expected = results.relabel_probability(probability, threshold, 0.0).label
        self.assertTrue(np.array_equal(results.segment_voxels(segmentation, results.SEGMENT_ID, flair),
                                       sitk.GetArrayFromImage(expected) > 0))

        world = results.jump_to_lesion(segmentation, 0)
        red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        centre = [red.GetSliceToRAS().GetElement(r, 3) for r in range(3)]
        self.assertTrue(np.allclose(centre, world, atol=1e-3))
        self.delayDisplay("Module test passed")
