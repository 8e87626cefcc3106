"""LiverSegmentation: liver segmentation, volume and fat-fraction readouts in 3D Slicer.

The panel is thin: every decision lives in the core (LiverSegmentationLogic) and in the MRML
bridge (LiverSegmentationLib.mrml_bridge), which are tested headless. Inference never runs on the
GUI thread: a background process (local) or thread (remote) is polled with a qt.QTimer.
"""

import json
import logging
import os
import shutil
import sys
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _addCoreToPath():
    """In a source checkout the core package sits next to this module's folder."""
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(repository, "LiverSegmentationLogic")) and repository not in sys.path:
        sys.path.insert(0, repository)


_addCoreToPath()

#: modules of Slicer's Python that the core needs, and the pip requirement that provides each
REQUIRED_PACKAGES = {"scipy": "scipy>=1.10", "skimage": "scikit-image>=0.21", "zmq": "pyzmq>=25",
                     "tqdm": "tqdm>=4.60", "PIL": "pillow>=9"}


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
            "fine-tuning queue so the model adapts to new scanners."
        )
        self.parent.acknowledgementText = _(
            "Default model trained on CHAOS MR T2-SPIR data (Kavur et al., Medical Image Analysis 69, "
            "2021; CC BY-SA 4.0)."
        )


#
# LiverSegmentationParameterNode
#


@parameterNodeWrapper
class LiverSegmentationParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    ffVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    readoutTable: vtkMRMLTableNode
    marginMm: Annotated[float, WithinRange(0.0, 20.0)] = 3.0
    serverAddress: str = "tcp://127.0.0.1:5555"
    study: str = ""
    operatorName: str = ""


#
# LiverSegmentationWidget
#


class LiverSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._observedSegmentation = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LiverSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LiverSegmentationLogic()

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(100)
        self.pollTimer.connect("timeout()", self.onPollJob)
        self.readoutTimer = qt.QTimer()  # debounces readout updates while the operator edits
        self.readoutTimer.setSingleShot(True)
        self.readoutTimer.setInterval(400)
        self.readoutTimer.connect("timeout()", self.updateReadout)

        self.ui.modelComboBox.addItems(self.logic.modelNames())
        self.ui.queueFolderPathLineEdit.currentPath = self.logic.defaultQueueFolder()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.reviewButton.connect("clicked(bool)", self.onReviewButton)
        self.ui.saveCsvButton.connect("clicked(bool)", self.onSaveCsv)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.backendComboBox.connect("currentIndexChanged(int)", self.updateGUIFromState)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.ffVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.scheduleReadout)
        self.ui.marginSpinBox.connect("valueChanged(double)", self.scheduleReadout)
        self.ui.slicesToCheckList.connect("itemClicked(QListWidgetItem*)", self.onSliceToCheckClicked)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
        self.pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromState)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[LiverSegmentationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromState)
            self.updateGUIFromState()

    def updateGUIFromState(self, caller=None, event=None) -> None:
        running = self._job is not None
        remote = self.ui.backendComboBox.currentText == "Remote"
        self.ui.deviceComboBox.enabled = not remote
        self.ui.serverAddressLineEdit.enabled = remote
        self.ui.testConnectionButton.enabled = remote and not running
        hasInput = bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = running or hasInput
        self.ui.progressBar.visible = running
        hasSegmentation = bool(self._parameterNode and self._parameterNode.outputSegmentation and hasInput)
        self.ui.reviewButton.enabled = hasSegmentation and not running
        self.ui.exportButton.enabled = hasSegmentation and not running
        self.ui.saveCsvButton.enabled = bool(self._parameterNode and self._parameterNode.readoutTable)

    # ------------------------------------------------------------------ segmentation
    def onApplyButton(self) -> None:
        if self._job is not None:  # Apply doubles as Cancel
            self._job.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            remote = self.ui.backendComboBox.currentText == "Remote"
            self._job = self.logic.startSegmentation(
                self._parameterNode.inputVolume,
                self._parameterNode.ffVolume,
                model=self.ui.modelComboBox.currentText,
                device=self.ui.deviceComboBox.currentText,
                serverAddress=self._parameterNode.serverAddress if remote else None,
                marginMm=self._parameterNode.marginMm,
            )
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Segmenting...")
            self.pollTimer.start()
            self.updateGUIFromState()

    def onPollJob(self) -> None:
        job = self._job
        for event in job.poll():
            if event[0] == "progress":
                _kind, done, total, stage = event
                self.ui.progressBar.maximum = total
                self.ui.progressBar.value = done
                self.ui.statusLabel.text = _("{stage}: {done} of {total} slices").format(
                    stage=stage, done=done, total=total)
        if not job.finished:
            return
        self.pollTimer.stop()
        self._job = None
        if job.state == "done":
            with slicer.util.tryWithErrorDisplay(_("Failed to show the segmentation."), waitCursor=True):
                segmentation = self.logic.finishSegmentation(
                    job, self._parameterNode.inputVolume, self._parameterNode.outputSegmentation)
                self._parameterNode.outputSegmentation = segmentation
                self.showSlicesToCheck(job.readout.get("review"))
                self.ui.statusLabel.text = _("Done: {model}").format(model=self.logic.modelDescription(segmentation))
        elif job.state == "cancelled":
            self.ui.statusLabel.text = _("Cancelled.")
        else:
            self.ui.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=job.error))
        self.updateGUIFromState()
        self.updateReadout()

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

    def onTestConnection(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot reach the inference server."), waitCursor=True):
            info = self.logic.serverInfo(self._parameterNode.serverAddress)
            self.ui.statusLabel.text = self.logic.describeServer(info)

    # ------------------------------------------------------------------ review and readout
    def onSegmentationChanged(self, node) -> None:
        if self._observedSegmentation is not None:
            for event in self._segmentationEvents():
                self.removeObserver(self._observedSegmentation, event, self.scheduleReadout)
        self._observedSegmentation = node
        if node is not None:
            for event in self._segmentationEvents():
                self.addObserver(node, event, self.scheduleReadout)
        self.scheduleReadout()

    @staticmethod
    def _segmentationEvents():
        """Events a segmentation node forwards when the operator paints, erases or adds segments."""
        segmentation = slicer.vtkSegmentation
        # "Master" was renamed "Source" in Slicer 5.4
        edited = getattr(segmentation, "SourceRepresentationModified", None)
        edited = edited or segmentation.MasterRepresentationModified
        return [vtk.vtkCommand.ModifiedEvent, edited, segmentation.SegmentAdded, segmentation.SegmentRemoved,
                segmentation.SegmentModified]

    def scheduleReadout(self, *args) -> None:
        self.readoutTimer.start()

    def updateReadout(self) -> None:
        p = self._parameterNode
        if not p or not p.inputVolume or not p.outputSegmentation or self._job is not None:
            self.ui.readoutLabel.text = _("No segmentation yet.")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to compute the readout.")):
            readout, table = self.logic.updateReadout(
                p.outputSegmentation, p.inputVolume, p.ffVolume, p.marginMm, p.readoutTable)
            p.readoutTable = table
            self.ui.readoutLabel.text = self.logic.readoutHtml(readout, p.outputSegmentation)
            self.updateGUIFromState()

    def onReviewButton(self) -> None:
        p = self._parameterNode
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.SegmentEditorWidget.editor
        editor.setSegmentationNode(p.outputSegmentation)
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(p.inputVolume)
        else:  # Slicer < 5.4
            editor.setMasterVolumeNode(p.inputVolume)

    def onSaveCsv(self) -> None:
        path = qt.QFileDialog.getSaveFileName(None, _("Save readout"), "liver_readout.csv", "CSV (*.csv)")
        if path:
            with slicer.util.tryWithErrorDisplay(_("Failed to save the CSV file.")):
                slicer.util.saveNode(self._parameterNode.readoutTable, path)

    def onExportButton(self) -> None:
        p = self._parameterNode
        remote = self.ui.backendComboBox.currentText == "Remote"
        with slicer.util.tryWithErrorDisplay(_("Failed to export the case."), waitCursor=True):
            record = self.logic.exportToQueue(
                self.ui.queueFolderPathLineEdit.currentPath, p.inputVolume, p.outputSegmentation,
                study=p.study, operatorName=p.operatorName, serverAddress=p.serverAddress if remote else None)
            where = p.serverAddress if remote else self.ui.queueFolderPathLineEdit.currentPath
            self.ui.statusLabel.text = _("Queued as {case} ({where})").format(case=record["case_id"], where=where)


#
# LiverSegmentationLogic
#


class LiverSegmentationLogic(ScriptedLoadableModuleLogic):
    """Batch-capable logic: every computation runs without the GUI (see the core and the bridge)."""

    SUGGESTION_ATTRIBUTE = "LiverSegmentation.SuggestionFile"
    MODEL_ATTRIBUTE = "LiverSegmentation.Model"  # "name version" of the model that made the suggestion
    MODEL_NAME_ATTRIBUTE = "LiverSegmentation.ModelName"
    AUDIT_ATTRIBUTE = "LiverSegmentation.Audit"  # the suggestion's audit record (JSON)

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._classes = {}

    def getParameterNode(self):
        return LiverSegmentationParameterNode(super().getParameterNode())

    # ---------------------------------------------------------------- models and setup
    def modelNames(self):
        from LiverSegmentationLogic.models.catalog import model_names  # no torch: works before dependencies exist

        return model_names()

    def defaultQueueFolder(self):
        return os.path.join(os.path.expanduser("~"), "LiverSegmentationQueue")

    def ensureDependencies(self) -> bool:
        """Install missing Python packages on first use, with the user's consent. Never touches
        Slicer's own numpy or SimpleITK; torch comes from the PyTorch extension."""
        import importlib.util

        missing = [req for module, req in REQUIRED_PACKAGES.items() if importlib.util.find_spec(module) is None]
        try:
            import torch  # noqa: F401
        except ImportError:
            import PyTorchUtils  # provided by the PyTorch extension, a dependency of this extension

            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is None:
                return False
        if missing:
            if not slicer.util.confirmOkCancelDisplay(
                    _("LiverSegmentation needs these Python packages: {packages}. Install them now?").format(
                        packages=", ".join(missing))):
                return False
            slicer.util.pip_install(missing)
        return True

    # ---------------------------------------------------------------- segmentation
    def startSegmentation(self, inputVolume, ffVolume=None, model=None, device="auto", serverAddress=None,
                          marginMm=3.0):
        """Start a background job (local process or remote thread) and return it."""
        from LiverSegmentationLib import mrml_bridge
        from LiverSegmentationLib.jobs import LocalProcessJob, RemoteJob

        volume = mrml_bridge.volume_from_node(inputVolume)
        ffMap = mrml_bridge.volume_from_node(ffVolume) if ffVolume else None
        if serverAddress:
            from LiverSegmentationLogic.remote.client import InferenceClient

            return RemoteJob(InferenceClient(serverAddress), volume, ffMap, margin_mm=marginMm)
        python = shutil.which("PythonSlicer") or sys.executable
        return LocalProcessJob(volume, ffMap, model=model or None, device=device, margin_mm=marginMm,
                               python=python)

    def finishSegmentation(self, job, inputVolume, segmentationNode=None):
        """Put a finished job's labels into a segmentation node and remember the suggestion."""
        import numpy as np
        from LiverSegmentationLib import mrml_bridge

        classes = self._classesFor(job.readout["model"]["name"])
        geometry = mrml_bridge.geometry_from_volume_node(inputVolume)
        segmentationNode = mrml_bridge.segmentation_from_labels(
            job.labels, geometry, classes, inputVolume, name=f"{inputVolume.GetName()} liver",
            segmentation_node=segmentationNode)
        suggestion = os.path.join(slicer.app.temporaryPath, f"liverseg_suggestion_{segmentationNode.GetID()}.npy")
        np.save(suggestion, job.labels)
        segmentationNode.SetAttribute(self.SUGGESTION_ATTRIBUTE, suggestion)
        model = job.readout["model"]
        segmentationNode.SetAttribute(self.MODEL_ATTRIBUTE, f"{model['name']} {model['version']}")
        segmentationNode.SetAttribute(self.MODEL_NAME_ATTRIBUTE, model["name"])
        segmentationNode.SetAttribute(self.AUDIT_ATTRIBUTE, json.dumps(job.readout.get("audit")))
        return segmentationNode

    def _classesForSegmentation(self, segmentationNode):
        """Classes of the model that made this segmentation (the default model's for others)."""
        from LiverSegmentationLogic.models.catalog import DEFAULT_MODEL

        return self._classesFor(segmentationNode.GetAttribute(self.MODEL_NAME_ATTRIBUTE) or DEFAULT_MODEL)

    def _classesFor(self, modelName):
        if modelName not in self._classes:
            from LiverSegmentationLogic.models.catalog import CARD_NAME, resolve_model_folder

            card = json.loads((resolve_model_folder(modelName) / CARD_NAME).read_text())
            self._classes[modelName] = card["classes"]
        return self._classes[modelName]

    def modelDescription(self, segmentationNode):
        return segmentationNode.GetAttribute(self.MODEL_ATTRIBUTE) or _("unknown model")

    def serverInfo(self, address):
        from LiverSegmentationLogic.remote.client import InferenceClient

        with InferenceClient(address, connect_timeout_s=3, retries=0) as client:
            return client.info()

    def describeServer(self, info):
        model = info.get("models") or {}
        tasks = ", ".join(f"{task} ({ref or _('no model')})" for task, ref in (info.get("tasks") or {}).items())
        return _("Server {version} (protocol {protocol}), {workers} worker(s) on {devices}; model {model}; "
                 "tasks there: {tasks}").format(
            version=info["server_version"], protocol=info["protocol"], workers=info["workers"],
            devices=", ".join(info["devices"]) or "-", model=f"{model.get('name')} {model.get('version')}",
            tasks=tasks or "-")

    # ---------------------------------------------------------------- readout and export
    def updateReadout(self, segmentationNode, inputVolume, ffVolume=None, marginMm=3.0, tableNode=None):
        from LiverSegmentationLib import mrml_bridge

        classes = self._classesForSegmentation(segmentationNode)
        readout = mrml_bridge.readouts_from_segmentation(segmentationNode, inputVolume, classes, ffVolume, marginMm)
        model = segmentationNode.GetAttribute(self.MODEL_ATTRIBUTE)
        table = mrml_bridge.readout_table(readout, {"name": model, "version": ""} if model else None, tableNode)
        return readout, table

    def readoutHtml(self, readout, segmentationNode):
        rows = [f"<b>{name} volume</b>: {ml:.1f} mL" for name, ml in readout["volumes_ml"].items()]
        ff = readout.get("fat_fraction")
        if ff:
            flag = "<b style='color:#c0392b'>steatosis</b>" if ff["steatosis"] else "no steatosis"
            rows.append(f"<b>PDFF</b>: median {ff['median']:.1f} %, mean {ff['mean']:.1f} % ({flag})")
        else:
            rows.append("PDFF: select a fat-fraction map")
        rows.append(f"<i>model {self.modelDescription(segmentationNode)}</i>")
        return "<br>".join(rows)

    def exportToQueue(self, queueFolder, inputVolume, segmentationNode, study="", operatorName="",
                      serverAddress=None):
        """Queue the reviewed case in a local folder, or on the inference server when given."""
        import numpy as np
        from LiverSegmentationLib import mrml_bridge

        suggestionFile = segmentationNode.GetAttribute(self.SUGGESTION_ATTRIBUTE)
        suggestion = np.load(suggestionFile) if suggestionFile and os.path.exists(suggestionFile) else None
        classes = self._classesForSegmentation(segmentationNode)
        meta = {"study": study, "operator": operatorName, "model": self.modelDescription(segmentationNode),
                "suggestion_audit": json.loads(segmentationNode.GetAttribute(self.AUDIT_ATTRIBUTE) or "null")}
        if not serverAddress:
            return mrml_bridge.export_case_to_queue(queueFolder, inputVolume, segmentationNode, classes, suggestion,
                                                    meta=meta)
        from LiverSegmentationLogic.remote.client import InferenceClient

        image, corrected, record = mrml_bridge.reviewed_case(inputVolume, segmentationNode, classes, suggestion, meta)
        with InferenceClient(serverAddress) as client:
            return client.submit(image, corrected, record, labels={c["name"]: c["label"] for c in classes})


#
# LiverSegmentationTest
#


class LiverSegmentationTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test): the sample case through the logic, end to end."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SampleCase()

    def test_SampleCase(self):
        import time

        from LiverSegmentationLogic.io.sample import sample_paths

        imagePath, _labelPath = sample_paths()
        volume = slicer.util.loadVolume(str(imagePath))
        logic = LiverSegmentationLogic()
        job = logic.startSegmentation(volume)
        deadline = time.time() + 300
        while not job.finished and time.time() < deadline:
            job.poll()
            slicer.app.processEvents()
            time.sleep(0.1)
        self.assertEqual(job.state, "done", job.error)
        segmentation = logic.finishSegmentation(job, volume)
        readout, _table = logic.updateReadout(segmentation, volume)
        self.assertGreater(readout["volumes_ml"]["liver"], 500)
        logging.info("LiverSegmentation test passed")
