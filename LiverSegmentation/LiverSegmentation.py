"""LiverSegmentation: liver segmentation, volume and fat-fraction readouts in 3D Slicer (5.8 or newer).

The panel is thin: its decisions live in LiverSegmentationLib.panel_controller (job lifecycle,
readout scheduling, export rules, settings, dependencies) and the MRML bridge, which are tested
headless on slicer-core; the computations live in the core (LiverSegmentationLogic). This file only
binds widgets to the controller and renders its state. Nothing here blocks the GUI thread: jobs run
in a background process or thread, polled by a qt.QTimer.
"""

import logging
import os
import sys
from typing import Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MINIMUM_SLICER = (5, 8)  # Python 3.9; the code is checked against it (Testing/Python/test_slicer_module.py)
OWN_PACKAGES = ("LiverSegmentationLib", "LiverSegmentationLogic")


def _addCoreToPath():
    """In a source checkout the core package sits next to this module's folder."""
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(repository, "LiverSegmentationLogic")) and repository not in sys.path:
        sys.path.insert(0, repository)


_addCoreToPath()


#
# LiverSegmentation
#


class LiverSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Liver Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LiverSegmentation developers"]
        self.parent.helpText = _(
            "Segments the liver in MR (and CT) with a U-Net, locally or on a remote inference server, "
            "and reads out the liver volume (mL) and fat fraction (PDFF %). Review and correct the "
            "result in the Segment Editor; the readout follows your edits. Export corrected cases to a "
            "fine-tuning queue so the model adapts to new scanners. Needs 3D Slicer 5.8 or newer."
        )
        self.parent.acknowledgementText = _(
            "Default model trained on CHAOS MR T2-SPIR data (Kavur et al., Medical Image Analysis 69, "
            "2021; CC BY-SA 4.0)."
        )


#
# LiverSegmentationParameterNode: the node selections and the margin, saved with the scene
#


@parameterNodeWrapper
class LiverSegmentationParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    ffVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    readoutTable: vtkMRMLTableNode


#
# LiverSegmentationWidget
#


class LiverSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedSegmentation = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LiverSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LiverSegmentationModuleLogic()
        if (slicer.app.majorVersion, slicer.app.minorVersion) < MINIMUM_SLICER:
            self.ui.statusLabel.text = _("This module needs 3D Slicer {major}.{minor} or newer.").format(
                major=MINIMUM_SLICER[0], minor=MINIMUM_SLICER[1])
            uiWidget.enabled = False
            return

        from LiverSegmentationLib.panel_controller import PanelController, PanelSettings

        self.controller = PanelController(PanelSettings(qt.QSettings()))
        self.timer = qt.QTimer()  # drives the controller: job progress, debounced readouts, tasks
        self.timer.setInterval(100)
        self.timer.connect("timeout()", self.onTick)

        self.ui.modelComboBox.addItems(self.logic.modelNames())
        self.loadSettingsIntoWidgets()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.reviewButton.connect("clicked(bool)", self.onReviewButton)
        self.ui.saveCsvButton.connect("clicked(bool)", self.onSaveCsv)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.slicesToCheckList.connect("itemClicked(QListWidgetItem*)", self.onSliceToCheckClicked)
        for selector in (self.ui.inputVolumeSelector, self.ui.ffVolumeSelector, self.ui.outputSegmentationSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSelectionChanged)
        # settings that persist across scenes and sessions (QSettings)
        self.ui.backendComboBox.connect("currentTextChanged(QString)", lambda v: self.saveSetting("backend", v))
        self.ui.deviceComboBox.connect("currentTextChanged(QString)", lambda v: self.saveSetting("device", v))
        self.ui.modelComboBox.connect("currentTextChanged(QString)", lambda v: self.saveSetting("model", v))
        self.ui.ffUnitComboBox.connect("currentTextChanged(QString)", lambda v: self.saveSetting("ffUnit", v, True))
        self.ui.marginSpinBox.connect("valueChanged(double)", lambda v: self.saveSetting("marginMm", v, True))
        self.ui.serverAddressLineEdit.connect("textChanged(QString)", lambda v: self.saveSetting("serverAddress", v))
        self.ui.serverKeyPathLineEdit.connect("currentPathChanged(QString)",
                                              lambda v: self.saveSetting("serverKeyFile", v))
        self.ui.clientCertPathLineEdit.connect("currentPathChanged(QString)",
                                               lambda v: self.saveSetting("clientCertFile", v))
        self.ui.studyLineEdit.connect("textChanged(QString)", lambda v: self.saveSetting("study", v))
        self.ui.operatorLineEdit.connect("textChanged(QString)", lambda v: self.saveSetting("operatorName", v))
        self.ui.queueFolderPathLineEdit.connect("currentPathChanged(QString)",
                                                lambda v: self.saveSetting("queueFolder", v))
        self.ui.replayFolderPathLineEdit.connect("currentPathChanged(QString)",
                                                 lambda v: self.saveSetting("replayFolder", v))
        # adapting the model to the study
        self.ui.studyLineEdit.connect("editingFinished()", self.refreshAdaptation)
        self.ui.modelComboBox.connect("currentTextChanged(QString)", lambda v: self.refreshAdaptation())
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneButton)
        self.ui.useVersionButton.connect("clicked(bool)", self.onUseVersion)
        self.ui.keepCurrentButton.connect("clicked(bool)", self.onKeepCurrent)

        self.initializeParameterNode()
        self.refreshAdaptation()
        self.timer.start()

    def loadSettingsIntoWidgets(self) -> None:
        s = self.controller.settings
        self.ui.backendComboBox.currentText = s["backend"]
        self.ui.deviceComboBox.currentText = s["device"]
        if s["model"] in self.logic.modelNames():
            self.ui.modelComboBox.currentText = s["model"]
        self.ui.ffUnitComboBox.currentText = s["ffUnit"]
        self.ui.marginSpinBox.value = s["marginMm"]
        self.ui.serverAddressLineEdit.text = s["serverAddress"]
        self.ui.serverKeyPathLineEdit.currentPath = s["serverKeyFile"]
        self.ui.clientCertPathLineEdit.currentPath = s["clientCertFile"]
        self.ui.studyLineEdit.text = s["study"]
        self.ui.operatorLineEdit.text = s["operatorName"]
        self.ui.queueFolderPathLineEdit.currentPath = s["queueFolder"]
        self.ui.replayFolderPathLineEdit.currentPath = s["replayFolder"]

    def saveSetting(self, name, value, readoutChanged=False) -> None:
        self.controller.settings[name] = value
        if readoutChanged:
            self.controller.segmentation_edited()
        self.render()

    def cleanup(self) -> None:
        if self.controller is not None:
            self.controller.cancel()
            self.timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # no readout work while the operator is in other modules (e.g. painting in the Segment Editor
        # with this module closed); it catches up on enter()
        self.observeSegmentation(None)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onReload(self) -> None:
        """Reload also the helper package and the core, not only this file."""
        from LiverSegmentationLib.panel_controller import forget_imported

        if self.controller is not None:
            self.controller.cancel()
        forget_imported(OWN_PACKAGES)
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        self.controller.scene_closing()  # a job ending now writes nothing into the next scene
        self.observeSegmentation(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        if self.controller is None:
            return
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode
        self.onSelectionChanged()

    def setParameterNode(self, inputParameterNode: Optional[LiverSegmentationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
        self.render()

    # ------------------------------------------------------------------ rendering the controller's state
    def render(self) -> None:
        c = self.controller
        if c is None:
            return
        running = c.running
        remote = self.ui.backendComboBox.currentText == "Remote"
        self.ui.deviceComboBox.enabled = not remote
        self.ui.modelComboBox.enabled = not remote  # the server decides its model
        self.ui.serverAddressLineEdit.enabled = remote
        self.ui.serverKeyPathLineEdit.enabled = remote
        self.ui.clientCertPathLineEdit.enabled = remote
        self.ui.testConnectionButton.enabled = remote and c.task is None
        p = self._parameterNode
        hasInput = bool(p and p.inputVolume)
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = running or hasInput
        self.ui.progressBar.visible = running
        done, total = c.progress
        self.ui.progressBar.maximum = max(total, 1)
        self.ui.progressBar.value = done
        self.ui.statusLabel.text = c.status
        hasSegmentation = bool(p and p.outputSegmentation and hasInput)
        self.ui.reviewButton.enabled = hasSegmentation and not running
        self.ui.exportButton.enabled = hasSegmentation and not running and c.task is None
        self.ui.saveCsvButton.enabled = c.readout_table is not None
        self.ui.readoutLabel.text = self.readoutText()
        adapting = c.finetune is not None
        hasStudy = bool(self.ui.studyLineEdit.text.strip())
        self.ui.finetuneButton.text = _("Cancel fine-tuning") if adapting else _("Fine-tune now")
        self.ui.finetuneButton.enabled = adapting or (hasStudy and not running)
        self.ui.useVersionButton.enabled = hasStudy and not adapting and self.ui.studyVersionsList.count > 0
        self.ui.keepCurrentButton.enabled = hasStudy and not adapting
        if c.finetune_status:
            from LiverSegmentationLib.panel_controller import describe_finetune

            self.ui.finetuneStatusLabel.text = describe_finetune(c.finetune_status)

    def readoutText(self) -> str:
        from LiverSegmentationLib.panel_controller import readout_html

        segmentation = self._parameterNode.outputSegmentation if self._parameterNode else None
        return readout_html(self.controller.readout, self.controller.readout_error, segmentation)

    def onTick(self) -> None:
        c = self.controller
        wasRunning, previousResult = c.running, c.result_node
        wasAdapting, hadTask = c.finetune is not None, c.task is not None
        c.tick()
        if (wasAdapting and c.finetune is None) or (hadTask and c.task is None):
            self.refreshAdaptation()  # a fine-tune, an export or a version change ended
        if wasRunning and not c.running and c.result_node is not None and c.result_node is not previousResult:
            if self._parameterNode:
                self._parameterNode.outputSegmentation = c.result_node
            self.showSlicesToCheck(c.review)
        if self._parameterNode and c.readout_table is not None and self._parameterNode.readoutTable is None:
            self._parameterNode.readoutTable = c.readout_table
        self.render()

    # ------------------------------------------------------------------ actions
    def onApplyButton(self) -> None:
        c = self.controller
        if c.running:  # Apply doubles as Cancel
            c.cancel()
            self.render()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            if not self.ensureDependencies(self.ui.backendComboBox.currentText):
                return
            p = self._parameterNode
            c.start(p.inputVolume, p.ffVolume, p.outputSegmentation)
        self.render()

    def ensureDependencies(self, backend) -> bool:
        """Install what the backend needs, after asking; never touches Slicer's own numpy,
        SimpleITK, scipy or pillow (see panel_controller.dependency_plan)."""
        from LiverSegmentationLib.panel_controller import MIN_TORCH, dependency_plan

        plan = dependency_plan(backend)
        if plan.problem:
            slicer.util.errorDisplay(plan.problem)
            return False
        if plan.ready:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                _("The {backend} backend needs: {packages}. Install now?").format(
                    backend=backend, packages=plan.describe())):
            return False
        if plan.torch:
            import PyTorchUtils  # the PyTorch extension (dependency_plan checked that it is there)

            requirement = ">=" + ".".join(str(n) for n in MIN_TORCH)
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(False, None, requirement) is None:
                return False
        if plan.pip:
            slicer.util.pip_install(plan.pip)
        again = dependency_plan(backend)
        if not again.ready:
            slicer.util.errorDisplay(again.problem or _("Still missing: {packages}. Restart Slicer and try again.")
                                     .format(packages=again.describe()))
        return again.ready

    # ------------------------------------------------------------------ adapting to the study
    def refreshAdaptation(self) -> None:
        """The study's queued cases and versions (read on demand: they change only through actions)."""
        self.ui.studyVersionsList.clear()
        if not self.ui.studyLineEdit.text.strip():
            self.ui.adaptSummaryLabel.text = _("Enter the study above to adapt the model to it.")
            return
        try:
            summary = self.controller.adaptation_summary()
        except Exception as exc:  # e.g. an unreadable queue: said in place
            self.ui.adaptSummaryLabel.text = _("Cannot read this study's queue: {error}").format(error=exc)
            return
        self.ui.adaptSummaryLabel.text = _(
            "Study {study}: {n} corrected case(s) queued in {queue}; it uses {active}.").format(
            study=summary["study"], n=summary["queued"], queue=summary["queue"], active=summary["active"])
        for ref in summary["versions"]:
            self.ui.studyVersionsList.addItem(ref + ("  (in use)" if ref == summary["active"] else ""))
        self.render()

    def onFinetuneButton(self) -> None:
        c = self.controller
        if c.finetune is not None:
            c.cancel_finetune()
            return
        with slicer.util.tryWithErrorDisplay(_("Cannot start fine-tuning."), waitCursor=True):
            if self.ensureDependencies(self.ui.backendComboBox.currentText):
                c.finetune_now()
        self.render()

    def onUseVersion(self) -> None:
        items = self.ui.studyVersionsList
        row = items.currentRow if items.currentRow >= 0 else items.count - 1
        ref = items.item(row).text().split()[0]
        with slicer.util.tryWithErrorDisplay(_("Cannot change the model.")):
            self.controller.use_version(ref)
        self.refreshAdaptation()

    def onKeepCurrent(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot change the model.")):
            self.controller.roll_back()
        self.refreshAdaptation()

    def onTestConnection(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot test the connection.")):
            if self.ensureDependencies("Remote"):
                self.controller.test_connection()  # answered in the status line, off the GUI thread
        self.render()

    def onSelectionChanged(self, *args) -> None:
        p = self._parameterNode
        if not p:
            return
        self.observeSegmentation(p.outputSegmentation)
        self.controller.select(p.inputVolume, p.ffVolume, p.outputSegmentation)
        self.render()

    def observeSegmentation(self, node) -> None:
        """Edits of this segmentation schedule a (debounced) readout."""
        if self._observedSegmentation is not None:
            for event in self._segmentationEvents():
                self.removeObserver(self._observedSegmentation, event, self.controller.segmentation_edited)
        self._observedSegmentation = node
        if node is not None:
            for event in self._segmentationEvents():
                self.addObserver(node, event, self.controller.segmentation_edited)

    @staticmethod
    def _segmentationEvents():
        """Events a segmentation node forwards when the operator paints, erases or adds segments."""
        segmentation = slicer.vtkSegmentation
        return [vtk.vtkCommand.ModifiedEvent, segmentation.SourceRepresentationModified, segmentation.SegmentAdded,
                segmentation.SegmentRemoved, segmentation.SegmentModified]

    def showSlicesToCheck(self, review) -> None:
        self.ui.slicesToCheckList.clear()
        if not review:
            return
        for z, voxels, lps in zip(review["slices_to_check"], review["uncertain_voxels"], review["positions_lps"]):
            item = qt.QListWidgetItem(_("axial slice {z}: {n} uncertain voxels").format(z=z, n=voxels))
            item.setData(qt.Qt.UserRole, [-lps[0], -lps[1], lps[2]])  # LPS -> RAS
            self.ui.slicesToCheckList.addItem(item)

    def onSliceToCheckClicked(self, item) -> None:
        r, a, s = item.data(qt.Qt.UserRole)
        slicer.modules.markups.logic().JumpSlicesToLocation(r, a, s, True)

    def onReviewButton(self) -> None:
        p = self._parameterNode
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.SegmentEditorWidget.editor
        editor.setSegmentationNode(p.outputSegmentation)
        editor.setSourceVolumeNode(p.inputVolume)

    def onSaveCsv(self) -> None:
        from LiverSegmentationLib import mrml_bridge

        path = qt.QFileDialog.getSaveFileName(None, _("Save readout"), "liver_readout.csv", "CSV (*.csv)")
        if path:
            with slicer.util.tryWithErrorDisplay(_("Failed to save the CSV file.")):
                mrml_bridge.save_table(self.controller.readout_table, path)
                self.controller.status = _("Readout saved to {path}").format(path=path)
        self.render()

    def onExportButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Cannot export the case."), waitCursor=True):
            if self.ui.backendComboBox.currentText == "Remote" and not self.ensureDependencies("Remote"):
                return
            self.controller.export(p.inputVolume, p.outputSegmentation)  # where it went: in the status line
        self.render()


#
# LiverSegmentationModuleLogic (named apart from the core package LiverSegmentationLogic)
#


class LiverSegmentationModuleLogic(ScriptedLoadableModuleLogic):
    """Scene-level helpers; the computations are in the core, the panel's decisions in
    LiverSegmentationLib.panel_controller (both usable without the GUI)."""

    def getParameterNode(self):
        return LiverSegmentationParameterNode(super().getParameterNode())

    def modelNames(self):
        from LiverSegmentationLogic.models.catalog import model_names  # no torch: works before dependencies exist

        return model_names()


#
# LiverSegmentationTest
#


class LiverSegmentationTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test): the sample case through the controller, end to end."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SampleCase()

    def test_SampleCase(self):
        import time

        from LiverSegmentationLib.panel_controller import DictSettings, PanelController, PanelSettings
        from LiverSegmentationLogic.io.sample import sample_paths

        imagePath, _labelPath = sample_paths()
        volume = slicer.util.loadVolume(str(imagePath))
        controller = PanelController(PanelSettings(DictSettings()), readout_delay_s=0)
        controller.start(volume)
        deadline = time.time() + 300
        while controller.running and time.time() < deadline:
            controller.tick()
            slicer.app.processEvents()
            time.sleep(0.1)
        self.assertTrue(controller.status.startswith("Done"), controller.status)
        controller.select(volume, None, controller.result_node)
        deadline = time.time() + 60
        while controller.readout is None and controller.readout_error is None and time.time() < deadline:
            controller.tick()
            time.sleep(0.1)
        self.assertGreater(controller.readout["volumes_ml"]["liver"], 500)
        logging.info("LiverSegmentation test passed")
