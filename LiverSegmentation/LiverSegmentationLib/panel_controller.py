"""The panel's decisions, without Qt: job lifecycle, readout scheduling, export rules, settings and
the dependency plan. The Qt widget binds its signals to this object and renders its state; tests
drive it on slicer-core with a real MRML scene, real background processes and a fake clock.

- **Jobs**: Apply captures the input, fat-fraction and output nodes (by ID, with the input's
  grid); the result is written only onto those nodes, after checking that the input still has the
  grid it had. Any failure returns the panel to idle with a message; a job that ends after Close
  Scene is discarded.
- **Readouts**: an edit schedules a readout after a quiet delay (debounced); the labels are taken
  from the segmentation on the GUI thread (MRML access), the computation runs in a thread; a
  failure is a status line, never a dialog per stroke.
- **Export**: an operator name is required; cases go to a queue folder per task (labels and
  modality from the model that made the suggestion), locally or to the server, written off the
  GUI thread.
- **Settings** persist in an injected QSettings-like store (``value(key, default)``, ``setValue``).

Everything here is called from the GUI thread; nothing here blocks it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import mrml_bridge as bridge
from .jobs import CANCELLED, DONE, FAILED, LocalProcessJob, RemoteJob, ThreadJob

IDLE, RUNNING = "idle", "running"
BACKENDS = ("Local", "Remote")
FF_UNITS = ("auto", "percent", "fraction")
MIN_TORCH = (2, 0)  # torch.load(weights_only=True) and the network code need it

#: setting name -> default; the store keeps them under "LiverSegmentation/<name>"
DEFAULT_SETTINGS = {
    "backend": "Local",
    "device": "auto",
    "model": "liver-mr-t2",
    "serverAddress": "tcp://127.0.0.1:5555",
    # CurveZMQ, for a server on a network (both or neither, made by `liverseg keys`): the server's
    # public key and this operator's secret certificate (the server knows operators and trainers by it)
    "serverKeyFile": "",
    "clientCertFile": "",
    "queueFolder": str(Path.home() / "LiverSegmentationQueue"),
    "study": "",
    "operatorName": "",
    "marginMm": 3.0,
    "ffUnit": "auto",
    "replayFolder": "",  # the base model's training data: without it a fine-tune is never activated
    "finetuneBudget": 300.0,  # seconds per fine-tune, all steps included
}

# segmentation node attributes: what made the suggestion, so readouts and exports need no catalog
MODEL_ATTRIBUTE = "LiverSegmentation.Model"  # JSON: name, version, sha256, task, modality
CLASSES_ATTRIBUTE = "LiverSegmentation.Classes"  # JSON: the model card's classes
AUDIT_ATTRIBUTE = "LiverSegmentation.Audit"  # JSON: the suggestion's audit record


class PanelError(Exception):
    """Something the operator must change before the action can run (shown as the status)."""


class DictSettings:
    """A QSettings-like store in memory (tests, scripts)."""

    def __init__(self, values: Optional[dict] = None):
        self.values = dict(values or {})

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value):  # noqa: N802 (QSettings' name)
        self.values[key] = value


class PanelSettings:
    """Typed access to the panel's persistent settings (QSettings returns strings: converted back
    to the default's type)."""

    PREFIX = "LiverSegmentation/"

    def __init__(self, store):
        self.store = store

    def __getitem__(self, name: str):
        default = DEFAULT_SETTINGS[name]
        raw = self.store.value(self.PREFIX + name, default)
        try:
            return type(default)(raw) if raw is not None else default
        except (TypeError, ValueError):
            return default

    def __setitem__(self, name: str, value):
        if name not in DEFAULT_SETTINGS:
            raise KeyError(name)
        self.store.setValue(self.PREFIX + name, value)


# ----------------------------------------------------------------------------- dependencies
@dataclass
class DependencyPlan:
    """What a backend needs installed in Slicer's Python before it can run."""

    backend: str
    pip: list = field(default_factory=list)  # requirements to pip-install (after asking)
    torch: bool = False  # torch is missing: install it through the PyTorch extension
    problem: Optional[str] = None  # something no install here can fix

    @property
    def ready(self) -> bool:
        return not self.pip and not self.torch and self.problem is None

    def describe(self) -> str:
        parts = (["PyTorch (through the PyTorch extension)"] if self.torch else []) + list(self.pip)
        return ", ".join(parts)


def _installed_version(distribution: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def dependency_plan(backend: str, find_spec: Callable = importlib.util.find_spec,
                    version_of: Callable = _installed_version) -> DependencyPlan:
    """The packages a backend needs beyond what Slicer ships (numpy, SimpleITK, scipy, pillow are
    Slicer's own and are never installed or upgraded here).

    - Local: torch only, from the PyTorch extension, at least :data:`MIN_TORCH`.
    - Remote: pyzmq only (the client does not import torch).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    plan = DependencyPlan(backend)
    if backend == "Remote":
        if find_spec("zmq") is None:
            plan.pip.append("pyzmq>=25")
        return plan
    if find_spec("torch") is None:
        plan.torch = True
        if find_spec("PyTorchUtils") is None:
            plan.problem = ("PyTorch is not installed and the PyTorch extension is missing: install the "
                            "'PyTorch' extension from the Extensions Manager, restart Slicer, and try again")
        return plan
    version = version_of("torch") or "0"
    numbers = tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())
    if numbers < MIN_TORCH:
        plan.problem = (f"PyTorch {version} is too old (this extension needs {'.'.join(map(str, MIN_TORCH))} or "
                        "newer): update it in the PyTorch extension's module, restart Slicer, and try again")
    return plan


# ----------------------------------------------------------------------------- the controller
@dataclass
class _Run:
    """What Apply captured: the result goes to these nodes only."""

    scene: object
    input_id: str
    output_id: Optional[str]
    shape: tuple
    geometry: object  # the input's own grid (before transforms)
    discarded: bool = False


class ServerConnection:
    """How the panel reaches the inference server: its address and, when both key files are set,
    CurveZMQ with this operator's certificate (a server on a network answers only the clients whose
    key it holds, and lets only trainers fine-tune or change versions).

    Raises:
        PanelError: one key file without the other, a file that cannot be read, or a certificate
            without its secret key.
    """

    def __init__(self, address: str, server_key_file: str = "", client_cert_file: str = ""):
        from LiverSegmentationLogic.errors import CurveKeyError
        from LiverSegmentationLogic.remote.client import curve_options

        self.address = address
        try:
            self.curve = curve_options(server_key_file, client_cert_file)
        except CurveKeyError as exc:
            raise PanelError(str(exc)) from exc

    @classmethod
    def from_settings(cls, settings) -> "ServerConnection":
        return cls(settings["serverAddress"], settings["serverKeyFile"], settings["clientCertFile"])

    def client(self, **options):
        """A new ``InferenceClient`` (``options``: its timeouts and retries)."""
        from LiverSegmentationLogic.remote.client import InferenceClient

        return InferenceClient(self.address, **self.curve, **options)


def default_job_starter(backend: str, volume, ff_map, model: str, device: str, margin_mm: float, ff_unit: str,
                        server: Optional[ServerConnection], study: Optional[str] = None,
                        python: Optional[str] = None):
    """A local process (``liverseg segment`` in PythonSlicer) or a remote thread job; ``study``
    picks the model version active for that study."""
    if backend == "Remote":
        return RemoteJob(server.client(), volume, ff_map, margin_mm=margin_mm, ff_unit=ff_unit, study=study)
    python = python or shutil.which("PythonSlicer") or sys.executable
    return LocalProcessJob(volume, ff_map, model=model or None, device=device, margin_mm=margin_mm,
                           ff_unit=ff_unit, python=python, study=study)


class PanelController:
    """The state behind the LiverSegmentation panel.

    Args:
        settings: a :class:`PanelSettings`.
        start_job: ``(backend, volume, ff_map, model, device, margin_mm, ff_unit, server, study) -> job``
            (``server``: a :class:`ServerConnection` for the Remote backend, else None);
            default :func:`default_job_starter`.
        clock: seconds, monotonic (tests pass a fake one).
        readout_delay_s: quiet time after the last edit before the readout is recomputed.
    """

    def __init__(self, settings: PanelSettings, start_job: Callable = default_job_starter,
                 clock: Callable[[], float] = time.monotonic, readout_delay_s: float = 0.4):
        self.settings = settings
        self._start_job = start_job
        self.clock = clock
        self.readout_delay_s = readout_delay_s
        self.status = ""
        self.progress = (0, 0)
        self.job = None
        self._run: Optional[_Run] = None
        self.result_node = None  # the segmentation the last run wrote (the widget selects it)
        self.review: Optional[dict] = None  # slices to check, from the last run
        # readouts
        self.readout: Optional[dict] = None
        self.readout_error: Optional[str] = None
        self.readout_table = None
        self._selection = (None, None, None)  # input, fat-fraction map, segmentation nodes
        self._readout_due: Optional[float] = None
        self._readout_job: Optional[ThreadJob] = None
        self._ff_cache: tuple = (None, None)  # ((node id, modified time), (Volume, unit))
        # short background tasks: test connection, export
        self.task = None
        self._task_kind = None
        self.task_result = None
        self.task_outcome: Optional[tuple] = None  # (kind, DONE/FAILED/CANCELLED, result or error) of the last task
        # adapting the model to the study: a fine-tune (local process or the server's) and its last status
        self.finetune = None
        self.finetune_status: Optional[dict] = None

    @property
    def state(self) -> str:
        return IDLE if self.job is None else RUNNING

    @property
    def running(self) -> bool:
        return self.job is not None

    # ------------------------------------------------------------------ segmentation
    def start(self, input_node, ff_node=None, output_node=None):
        """Start segmenting ``input_node`` with the settings' backend, model and device."""
        if self.running:
            raise PanelError("a segmentation is already running")
        if input_node is None:
            raise PanelError("select an input volume")
        s = self.settings
        server = ServerConnection.from_settings(s) if s["backend"] == "Remote" else None
        volume = bridge.volume_from_node(input_node)  # world grid: TransformError for a warped volume
        ff_map = bridge.volume_from_node(ff_node) if ff_node is not None else None
        self._run = _Run(
            scene=input_node.GetScene(), input_id=input_node.GetID(),
            output_id=output_node.GetID() if output_node is not None else None,
            shape=volume.array.shape, geometry=bridge.geometry_from_volume_node(input_node, world=False),
        )
        try:
            self.job = self._start_job(s["backend"], volume, ff_map, s["model"], s["device"], s["marginMm"],
                                       s["ffUnit"], server, s["study"].strip() or None)
        except Exception:
            self._run = None
            raise
        self.progress, self.status = (0, 0), "Segmenting..."

    def cancel(self):
        if self.job is not None:
            self.job.cancel()
            self.status = "Cancelling..."

    def scene_closing(self):
        """Close Scene: stop the job and forget everything that pointed into the scene."""
        if self._run is not None:
            self._run.discarded = True
        self.cancel()
        self._selection = (None, None, None)
        self._readout_due = None
        self._ff_cache = (None, None)
        self.result_node = self.readout = self.readout_error = self.readout_table = self.review = None

    def tick(self):
        """Called from a timer on the GUI thread: advances the job, the readout and the tasks.
        Never blocks."""
        if self.job is not None:
            for event in self.job.poll():
                if event[0] == "progress":
                    _, done, total, stage = event
                    self.progress = (done, total)
                    self.status = f"{stage}: {done} of {total} slices"
            if self.job.finished:
                self._finish()
        self._tick_readout()
        self._tick_task()
        self._tick_finetune()

    def _finish(self):
        job, run = self.job, self._run
        self.job, self._run = None, None  # whatever happens next, the panel is free
        try:
            if run.discarded:
                self.status = "The scene was closed during the run: the result was discarded."
            elif job.state == CANCELLED:
                self.status = "Cancelled."
            elif job.state == FAILED:
                self.status = f"Segmentation failed: {job.error}"
            else:
                self.result_node = self._write_result(job, run)
                self.review = job.readout.get("review")
                model = job.readout["model"]
                self.status = f"Done: {model['name']} {model['version']}"
                self._readout_due = self.clock()
        except Exception as exc:  # e.g. a node removed meanwhile: a message, and the panel stays usable
            self.status = f"Could not show the result: {exc}"

    def _write_result(self, job, run: _Run):
        scene = run.scene
        input_node = scene.GetNodeByID(run.input_id)
        if input_node is None or input_node.GetImageData() is None:
            raise PanelError("the input volume was removed during the run; the result was discarded")
        if (bridge.volume_shape(input_node) != run.shape
                or not bridge.geometry_from_volume_node(input_node, world=False).allclose(run.geometry)):
            raise PanelError("the input volume's voxels or grid changed during the run; the result was discarded")
        if job.labels is None or job.labels.shape != run.shape:
            raise PanelError("the result does not fit the input volume's grid")
        output = scene.GetNodeByID(run.output_id) if run.output_id else None
        classes = job.classes or classes_of_model(job.readout["model"]["name"])
        node = bridge.segmentation_from_labels(job.labels, run.geometry, classes, input_node,
                                               name=f"{input_node.GetName()} segmentation", segmentation_node=output)
        bridge.store_suggestion(node, job.labels, input_node)
        node.SetAttribute(MODEL_ATTRIBUTE, json.dumps(job.readout["model"]))
        node.SetAttribute(CLASSES_ATTRIBUTE, json.dumps(classes))
        node.SetAttribute(AUDIT_ATTRIBUTE, json.dumps(job.readout.get("audit")))
        return node

    # ------------------------------------------------------------------ readouts
    def select(self, input_node=None, ff_node=None, segmentation_node=None):
        """The panel's current selection (the readout follows it); schedules a readout."""
        self._selection = (input_node, ff_node, segmentation_node)
        self.segmentation_edited()

    def segmentation_edited(self, *_):
        """An edit (or a new selection): recompute the readout once edits pause."""
        self._readout_due = self.clock() + self.readout_delay_s

    def _tick_readout(self):
        if self._readout_job is not None:
            self._readout_job.poll()
            if not self._readout_job.finished:
                return
            job, self._readout_job = self._readout_job, None
            if job.state == DONE:
                self.readout, self.readout_error = job.result, None
                self._write_table()
            elif job.state == FAILED:
                self.readout, self.readout_error = None, job.error
        if self._readout_due is None or self.clock() < self._readout_due or self.running:
            return
        self._readout_due = None
        try:
            self._readout_job = self._start_readout()
        except Exception as exc:  # shown next to the readout, not as a dialog on every stroke
            self.readout, self.readout_error = None, str(exc)

    def _start_readout(self) -> Optional[ThreadJob]:
        input_node, ff_node, segmentation = self._selection
        if input_node is None or segmentation is None:
            self.readout, self.readout_error = None, None
            return None
        from LiverSegmentationLogic.readouts.measurements import segmentation_readouts

        classes = classes_of_segmentation(segmentation)
        # on the GUI thread: what needs MRML (the labels, the map); the arithmetic runs in a thread
        labels = bridge.labels_from_segmentation(segmentation, input_node, classes)
        geometry = bridge.geometry_from_volume_node(input_node)
        ff_map, unit = self.fat_fraction_map(ff_node)
        return ThreadJob(segmentation_readouts, labels, geometry, classes, ff_map, self.settings["marginMm"], unit)

    def fat_fraction_map(self, ff_node):
        """The map as a Volume and its unit, read once per map (not once per stroke)."""
        if ff_node is None:
            return None, "auto"
        key = (ff_node.GetID(), ff_node.GetMTime(), ff_node.GetImageData().GetMTime(), self.settings["ffUnit"])
        if self._ff_cache[0] != key:
            from LiverSegmentationLogic.readouts.measurements import detect_fat_fraction_unit

            volume = bridge.volume_from_node(ff_node)
            unit = self.settings["ffUnit"]
            self._ff_cache = (key, (volume, detect_fat_fraction_unit(volume.array) if unit == "auto" else unit))
        return self._ff_cache[1]

    def _write_table(self):
        segmentation = self._selection[2]
        model = model_of_segmentation(segmentation) if segmentation is not None else None
        self.readout_table = bridge.readout_table(self.readout, model, self.readout_table)

    # ------------------------------------------------------------------ background tasks
    def _start_task(self, kind: str, work, *args, **kwargs):
        if self.task is not None:
            raise PanelError("another task is still running")
        self.task, self._task_kind, self.task_result = ThreadJob(work, *args, **kwargs), kind, None
        self.task_outcome = None

    def _tick_task(self):
        if self.task is None:
            return
        self.task.poll()
        if not self.task.finished:
            return
        task, kind, self.task = self.task, self._task_kind, None
        self.task_outcome = (kind, task.state, task.result if task.state == DONE else task.error)
        if task.state != DONE:
            self.status = f"{kind} failed: {task.error}"
            return
        self.task_result = task.result
        if kind == "Test connection":
            self.status = describe_server(task.result)
        elif kind == "Model change":
            self.status = f"The study now uses {task.result} on the server"
        else:
            record, where = task.result
            self.status = f"Queued as {record['case_id']} in {where}"

    # ------------------------------------------------------------------ adapting to the study
    def adaptation_summary(self) -> dict:
        """For the chosen model and the study field: the study's queued cases (local queue of the
        task), its versions (oldest first) and the version it uses now."""
        from LiverSegmentationLogic.models import catalog
        from LiverSegmentationLogic.studies.case_queue import CaseQueue

        model, study = _adaptation(self.settings)
        tag = catalog.study_tag(study)
        folder = self._model_queue_folder(model)
        queued = 0
        if tag and (folder / "dataset.json").exists():
            queued = sum(1 for m in CaseQueue(folder).list() if catalog.study_tag(m.get("study")) == tag)
        versions = [e.ref for e in catalog.list_models() if e.name == model and tag and f"+{tag}-" in e.version]
        return {"study": tag, "queue": str(folder), "queued": queued, "versions": versions,
                "active": catalog.find_model(model, study).ref}

    def finetune_now(self):
        """Fine-tune the study's model line on its corrected cases: in a local process (Local) or
        on the server (Remote, trainers only). Never blocks; :meth:`tick` follows it."""
        from LiverSegmentationLogic.remote.finetune_runs import FinetuneRun

        if self.finetune is not None:
            raise PanelError("a fine-tuning is already running")
        s = self.settings
        model, study = _adaptation(s)
        if not study:
            raise PanelError("enter the study: fine-tuning adapts the model to one study")
        if s["backend"] == "Remote":
            self.finetune = _RemoteFinetune(ServerConnection.from_settings(s), model, study, s["finetuneBudget"])
        else:
            folder = self._model_queue_folder(model)
            python = shutil.which("PythonSlicer") or sys.executable
            self.finetune = FinetuneRun(model, str(folder), study, s["replayFolder"] or None, s["finetuneBudget"],
                                        s["device"], python=python)
        self.finetune_status = {"state": "running", "epoch": 0}
        self.status = "Fine-tuning started"

    def cancel_finetune(self):
        if self.finetune is not None:
            self.finetune.cancel()

    def _tick_finetune(self):
        if self.finetune is None:
            return
        state = self.finetune.state
        self.finetune_status = self.finetune.status()
        if state != "running":
            self.finetune = None
        self.status = describe_finetune(self.finetune_status)

    def use_version(self, ref: str):
        """Make a version of the study's line the one the study uses (an operator's override); on
        the server with the Remote backend (trainers only)."""
        self._change_version("activate", ref)

    def roll_back(self):
        """Back to the version the study used before the last change ('Keep the current model')."""
        self._change_version("rollback", self.settings["model"])

    def _change_version(self, op: str, ref: str):
        from LiverSegmentationLogic.models import catalog

        _, study = _adaptation(self.settings)
        if self.settings["backend"] == "Remote":
            server = ServerConnection.from_settings(self.settings)

            def change():
                with server.client() as client:
                    return getattr(client, op)(ref, study=study)

            self._start_task("Model change", change)
            return
        entry = catalog.activate(ref, study=study) if op == "activate" else catalog.rollback(ref, study=study)
        self.status = f"The study now uses {catalog.find_model(entry.name, study).ref}"

    def test_connection(self):
        """Ask the server for its info, off the GUI thread (a down server takes seconds to time out)."""
        server = ServerConnection.from_settings(self.settings)

        def info():
            with server.client(connect_timeout_s=3, retries=0) as client:
                return client.info()

        self._start_task("Test connection", info)
        self.status = f"Asking {server.address}..."

    # ------------------------------------------------------------------ export
    def queue_folder_for(self, task: str) -> Path:
        """The default queue of a task: one folder per task under the queue folder setting."""
        return Path(self.settings["queueFolder"]) / task

    def _model_queue_folder(self, model: str) -> Path:
        """The queue of the task a (local) model serves."""
        from LiverSegmentationLogic.models import catalog

        return self.queue_folder_for(catalog.find_model(model).card.get("task", model))

    def export(self, input_node, segmentation_node):
        """Queue the reviewed case: locally (a folder per task) or on the server (Remote backend)."""
        s = self.settings
        if self.running:
            raise PanelError("wait for the segmentation to finish")
        if input_node is None or segmentation_node is None:
            raise PanelError("select the input volume and its segmentation")
        operator = s["operatorName"].strip()
        if not operator:
            raise PanelError("enter the operator's name before exporting (it is recorded with the case)")
        model = model_of_segmentation(segmentation_node)
        if model is None:
            raise PanelError("this segmentation was not made by LiverSegmentation: apply a model first")
        classes = classes_of_segmentation(segmentation_node)
        meta = {"study": s["study"].strip(), "operator": operator, "model": f"{model['name']} {model['version']}",
                "task": model.get("task", model["name"]), "modality": model.get("modality") or None,
                "suggestion_audit": json.loads(segmentation_node.GetAttribute(AUDIT_ATTRIBUTE) or "null")}
        image, corrected, record = bridge.reviewed_case(input_node, segmentation_node, classes,
                                                        bridge.suggestion_of(segmentation_node), meta)
        labels = {c["name"]: int(c["label"]) for c in classes}
        if s["backend"] == "Remote":
            self._start_task("Export", _submit_remote, ServerConnection.from_settings(s), image, corrected, record,
                             labels)
        else:
            folder = self.queue_folder_for(meta["task"])
            self._start_task("Export", _write_local, folder, image, corrected, record, labels, meta["modality"])
        self.status = "Exporting..."


def _write_local(folder, image, corrected, record, labels, modality):
    from LiverSegmentationLogic.studies.case_queue import CaseQueue

    queue = CaseQueue(folder, labels=labels, modality=modality)
    return queue.add(image, corrected, record), str(folder)


def _submit_remote(server: ServerConnection, image, corrected, record, labels):
    with server.client() as client:
        return client.submit(image, corrected, record, labels=labels), f"the server's queue ({server.address})"


# ----------------------------------------------------------------------------- adapting to a study
class _RemoteFinetune:
    """A fine-tune on the server, followed from a thread (the server answers in seconds)."""

    def __init__(self, server: ServerConnection, model: str, study: Optional[str], time_budget_s: float):
        self._status: dict = {"state": "running", "epoch": 0, "epochs": None, "loss": None, "outcome": None}
        self._cancel = False
        self._job = ThreadJob(self._follow, server, model, study, time_budget_s)

    def _follow(self, server, model, study, time_budget_s):
        with server.client() as client:
            self._status = client.train(model=model, study=study, time_budget_s=time_budget_s)
            while self._status["state"] == "running":
                time.sleep(2.0)
                self._status = client.train_cancel() if self._cancel else client.train_status()

    def status(self) -> dict:
        return self._status

    @property
    def state(self) -> str:
        self._job.poll()
        if self._job.state == FAILED:
            self._status = dict(self._status, state="failed", outcome=self._job.error)
        return self._status["state"]

    def cancel(self):
        self._cancel = True


def describe_finetune(status: dict) -> str:
    """A fine-tune's outcome in words."""
    state, outcome = status["state"], status.get("outcome") or ""
    if state == "running":
        total = f"/{status['epochs']}" if status.get("epochs") else ""
        loss = f", loss {status['loss']:.3f}" if status.get("loss") is not None else ""
        return f"Fine-tuning: epoch {status.get('epoch', 0)}{total}{loss}"
    if state == "promoted":
        return f"Promoted and now used for this study: {outcome}"
    if state == "not promoted":
        return f"Not promoted, the current model stays ('Use it' overrides): {outcome}"
    if state == "cancelled":
        return "Fine-tuning cancelled: the current model stays."
    tail = next((line for line in reversed(status.get("log") or []) if line.strip()), outcome)
    return f"Fine-tuning failed: {tail}"


def _adaptation(controller_settings) -> tuple:
    s = controller_settings
    return s["model"], (s["study"].strip() or None)


# ----------------------------------------------------------------------------- helpers
def forget_imported(packages) -> list:
    """Drop these packages' modules from ``sys.modules`` so that the next import reads them again
    (Slicer's Reload re-imports only the module file itself). Returns the names dropped."""
    dropped = [name for name in list(sys.modules) if name.split(".")[0] in packages]
    for name in dropped:
        del sys.modules[name]
    return dropped


def classes_of_model(name: str) -> list:
    """A local model's card classes."""
    from LiverSegmentationLogic.models.catalog import CARD_NAME, resolve_model_folder

    return json.loads((resolve_model_folder(name) / CARD_NAME).read_text())["classes"]


def model_of_segmentation(segmentation_node) -> Optional[dict]:
    text = segmentation_node.GetAttribute(MODEL_ATTRIBUTE)
    return json.loads(text) if text else None


def classes_of_segmentation(segmentation_node) -> list:
    """The classes of the model that made this segmentation (the default model's for others)."""
    text = segmentation_node.GetAttribute(CLASSES_ATTRIBUTE)
    return json.loads(text) if text else classes_of_model(DEFAULT_SETTINGS["model"])


def describe_server(info: dict) -> str:
    model = info.get("models") or {}
    tasks = ", ".join(f"{task} ({ref or 'no model'})" for task, ref in (info.get("tasks") or {}).items())
    return (f"Server {info['server_version']} (protocol {info['protocol']}), {info['workers']} worker(s) on "
            f"{', '.join(info['devices']) or '-'}; model {model.get('name')} {model.get('version')}; "
            f"tasks there: {tasks or '-'}")


def readout_html(readout: Optional[dict], error: Optional[str], segmentation_node=None) -> str:
    """The readout box's text."""
    if error:
        return f"<span style='color:#c0392b'>Readout: {error}</span>"
    if not readout:
        return "No segmentation yet."
    quality = readout.get("quality") or {}
    rows = []
    if quality.get("status") == "needs review":
        rows.append("<b style='color:#c0392b'>Needs review</b>: " + "; ".join(quality["reasons"]))
    elif quality.get("status") == "ok":
        rows.append("<b style='color:#27ae60'>Quality check: ok</b>")
    rows += [f"<b>{name} volume</b>: {ml:.1f} mL" for name, ml in readout["volumes_ml"].items()]
    ff = readout.get("fat_fraction")
    if ff:
        flag = "<b style='color:#c0392b'>steatosis</b>" if ff["steatosis"] else "no steatosis"
        rows.append(f"<b>PDFF</b>: median {ff['median']:.1f} %, mean {ff['mean']:.1f} % ({flag})")
    else:
        rows.append("PDFF: select a fat-fraction map")
    model = model_of_segmentation(segmentation_node) if segmentation_node is not None else None
    if model:
        rows.append(f"<i>model {model['name']} {model['version']}</i>")
    return "<br>".join(rows)
