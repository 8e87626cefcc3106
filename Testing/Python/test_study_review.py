"""The study review's logic (what the browser review app shows and writes) on slicer-core: a real
MRML scene, a real batch result, the panel controller's readout and export."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegmentationLogic.io.volumes import crop_volume, read_volume
from LiverSegmentationLogic.readouts.metrics import dice
from LiverSegmentationLogic.studies.batch import local_segment, run_batch

slicer = pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "LiverSegmentation"))
from LiverSegmentationLib import mrml_bridge as bridge  # noqa: E402
from LiverSegmentationLib import panel_controller as pc  # noqa: E402
from LiverSegmentationLib import study_review as sr  # noqa: E402


@pytest.fixture(scope="module")
def reviewed_study(tmp_path_factory, sample_case, segmenter):
    """A study of two scans (twelve slices of the sample, and a file no reader takes) after
    ``liverseg batch``."""
    image, reference = sample_case
    z = int(np.argmax(np.count_nonzero(reference == 1, axis=(1, 2))))
    root = tmp_path_factory.mktemp("review")
    study, out = root / "study", root / "out"
    study.mkdir()
    small = crop_volume(image, (slice(z - 6, z + 6), slice(None), slice(None)))
    sitk.WriteImage(small.to_sitk(), str(study / "p21.nii.gz"))
    (study / "broken.nii.gz").write_bytes(b"not an image")
    rows = run_batch(study, out, local_segment(segmenter))
    assert [r["status"].split(":")[0] for r in sorted(rows, key=lambda r: r["case"])] == ["failed", "done"]
    return study, out


@pytest.fixture()
def review(clean_scene, reviewed_study, tmp_path):
    study, out = reviewed_study
    settings = pc.PanelSettings(pc.DictSettings())
    settings["queueFolder"] = str(tmp_path / "queues")
    return sr.StudyReview(study, out, pc.PanelController(settings, readout_delay_s=0.0), clean_scene)


@pytest.fixture()
def clean_scene(scene):
    scene.Clear(0)
    yield scene
    scene.Clear(0)


def _wait(review, done, timeout=60):
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        review.tick()
        time.sleep(0.02)
    review.tick()
    assert done(), "timed out"


def _erase(segmentation, reference_node, mask):
    """What a stroke of the Erase effect does to the liver segment."""
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("liver")
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), segmentation, segment_id,
                                                     reference_node)


def test_the_case_list_says_how_far_each_case_is(review):
    cases = {c.case: c for c in review.cases}
    assert set(cases) == {"p21", "broken"}
    assert cases["p21"].status == sr.SEGMENTED and cases["p21"].quality in ("ok", "needs review")
    assert cases["broken"].status == sr.NEW and cases["broken"].quality == ""
    assert review.neighbour(+1) == review.cases[0].case  # nothing open: the first


def test_an_unreadable_case_is_a_message_and_the_open_case_stays(review):
    review.open("p21")
    with pytest.raises(pc.PanelError, match="cannot read case broken"):
        review.open("broken")
    assert review.current.case == "p21" and review.input_node.GetScene() is not None
    with pytest.raises(pc.PanelError, match="no case"):
        review.open("p99")


def test_open_edit_accept_and_queue(review, reviewed_study):
    _, out = reviewed_study
    review.open("p21")
    suggestion = read_volume(out / "p21" / "segmentation.seg.nrrd", validate=False).array
    labels = slicer.util.arrayFromSegmentBinaryLabelmap(
        review.segmentation_node, review.segmentation_node.GetSegmentation().GetSegmentIdBySegmentName("liver"),
        review.input_node)
    assert np.array_equal(labels.astype(bool), suggestion == 1)  # the batch's suggestion, as it was written
    readout = json.loads((out / "p21" / "readout.json").read_text())
    assert [s["slice"] for s in review.slices_to_check] == readout["review"]["slices_to_check"]

    # the readout follows an edit (the controller's, as in the panel)
    _wait(review, lambda: review.controller.readout is not None)
    before = review.controller.readout["volumes_ml"]["liver"]
    edited = suggestion == 1
    edited[:, :, 128:] = False  # the operator erases the left half of the image
    _erase(review.segmentation_node, review.input_node, edited)
    review.edited()
    _wait(review, lambda: review.controller.readout["volumes_ml"]["liver"] != before)
    voxel_ml = review.controller.readout["volumes_ml"]["liver"] / edited.sum()
    assert review.controller.readout["volumes_ml"]["liver"] == pytest.approx(before * edited.sum()
                                                                             / (suggestion == 1).sum(), rel=1e-6)

    with pytest.raises(pc.PanelError, match="operator"):
        review.accept()
    assert not (out / "p21" / sr.REVIEW_FILE).exists()  # refused: nothing written
    other_tab = sr.StudyReview(review.study, out, pc.PanelController(review.controller.settings), review.scene)
    other_tab._opened_stamp = None  # it opened the case before this accept
    review.controller.settings["operatorName"] = "ana"
    path = review.accept(queue=True)
    record = json.loads(path.read_text())
    changed = (suggestion == 1) != edited
    assert record["operator"] == "ana" and record["changed_voxels"] == int(changed.sum())
    assert record["slices_touched"] == [int(z) for z in np.flatnonzero(changed.any(axis=(1, 2)))]
    assert record["suggestion_dice"]["liver"] == pytest.approx(dice(suggestion == 1, edited), abs=1e-6)
    assert record["readout"]["volumes_ml"]["liver"] == pytest.approx(edited.sum() * voxel_ml, rel=1e-6)
    assert record["queue"] == "sending"
    accepted = read_volume(out / "p21" / sr.REVIEWED_SEGMENTATION, validate=False).array
    assert np.array_equal(accepted == 1, edited)
    assert np.array_equal(read_volume(out / "p21" / "segmentation.seg.nrrd", validate=False).array, suggestion)

    _wait(review, lambda: isinstance(json.loads(path.read_text())["queue"], dict))
    queued = json.loads(path.read_text())["queue"]
    assert queued["where"] == str(Path(review.controller.settings["queueFolder"]) / "liver-mr-t2")
    assert (Path(queued["where"]) / "imagesTr" / f"{queued['case_id']}_0000.nii.gz").exists()
    assert {c.case: c.status for c in review.cases}["p21"] == sr.ACCEPTED

    # a second tab that opened the case before this accept may not overwrite it
    other_tab.segmentation_node, other_tab.input_node = review.segmentation_node, review.input_node
    other_tab.current = next(c for c in other_tab.cases if c.case == "p21")
    other_tab.controller.settings["operatorName"] = "ben"
    with pytest.raises(pc.PanelError, match="another tab"):
        other_tab.accept()
    assert json.loads(path.read_text())["operator"] == "ana"

    # reopened: the accepted labels, measured against the original suggestion
    review.open("p21")
    classes = pc.classes_of_segmentation(review.segmentation_node)
    assert np.array_equal(bridge.labels_from_segmentation(review.segmentation_node, review.input_node, classes) == 1,
                          edited)
    assert np.array_equal(bridge.suggestion_of(review.segmentation_node), suggestion)


def test_segmenting_in_the_review_gives_the_batch_suggestion(review, reviewed_study):
    """Open a case, segment it here (the panel's local job): the same labels as the batch's, and
    the nodes of the case opened before are gone from the scene."""
    _, out = reviewed_study
    review.open("p21")
    before = {review.input_node.GetID(), review.segmentation_node.GetID()}
    review.open("p21")
    ids = {review.scene.GetNthNode(i).GetID() for i in range(review.scene.GetNumberOfNodes())}
    assert not before & ids
    review.segment()
    _wait(review, lambda: not review.controller.running and review.segmentation_node is not None, timeout=180)
    assert review.controller.status.startswith("Done"), review.controller.status
    classes = pc.classes_of_segmentation(review.segmentation_node)
    labels = bridge.labels_from_segmentation(review.segmentation_node, review.input_node, classes)
    assert np.array_equal(labels, read_volume(out / "p21" / "segmentation.seg.nrrd", validate=False).array)
    batch = json.loads((out / "p21" / "readout.json").read_text())["review"]
    assert [s["slice"] for s in review.slices_to_check] == batch["slices_to_check"]
    assert np.allclose([s["position_lps"] for s in review.slices_to_check], batch["positions_lps"])


def test_a_slice_to_check_centres_the_views(review):
    review.open("p21")
    red = slicer.vtkMRMLSliceNode()
    red.SetLayoutName("Red")
    red.SetDefaultOrientation("Axial")
    red.SetOrientationToAxial()
    review.scene.AddNode(red)
    review.slices_to_check = [{"slice": 3, "position_lps": [10.0, -20.0, 42.5]}]
    review.jump_to(0)
    assert red.GetSliceOffset() == pytest.approx(42.5)


def test_a_server_that_is_down_is_a_status_not_a_dead_review(review):
    review.controller.settings["backend"] = "Remote"
    review.controller.settings["serverAddress"] = "tcp://127.0.0.1:1"  # nobody listens there
    review.open("p21")
    before = review.segmentation_node
    review.segment()
    _wait(review, lambda: not review.controller.running, timeout=120)
    assert review.controller.status.startswith("Segmentation failed"), review.controller.status
    assert review.segmentation_node is before  # the batch's suggestion is still there to review


def test_a_queue_that_cannot_be_written_keeps_the_accept_and_says_why(review, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the queue folder should be")
    review.controller.settings["queueFolder"] = str(blocker)
    review.controller.settings["operatorName"] = "ana"
    review.open("p21")
    path = review.accept(queue=True)
    _wait(review, lambda: json.loads(path.read_text())["queue"] != "sending")
    assert json.loads(path.read_text())["queue"].startswith("failed:")
    assert review.controller.status.startswith("Export failed"), review.controller.status
    assert (path.parent / sr.REVIEWED_SEGMENTATION).exists()  # the accept itself is kept
