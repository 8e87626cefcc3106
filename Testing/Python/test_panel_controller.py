"""The panel's controller on slicer-core: a real MRML scene, real background processes, a fake clock.

Each test is an operator's path through the panel that went wrong before the controller existed:
selectors switched mid-run, Close Scene mid-run, cancel through a launcher, a finish that raises, a
reopened scene exported, transforms, settings, dependencies, a server that is down.
"""

from __future__ import annotations

import json
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from LiverSegmentationLogic.io.volumes import Geometry, Volume, crop_volume
from LiverSegmentationLogic.readouts.metrics import dice
from import_guard import run_without

slicer = pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")

from LiverSegmentationLib import mrml_bridge as bridge  # noqa: E402
from LiverSegmentationLib import panel_controller as pc  # noqa: E402
from LiverSegmentationLib.jobs import DONE, LocalProcessJob  # noqa: E402


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture()
def clean_scene(scene):
    scene.Clear(0)
    yield scene
    scene.Clear(0)


@pytest.fixture(scope="module")
def small_case(sample_case):
    """Eight slices of the sample through the liver, with its liver reference."""
    image, reference = sample_case
    z = int(np.argmax(np.count_nonzero(reference == 1, axis=(1, 2))))
    box = (slice(z - 4, z + 4), slice(None), slice(None))
    return crop_volume(image, box), (reference[box] == 1)


def controller_with(tmp_path, clock=None, **settings):
    store = pc.DictSettings()
    s = pc.PanelSettings(store)
    s["queueFolder"] = str(tmp_path / "queues")
    for key, value in settings.items():
        s[key] = value
    return pc.PanelController(s, clock=clock or FakeClock())


def wait_for_task(controller, timeout=60):
    """Tick until the controller's background task (export, model change, test connection) ends;
    its status line."""
    deadline = time.monotonic() + timeout
    while controller.task is not None and time.monotonic() < deadline:
        controller.tick()
        time.sleep(0.02)
    assert controller.task is None, "the task did not end"
    return controller.status


def run_until_idle(controller, timeout=180, max_tick_s=None):
    deadline = time.monotonic() + timeout
    slowest = 0.0
    while controller.running and time.monotonic() < deadline:
        t0 = time.perf_counter()
        controller.tick()
        slowest = max(slowest, time.perf_counter() - t0)
        time.sleep(0.05)
    assert not controller.running, "the job did not end"
    if max_tick_s is not None:
        assert slowest < max_tick_s, f"a tick blocked the GUI thread for {slowest:.2f}s"
    return slowest


def settle_readout(controller, clock, timeout=30):
    clock.now += 10
    deadline = time.monotonic() + timeout
    controller.tick()
    while controller._readout_job is not None and time.monotonic() < deadline:
        time.sleep(0.02)
        controller.tick()


# ------------------------------------------------------------------ the job lifecycle
def test_result_goes_to_the_nodes_captured_at_apply(clean_scene, small_case, tmp_path):
    """Switching the input and output selectors mid-run changes nothing: volume A's labels land on
    the segmentation captured at Apply, and the segmentation picked mid-run keeps its segments."""
    image, liver = small_case
    a = bridge.add_volume_node(image, "A")
    b = bridge.add_volume_node(Volume(image.array[:5, :100, :90].copy(), image.geometry), "B")
    captured = clean_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "captured")
    other = clean_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "picked mid-run")
    other.GetSegmentation().AddEmptySegment("keep me")
    controller = controller_with(tmp_path)
    controller.start(a, None, captured)
    controller.select(b, None, other)  # the operator changes the selectors while it runs
    run_until_idle(controller)
    assert controller.status.startswith("Done"), controller.status
    assert controller.result_node is captured
    labels = bridge.labels_from_segmentation(captured, a, pc.classes_of_segmentation(captured))
    assert dice(labels == 1, liver) > 0.85
    assert other.GetSegmentation().GetNumberOfSegments() == 1 and other.GetSegmentation().GetSegment("keep me")
    # the suggestion travels with the segmentation, as a hidden labelmap node saved with the scene
    suggestion = bridge.suggestion_of(captured)
    np.testing.assert_array_equal(suggestion, labels)
    node = captured.GetNodeReference(bridge.SUGGESTION_ROLE)
    assert node.GetHideFromEditors() and node.IsA("vtkMRMLLabelMapVolumeNode")


def test_an_input_changed_during_the_run_gets_no_labels(clean_scene, small_case, tmp_path):
    image, _ = small_case
    a = bridge.add_volume_node(image, "A")
    controller = controller_with(tmp_path)
    controller.start(a)
    slicer.util.updateVolumeFromArray(a, np.zeros((3, 20, 20), np.float32))  # another scan loaded into A
    run_until_idle(controller)
    assert "changed during the run" in controller.status
    assert clean_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert not controller.running


def test_close_scene_mid_run_discards_the_result(clean_scene, small_case, tmp_path):
    image, _ = small_case
    a = bridge.add_volume_node(image, "A")
    controller = controller_with(tmp_path)
    controller.start(a)
    controller.scene_closing()
    clean_scene.Clear(0)
    run_until_idle(controller, timeout=30)
    assert "scene was closed" in controller.status or controller.status == "Cancelled."
    assert clean_scene.GetNumberOfNodes() == 0


LAUNCHER = """#!{python}
# like PythonSlicer -> python-real: a launcher that starts the real interpreter and waits; the real
# one leaves the launcher's process group (as nothing groups processes on Windows)
import os, subprocess, sys
child = subprocess.Popen([sys.executable] + sys.argv[1:], start_new_session=True)
open(os.environ["LIVERSEG_TEST_PIDS"], "w").write(f"{{os.getpid()}} {{child.pid}}")
sys.exit(child.wait())
"""


def test_cancel_through_a_launcher_ends_both_processes_without_blocking(clean_scene, sample_case, tmp_path,
                                                                          monkeypatch):
    psutil = pytest.importorskip("psutil")
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(LAUNCHER.format(python=sys.executable))
    launcher.chmod(launcher.stat().st_mode | stat.S_IEXEC)
    pids = tmp_path / "pids"
    monkeypatch.setenv("LIVERSEG_TEST_PIDS", str(pids))

    def start_job(backend, volume, ff_map, model, device, margin_mm, ff_unit, server, study):
        return LocalProcessJob(volume, ff_map, model=model, device=device, python=str(launcher))

    a = bridge.add_volume_node(sample_case[0], "A")
    controller = pc.PanelController(pc.PanelSettings(pc.DictSettings()), start_job=start_job, clock=FakeClock())
    controller.start(a)
    deadline = time.monotonic() + 120
    while controller.progress == (0, 0) and time.monotonic() < deadline:  # the real worker is segmenting
        controller.tick()
        time.sleep(0.05)
    launcher_pid, worker_pid = map(int, pids.read_text().split())
    controller.cancel()
    t0 = time.monotonic()
    run_until_idle(controller, timeout=10, max_tick_s=0.5)
    assert controller.status == "Cancelled." and time.monotonic() - t0 < 5
    for pid in (launcher_pid, worker_pid):
        gone = not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert gone, f"process {pid} survived the cancel"


class _DoneJob:
    """A job that has finished (its process boundary is what the other tests exercise)."""

    def __init__(self, labels, readout, classes=None):
        self.state, self.labels, self.readout, self.classes, self.error = DONE, labels, readout, classes, None
        self.finished = True

    def poll(self):
        return []

    def cancel(self):
        pass


def test_a_finish_that_raises_returns_the_panel_to_idle(clean_scene, small_case, tmp_path):
    """A remote server's model this machine does not have (and no classes sent): a message, not a
    panel stuck on 'Cancel'."""
    image, liver = small_case
    a = bridge.add_volume_node(image, "A")
    readout = {"model": {"name": "model-only-on-the-server", "version": "9"}}
    controller = pc.PanelController(pc.PanelSettings(pc.DictSettings()),
                                    start_job=lambda *args: _DoneJob(liver.astype(np.uint8), readout),
                                    clock=FakeClock())
    controller.start(a)
    controller.tick()
    assert controller.state == pc.IDLE and controller.job is None
    assert controller.status.startswith("Could not show the result") and "model-only-on-the-server" in controller.status
    controller.start(a)  # and it can run again
    assert controller.running


# ------------------------------------------------------------------ readouts
def reviewed_case(tmp_path, small_case, **settings):
    """A controller (fake clock) whose last run put the small case's reference liver, as a model
    suggestion, on volume A: (image, liver, clock, controller, A, segmentation)."""
    image, liver = small_case
    clock = FakeClock()
    controller = controller_with(tmp_path, clock=clock, **settings)
    a = bridge.add_volume_node(image, "A")
    return image, liver, clock, controller, a, _finished_segmentation(controller, a, liver)


def _finished_segmentation(controller, input_node, labels, name="liver-mr-t2"):
    from LiverSegmentationLogic.models.catalog import find_model

    card = find_model(name).card
    model = {k: card[k] for k in ("name", "version", "sha256")} | {"task": card["task"], "modality": card["modality"]}
    controller._start_job = lambda *args: _DoneJob(labels.astype(np.uint8), {"model": model, "audit": None})
    controller.start(input_node)
    controller.tick()
    assert controller.status.startswith("Done"), controller.status
    return controller.result_node


def test_readout_waits_for_edits_to_pause_and_reports_errors_in_place(clean_scene, small_case, tmp_path):
    image, liver, clock, controller, a, segmentation = reviewed_case(tmp_path, small_case)
    controller.select(a, None, segmentation)
    settle_readout(controller, clock)
    expected = liver.sum() * image.geometry.voxel_volume_ml
    assert controller.readout["volumes_ml"]["liver"] == pytest.approx(expected, rel=1e-6)
    # strokes 0.1 s apart: nothing is recomputed until they pause for the delay
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("liver")
    for _ in range(3):
        controller.segmentation_edited()
        clock.now += 0.1
        controller.tick()
        assert controller._readout_job is None
    edited = liver.copy()
    edited[:, :, :128] = False  # the operator erases half the liver
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited.astype(np.uint8), segmentation, segment_id, a)
    settle_readout(controller, clock)
    assert controller.readout["volumes_ml"]["liver"] == pytest.approx(edited.sum() * image.geometry.voxel_volume_ml)
    assert controller.readout_table is not None
    # a PDFF map, then the liver erased to nothing: a message next to the readout, no exception
    ff = bridge.add_volume_node(Volume(np.where(liver, 8.0, 60.0).astype(np.float32), image.geometry), "PDFF")
    controller.select(a, ff, segmentation)
    settle_readout(controller, clock)
    assert controller.readout["fat_fraction"]["median"] == pytest.approx(8.0)
    slicer.util.updateSegmentBinaryLabelmapFromArray(np.zeros_like(liver, np.uint8), segmentation, segment_id, a)
    controller.segmentation_edited()
    settle_readout(controller, clock)
    assert controller.readout is None and "empty" in controller.readout_error
    assert "Readout:" in pc.readout_html(None, controller.readout_error)


def test_a_stroke_costs_the_gui_thread_little_on_a_large_map(clean_scene, small_case, tmp_path):
    """300 x 512 x 512 PDFF map: the map is read once, the arithmetic runs off the GUI thread."""
    image, liver, clock, controller, a, segmentation = reviewed_case(tmp_path, small_case, ffUnit="percent")
    big = np.full((300, 512, 512), 7.0, np.float32)
    g = image.geometry
    ff = bridge.add_volume_node(Volume(big, Geometry((0.8, 0.8, 1.0), (g.origin[0] - 20, g.origin[1] - 20,
                                                                         g.origin[2] - 150), g.direction)), "PDFF")
    controller.select(a, ff, segmentation)
    settle_readout(controller, clock, timeout=120)  # the first readout copies the map once
    assert controller.readout["fat_fraction"]["median"] == pytest.approx(7.0)
    times = []
    for _ in range(3):
        controller.segmentation_edited()
        clock.now += 10
        t0 = time.perf_counter()
        controller.tick()  # what the GUI thread does for one stroke
        times.append(time.perf_counter() - t0)
        settle_readout(controller, clock, timeout=120)
    print(f"GUI-thread cost per stroke: {min(times) * 1000:.0f} ms")
    assert min(times) < 0.5


# ------------------------------------------------------------------ export
def _save_and_reopen(scene, folder: Path):
    """Save every storable node and the scene, close it, open another case, and load it back
    (node IDs start again, as after Close Scene in Slicer)."""
    folder.mkdir()
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    for node in nodes:
        if node.IsA("vtkMRMLStorableNode") and not node.IsA("vtkMRMLTableNode"):
            if node.GetStorageNode() is None:
                node.AddDefaultStorageNode()
            ending = ".seg.nrrd" if node.IsA("vtkMRMLSegmentationNode") else ".nrrd"
            node.GetStorageNode().SetFileName(str(folder / f"{node.GetID()}{ending}"))
            assert node.GetStorageNode().WriteData(node)
    scene.SetRootDirectory(str(folder))
    scene.SetURL(str(folder / "case.mrml"))
    assert scene.Commit()
    scene.Clear(0)
    bridge.add_volume_node(Volume(np.ones((3, 4, 4), np.float32), Geometry.identity()), "another case")
    scene.SetURL(str(folder / "case.mrml"))
    assert scene.Import()


def test_a_reopened_scene_is_exported_against_its_own_suggestion(clean_scene, small_case, tmp_path):
    image, liver, clock, controller, a, segmentation = reviewed_case(tmp_path, small_case, study="TRIAL-7")
    edited = liver.copy()
    edited[:, 100:140] = False
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("liver")
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited.astype(np.uint8), segmentation, segment_id, a)
    _save_and_reopen(clean_scene, tmp_path / "saved")
    controller.scene_closing()
    segmentation = next(clean_scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
                        for i in range(clean_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")))
    a = next(n for n in (clean_scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                         for i in range(clean_scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")))
             if n.GetName() == "A")
    with pytest.raises(pc.PanelError, match="operator"):
        controller.export(a, segmentation)  # nobody named: refused
    controller.settings["operatorName"] = "ana"
    controller.export(a, segmentation)
    wait_for_task(controller)
    record, where = controller.task_result
    assert where == str(tmp_path / "queues" / "liver-mr-t2")  # a queue per task
    assert controller.status == f"Queued as {record['case_id']} in {where}"
    assert record["operator"] == "ana" and record["study"] == "TRIAL-7" and record["modality"] == "MR"
    assert record["suggestion_dice"]["liver"] == pytest.approx(dice(liver, edited), abs=1e-6)
    assert record["changed_volume_ml"]["liver"] == pytest.approx(
        (edited.sum() - liver.sum()) * image.geometry.voxel_volume_ml, rel=1e-6)
    dataset = json.loads((Path(where) / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "liver": 1} and dataset["channel_names"] == {"0": "MR"}


# ------------------------------------------------------------------ transforms
def test_transformed_volumes_are_processed_where_slicer_shows_them(clean_scene, small_case, tmp_path):
    image, liver = small_case
    clock = FakeClock()
    controller = controller_with(tmp_path, clock=clock)
    a = bridge.add_volume_node(image, "A")
    shift = slicer.vtkMRMLLinearTransformNode()
    clean_scene.AddNode(shift)
    matrix = np.eye(4)
    matrix[:3, 3] = (30.0, -12.0, 50.0)  # A is shown 30 mm right, 12 mm posterior, 50 mm up
    shift.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    a.SetAndObserveTransformNodeID(shift.GetID())
    world = bridge.geometry_from_volume_node(a)
    np.testing.assert_allclose(np.subtract(world.origin, image.geometry.origin), (-30.0, 12.0, 50.0), atol=1e-6)
    segmentation = _finished_segmentation(controller, a, liver)
    assert segmentation.GetTransformNodeID() == shift.GetID()  # it follows the input
    # a PDFF map acquired where A is shown (world coordinates), with no transform of its own
    ff_array = np.where(liver, 12.0, 70.0).astype(np.float32)
    ff = bridge.add_volume_node(Volume(ff_array, world), "PDFF")
    controller.select(a, ff, segmentation)
    settle_readout(controller, clock)
    assert controller.readout["fat_fraction"]["median"] == pytest.approx(12.0)
    warp = slicer.vtkMRMLGridTransformNode()
    clean_scene.AddNode(warp)
    a.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(bridge.TransformError, match="harden"):
        controller.start(a)


# ------------------------------------------------------------------ settings, dependencies, server
def test_settings_survive_a_new_panel_and_come_back_typed():
    store = pc.DictSettings()
    first = pc.PanelSettings(store)
    first["serverAddress"] = "tcp://gpu:5555"
    first["operatorName"] = "ana"
    store.setValue("LiverSegmentation/marginMm", "4.5")  # QSettings hands back strings
    second = pc.PanelSettings(store)
    assert second["serverAddress"] == "tcp://gpu:5555" and second["operatorName"] == "ana"
    assert second["marginMm"] == 4.5 and second["backend"] == "Local"
    with pytest.raises(KeyError):
        second["nope"] = 1


def test_the_dependency_plan_per_backend():
    present = lambda name: object()  # noqa: E731
    missing = lambda name: None  # noqa: E731
    assert pc.dependency_plan("Remote", find_spec=present).ready
    plan = pc.dependency_plan("Remote", find_spec=missing)
    assert plan.pip == ["pyzmq>=25"] and not plan.torch and plan.problem is None  # no torch for remote
    plan = pc.dependency_plan("Local", find_spec=lambda name: None if name == "torch" else object())
    assert plan.torch and plan.pip == [] and plan.problem is None
    plan = pc.dependency_plan("Local", find_spec=missing)
    assert "PyTorch' extension" in plan.problem
    plan = pc.dependency_plan("Local", find_spec=present, version_of=lambda name: "1.13.1+cu117")
    assert "too old" in plan.problem
    assert pc.dependency_plan("Local", find_spec=present, version_of=lambda name: "2.13.0+cpu").ready


def test_remote_needs_no_torch():
    result = run_without(("torch", "monai", "skimage"), (
        "sys.path.insert(0, 'LiverSegmentation')\n"
        "from LiverSegmentationLib.panel_controller import PanelController, default_job_starter\n"
        "from LiverSegmentationLogic.remote.client import InferenceClient\n"
    ))
    assert result.returncode == 0, result.stderr


def test_test_connection_never_blocks_the_gui(tmp_path):
    import zmq

    with zmq.Context.instance().socket(zmq.ROUTER) as probe:
        port = probe.bind_to_random_port("tcp://127.0.0.1")  # nobody listens there afterwards
    controller = controller_with(tmp_path, serverAddress=f"tcp://127.0.0.1:{port}")
    t0 = time.perf_counter()
    controller.test_connection()
    assert time.perf_counter() - t0 < 0.2
    deadline = time.monotonic() + 20
    while controller.task is not None and time.monotonic() < deadline:
        t0 = time.perf_counter()
        controller.tick()
        assert time.perf_counter() - t0 < 0.2
        time.sleep(0.05)
    assert controller.status.startswith("Test connection failed") and "unreachable" in controller.status


def test_save_csv_failure_is_an_error(clean_scene, tmp_path):
    table = bridge.readout_table({"volumes_ml": {"liver": 1.0}})
    with pytest.raises(OSError, match="could not be saved"):
        bridge.save_table(table, tmp_path / "no-such-folder" / "readout.csv")
    bridge.save_table(table, tmp_path / "readout.csv")
    assert "liver volume" in (tmp_path / "readout.csv").read_text()


def test_module_does_not_shadow_the_core_package():
    source = (Path(__file__).resolve().parents[2] / "LiverSegmentation/LiverSegmentation.py").read_text()
    assert "class LiverSegmentationLogic(" not in source


def test_reload_forgets_the_helper_package_and_the_core():
    import importlib

    import LiverSegmentationLogic.readouts.measurements as before

    saved = {name: module for name, module in sys.modules.items() if name.startswith("LiverSegmentationLogic")}
    try:
        dropped = pc.forget_imported(("LiverSegmentationLogic",))
        assert "LiverSegmentationLogic.readouts.measurements" in dropped
        after = importlib.import_module("LiverSegmentationLogic.readouts.measurements")
        assert after is not before  # read again from disk
    finally:  # the other tests keep the modules (and exception classes) they imported
        for name in [n for n in sys.modules if n.startswith("LiverSegmentationLogic")]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_local_path_needs_only_torch_and_what_slicer_ships(small_case, tmp_path):
    """The panel's background process (liverseg segment) runs with tqdm, monai, pyzmq, pydicom and
    scikit-image unavailable: Slicer ships numpy, SimpleITK, scipy and pillow; torch comes from the
    PyTorch extension."""
    import SimpleITK as sitk

    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(small_case[0].to_sitk(), str(path))
    result = run_without(("tqdm", "monai", "zmq", "pydicom", "skimage"),
                         "from LiverSegmentationLogic.cli import main\nsys.exit(main(sys.argv[1:]))\n",
                         "segment", str(path), "-o", str(tmp_path / "out.nrrd"), "--progress-lines", "--json",
                         str(tmp_path / "readout.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "readout.json").read_text())["volumes_ml"]["liver"] > 100


def test_adapt_to_the_study_from_the_panel(clean_scene, small_case, tmp_path, home):
    """Export a corrected case for study S, fine-tune now (a local process, progress in ticks),
    read the outcome in words, use the new version for S only, then keep the current one."""
    from LiverSegmentationLogic.models import catalog

    image, liver, clock, controller, a, segmentation = reviewed_case(tmp_path, small_case, study="S",
                                                                     operatorName="ana", finetuneBudget=10.0)
    controller.export(a, segmentation)
    wait_for_task(controller)
    summary = controller.adaptation_summary()
    assert summary["study"] == "S" and summary["queued"] == 1 and summary["versions"] == []
    base = summary["active"]
    with pytest.raises(pc.PanelError, match="enter the study"):
        pc.PanelController(pc.PanelSettings(pc.DictSettings())).finetune_now()
    controller.finetune_now()
    seen_epochs = set()
    deadline = time.monotonic() + 300
    while controller.finetune is not None and time.monotonic() < deadline:
        t0 = time.perf_counter()
        controller.tick()
        assert time.perf_counter() - t0 < 0.5
        seen_epochs.add(controller.finetune_status.get("epoch"))
        time.sleep(0.2)
    status = controller.finetune_status
    # never promoted, and the operator reads why: not better on the queued case (the shipped model
    # was trained on this patient), or else nothing guards the old domain without its training data
    assert status["state"] == "not promoted", status
    assert controller.status.startswith("Not promoted")
    assert "not better on the queued cases" in controller.status or "--replay" in controller.status
    assert max(seen_epochs) >= 1
    summary = controller.adaptation_summary()
    assert len(summary["versions"]) == 1 and "+S-ft1" in summary["versions"][0] and summary["active"] == base
    controller.use_version(summary["versions"][0])  # the operator's override
    assert catalog.active_model("liver-mr-t2", "S").ref == summary["versions"][0]
    assert catalog.active_model("liver-mr-t2").ref == base  # other studies keep theirs
    controller.roll_back()
    assert catalog.active_model("liver-mr-t2", "S").ref == base


def test_the_panel_reaches_a_curve_server_with_the_operator_s_key(tmp_path, home):
    """A server on a network answers only the keys it holds and lets only trainers change versions:
    the panel connects with the operator's certificate, and the server tells operator from trainer."""
    from server_helpers import operator_and_trainer_keys, start_server, stop
    from test_study_models import register_study_version

    options, files = operator_and_trainer_keys(tmp_path)
    server_key, ana, ana_key, lea = files["server"], files["ana"], files["ana_public"], files["lea"]
    version = register_study_version("TRIAL7")
    proc, address = start_server(*options, workers=0)
    try:
        def panel(**keys):
            return controller_with(tmp_path, backend="Remote", serverAddress=address, study="TRIAL7", **keys)

        operator = panel(serverKeyFile=server_key, clientCertFile=ana)
        operator.test_connection()
        assert wait_for_task(operator).startswith("Server ")
        operator.use_version(f"liver-mr-t2@{version}")
        assert "only trainers" in wait_for_task(operator)
        trainer = panel(serverKeyFile=server_key, clientCertFile=lea)
        trainer.use_version(f"liver-mr-t2@{version}")
        assert wait_for_task(trainer) == f"The study now uses liver-mr-t2@{version} on the server"

        without_keys = panel()
        without_keys.test_connection()
        assert "unreachable" in wait_for_task(without_keys)  # the server never answers an unknown client
        with pytest.raises(pc.PanelError, match="both"):
            panel(serverKeyFile=server_key).test_connection()
        with pytest.raises(pc.PanelError, match="no secret key"):
            panel(serverKeyFile=server_key, clientCertFile=ana_key).test_connection()  # the public half
        with pytest.raises(pc.PanelError, match="cannot read"):
            panel(serverKeyFile=tmp_path / "missing.key", clientCertFile=ana).test_connection()
    finally:
        stop(proc)
