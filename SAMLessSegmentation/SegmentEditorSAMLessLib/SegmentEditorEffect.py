"""The "SAMLess MS lesions" Segment Editor effect: Qt glue only.

Segments the source volume in the background (same process, progress and cancel as the module
panel) and writes the lesions into the selected segment through the Segment Editor, so that its
masking settings (editable area, overwrite policy) apply and Undo restores the previous state.
A run goes on when the effect is deactivated (the user leaves the Segment Editor, picks another
effect or segment): its result waits, and is written when the effect is active again.
"""

import logging
import os
import traceback

import ctk
import qt
import slicer
from SAMLessSegmentationLib import models, results, volumes
from SAMLessSegmentationLib.job import Preparation
from SAMLessSegmentationLib.process import run_options
from SAMLessSegmentationLib.terminology import apply_terminology
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect
from slicer.i18n import tr as _

from samless.errors import SamlessError
from SAMLessSegmentation import (
    JobMonitor,
    bordersChoice,
    bordersOption,
    deviceChoice,
    ensureDependencies,
    finishJob,
    lesionTerminology,
    modelCard,
    modelChoice,
    prepareModel,
    showError,
    showProgress,
    startJob,
    threePlaneChoice,
    threePlaneOption,
)


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """MS lesions from the source volume (FLAIR) into the selected segment."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "SAMLess MS lesions"
        scriptedEffect.title = _("SAMLess MS lesions")
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.job = None
        self.probability = None  # the last run's probability map (sitk), re-thresholded without the network
        self.target = None  # (segmentation node ID, segment ID) that run writes into
        self.connectivity = "full"  # how the last run joined voxels into lesions (its card's), for re-thresholds
        self.active = False
        self.pending = None  # a finished run's outputs, waiting for the effect to be active again
        self.monitor = JobMonitor(self.onProgress, self.onFinished)
        self.rethresholdTimer = qt.QTimer()  # waits for the slider to settle
        self.rethresholdTimer.setSingleShot(True)
        self.rethresholdTimer.setInterval(250)
        self.rethresholdTimer.connect("timeout()", self.onRethreshold)

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return _("<html>Segments multiple sclerosis lesions of the source volume (a FLAIR) into the selected "
                 "segment, in the background.<p>Masking settings apply; Undo restores the segment. Change the "
                 "threshold or minimum size afterwards to update the result without running the network again. "
                 "The model, device and planes are those chosen in the SAMLess MS Lesions module.<p>"
                 "Research software, not for clinical use.</html>")

    def setupOptionsFrame(self):
        self.modelLabel = qt.QLabel()
        self.scriptedEffect.addLabeledOptionsWidget(_("Model:"), self.modelLabel)
        self.thresholdSlider = self.slider(0.05, 0.95, 0.05, 2, "", _("Lesion probability a voxel needs"))
        self.scriptedEffect.addLabeledOptionsWidget(_("Threshold:"), self.thresholdSlider)
        self.minimumSizeSlider = self.slider(0.0, 200.0, 1.0, 0, " mm³", _("Smaller lesions are dropped"))
        self.scriptedEffect.addLabeledOptionsWidget(_("Minimum size:"), self.minimumSizeSlider)
        self.ttaCheckBox = qt.QCheckBox(_("Test-time augmentation (twice as slow)"))
        self.scriptedEffect.addOptionsWidget(self.ttaCheckBox)
        self.applyButton = qt.QPushButton(_("Apply"))
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.scriptedEffect.addOptionsWidget(self.applyButton)
        self.progressBar = qt.QProgressBar()
        self.progressBar.visible = False
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        for slider in (self.thresholdSlider, self.minimumSizeSlider):
            slider.connect("valueChanged(double)", self.onSettingsChanged)
        self.ttaCheckBox.connect("toggled(bool)", lambda on: self.updateMRMLFromGUI())
        self.applyButton.connect("clicked()", self.onApply)

    @staticmethod
    def slider(minimum, maximum, step, decimals, suffix, toolTip):
        slider = ctk.ctkSliderWidget()
        slider.minimum, slider.maximum, slider.singleStep, slider.decimals = minimum, maximum, step, decimals
        slider.suffix = suffix
        slider.toolTip = toolTip
        return slider

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor  # no painting: keep the normal cursor

    def setMRMLDefaults(self):
        defaults = models.postprocessing_defaults(modelCard(modelChoice()))
        self.scriptedEffect.setParameterDefault("Threshold", defaults["threshold"])
        self.scriptedEffect.setParameterDefault("MinimumLesionMm3", defaults["min_lesion_mm3"])
        self.scriptedEffect.setParameterDefault("TestTimeAugmentation", 0)
        self.scriptedEffect.setParameterDefault("DefaultsFor", "")

    def applyModelDefaults(self, card):
        """The model card's threshold and minimum size, as the module takes them, when the model (or what is
        known of its card) changed since they were last given; the user's values otherwise."""
        key, defaults = models.defaults_update(self.scriptedEffect.parameter("DefaultsFor"), modelChoice(), card)
        if defaults:
            self.scriptedEffect.setParameter("Threshold", defaults["threshold"])
            self.scriptedEffect.setParameter("MinimumLesionMm3", defaults["min_lesion_mm3"])
            self.scriptedEffect.setParameter("DefaultsFor", key)

    def activate(self):
        self.active = True
        self.applyModelDefaults(modelCard(modelChoice()))
        if self.pending is not None:
            try:
                self.deliver(self.pending, _("The run started earlier has finished: "))
            except SamlessError as exc:
                showError(str(exc))

    def updateGUIFromMRML(self):
        for widget, name in ((self.thresholdSlider, "Threshold"), (self.minimumSizeSlider, "MinimumLesionMm3")):
            wasBlocked = widget.blockSignals(True)
            widget.value = self.scriptedEffect.doubleParameter(name)
            widget.blockSignals(wasBlocked)
        wasBlocked = self.ttaCheckBox.blockSignals(True)
        self.ttaCheckBox.checked = self.scriptedEffect.integerParameter("TestTimeAugmentation") != 0
        self.ttaCheckBox.blockSignals(wasBlocked)
        self.modelLabel.text = modelChoice().replace("local:", "")
        self.updateButton()

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter("Threshold", self.thresholdSlider.value)
        self.scriptedEffect.setParameter("MinimumLesionMm3", self.minimumSizeSlider.value)
        self.scriptedEffect.setParameter("TestTimeAugmentation", int(self.ttaCheckBox.checked))

    def sourceVolumeNodeChanged(self):
        self.probability = None  # a new source: the old probability map no longer applies

    def deactivate(self):
        # A running job goes on; its result is written only through this effect, once active again, so
        # it never lands in a segmentation that another effect is editing.
        self.active = False

    def cleanup(self):
        """Slicer 5.10+ calls this before the effect is deleted: stop the job and the timers."""
        if self.job:
            self.job.cancel()
        self.monitor.stop()
        self.rethresholdTimer.stop()

    # Running

    def updateButton(self):
        running = self.job is not None
        self.applyButton.text = _("Cancel") if running else _("Apply")
        self.progressBar.visible = running

    def onApply(self):
        if self.job:
            self.job.cancel()
            return
        if not self.scriptedEffect.confirmCurrentSegmentVisible():
            return
        try:
            self.start()
        except SamlessError as exc:
            showError(str(exc))
        except Exception as exc:
            logging.exception("SAMLess effect")
            showError(_("Unexpected error: {error}").format(error=exc), traceback.format_exc())

    def start(self):
        parameterNode = self.scriptedEffect.parameterSetNode()
        # The source as the Segment Editor sees it: in the segmentation's frame and geometry.
        source = self.scriptedEffect.sourceVolumeImageData()
        if source is None:
            raise SamlessError(_("Select the FLAIR as source volume first."))
        with Preparation():
            prepared = prepareModel(modelChoice())
            if prepared is None:
                return
            path, package = prepared
            if len(package.modalities) != 1:
                raise SamlessError(_("Model {name} needs {inputs}; the effect only has the source volume: use the "
                                     "SAMLess MS Lesions module instead.").format(
                    name=package.name, inputs=", ".join(package.modalities)))
            device = deviceChoice()
            if not ensureDependencies(device):
                return
        self.updateMRMLFromGUI()
        self.applyModelDefaults(package.card)  # a model downloaded just now: its card is known only from here
        options = run_options(device, threshold=self.scriptedEffect.doubleParameter("Threshold"),
                              min_lesion_mm3=self.scriptedEffect.doubleParameter("MinimumLesionMm3"),
                              tta=self.ttaCheckBox.checked, three_plane=threePlaneOption(threePlaneChoice()),
                              borders=bordersOption(bordersChoice()))
        self.target = (parameterNode.GetSegmentationNode().GetID(), parameterNode.GetSelectedSegmentID())
        self.probability = None
        self.pending = None
        self.job = startJob([source], path, options)
        self.monitor.start(self.job)
        self.statusLabel.text = _("Segmenting...")
        self.progressBar.value = 0
        self.updateButton()

    def onProgress(self, job):
        showProgress(self.progressBar, job)

    def onFinished(self, job):
        finishJob(job, self.statusLabel, _("Segmentation failed"), self.receive)
        self.job = None
        self.updateButton()

    def receive(self, job):
        """Write the finished run's lesions now, or keep them until this effect is active again."""
        outputs = job.outputs()
        self.probability = outputs.probability
        self.connectivity = outputs.connectivity
        if self.active:
            self.deliver(outputs)
        else:
            self.pending = outputs
            self.statusLabel.text = _("Finished; written when this effect is active again.")
            slicer.util.showStatusMessage(
                _("SAMLess: the lesions are ready. Open the Segment Editor and select the SAMLess MS lesions "
                  "effect to write them."), 15000)

    def deliver(self, outputs, prefix=""):
        """Write a finished run's lesions (or keep them pending while their segmentation is not the one
        being edited) and say what was written."""
        parameterNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterNode.GetSegmentationNode() if parameterNode else None
        if segmentationNode is None or segmentationNode.GetID() != self.target[0]:
            target = slicer.mrmlScene.GetNodeByID(self.target[0])
            if target is None:
                self.pending = None
                raise SamlessError(_("The segmentation the lesions were meant for is gone; nothing was written."))
            self.pending = outputs
            self.statusLabel.text = _("Finished; select segmentation {name} to write the lesions.").format(
                name=target.GetName())
            return
        self.pending = None
        self.write(outputs.label)
        self.reportWritten(prefix)

    def write(self, label):
        """Write `label` into the target segment as one undoable Segment Editor step."""
        parameterNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterNode.GetSegmentationNode()
        segmentationId, segmentId = self.target
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId) if segmentationNode else None
        if segmentationNode is None or segmentationNode.GetID() != segmentationId or segment is None:
            raise SamlessError(_("The segment the lesions were meant for is gone; nothing was written."))
        parameterNode.SetSelectedSegmentID(segmentId)  # the user may have selected another one meanwhile
        self.scriptedEffect.saveStateForUndo()
        if segment.GetNameAutoGenerated():  # a fresh "Segment_1": call it what it now holds
            apply_terminology(segment, lesionTerminology())
        self.scriptedEffect.modifySelectedSegmentByLabelmap(
            volumes.sitk_to_oriented_image(label), slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)

    def reportWritten(self, prefix=""):
        """Say what the segment holds now: the editable area and overwrite policy may have kept part of it."""
        parameterNode = self.scriptedEffect.parameterSetNode()
        count, ml = results.segment_lesion_summary(parameterNode.GetSegmentationNode(), self.target[1],
                                                   parameterNode.GetSourceVolumeNode(), self.connectivity)
        self.statusLabel.text = prefix + _("{count} lesions, {ml:.2f} mL in the segment.").format(count=count, ml=ml)

    # Re-thresholding

    def onSettingsChanged(self, value):
        self.updateMRMLFromGUI()
        if self.probability is not None and self.job is None:
            self.rethresholdTimer.start()

    def onRethreshold(self):
        """The new threshold / minimum size on the stored probability map: no network, one undo step."""
        if self.probability is None or self.job is not None:
            return
        try:
            outputs = results.relabel_probability(self.probability, self.thresholdSlider.value,
                                                  self.minimumSizeSlider.value, connectivity=self.connectivity)
            self.write(outputs.label)
            self.reportWritten()
        except SamlessError as exc:
            self.probability = None
            showError(str(exc))
