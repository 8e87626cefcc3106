"""The fine-tuning queue: atomic export, duplicates, listing, removal."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegmentationLogic.errors import QueueError
from LiverSegmentationLogic.studies import case_queue
from LiverSegmentationLogic.studies.case_queue import CaseQueue, check_label_table


@pytest.fixture()
def case(sample_case):
    image, reference = sample_case
    return image, (reference == 1).astype(np.uint8)


def test_add_writes_nnunet_layout(tmp_path, case):
    image, label = case
    q = CaseQueue(tmp_path / "q")
    record = q.add(image, label, {"study": "TRIAL 7/site-3", "operator": "ana", "suggestion_dice": 0.97})
    assert record["case_id"] == "TRIAL-7-site-3_001"
    paths = q.paths(record["case_id"])
    assert paths["image"].name == "TRIAL-7-site-3_001_0000.nii.gz"
    back = sitk.ReadImage(str(paths["label"]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), label)
    np.testing.assert_allclose(back.GetOrigin(), image.geometry.origin, atol=1e-4)
    dataset = json.loads((tmp_path / "q" / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "liver": 1} and dataset["numTraining"] == 1
    assert [m["case_id"] for m in q.list()] == [record["case_id"]]


def test_crash_mid_export_leaves_no_half_case(tmp_path, case, monkeypatch):
    image, label = case
    q = CaseQueue(tmp_path / "q")
    real_replace = os.replace

    def crash_on_meta(src, dst):
        if str(dst).endswith(".json") and "meta" in str(dst):
            raise OSError("simulated power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(case_queue.os, "replace", crash_on_meta)
    with pytest.raises(QueueError, match="power cut") as err:  # a typed error that names the folder
        q.add(image, label)
    assert str(tmp_path / "q") in str(err.value)
    monkeypatch.setattr(case_queue.os, "replace", real_replace)
    assert q.list() == []
    reopened = CaseQueue(tmp_path / "q")  # the next start cleans up the leftovers
    assert reopened.list() == []
    leftovers = [p for p in (tmp_path / "q").rglob("*") if p.is_file() and p.name not in ("dataset.json", ".lock")]
    assert leftovers == []


def test_duplicates_are_replaced_or_versioned(tmp_path, case):
    image, label = case
    q = CaseQueue(tmp_path / "q")
    first = q.add(image, label, {"study": "s"})
    edited = label.copy()
    edited[0] = 0
    replaced = q.add(image, edited, {"study": "s"})
    assert replaced["case_id"] == first["case_id"] and replaced["replaced"]
    assert len(q.list()) == 1
    stored = sitk.ReadImage(str(q.paths(first["case_id"])["label"]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored), edited)
    versioned = q.add(image, label, {"study": "s"}, on_duplicate="version")
    assert versioned["case_id"] == f"{first['case_id']}_v2" and versioned["version"] == 2
    assert len(q.list()) == 2
    q.remove(versioned["case_id"])
    assert [m["case_id"] for m in q.list()] == [first["case_id"]]
    with pytest.raises(KeyError):
        q.remove("nope")
    with pytest.raises(ValueError, match="shape"):
        q.add(image, label[:-1])


def test_queue_cli(tmp_path, case):
    from LiverSegmentationLogic.io.sample import sample_paths

    image_path, label_path = sample_paths()  # the sample's label holds 4 organs
    run = lambda *a: subprocess.run([sys.executable, "-m", "LiverSegmentationLogic.cli", "queue", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True)
    queue = tmp_path / "abdomen"
    r = run("add", image_path, label_path, "--study", "S1", "--queue", tmp_path / "liver")  # task liver-mr-t2
    assert r.returncode == 2 and "[2, 3, 4] are not classes" in r.stderr
    r = run("add", image_path, label_path, "--study", "S1", "--queue", queue, "--task", "abdomen-mr-t2")
    assert r.returncode == 0, r.stderr
    r = run("add", image_path, label_path, "--queue", queue, "--task", "liver-ct")
    assert r.returncode == 2 and "holds cases labelled" in r.stderr
    r = run("list", "--queue", queue)
    assert "S1_001" in r.stdout
    r = run("remove", "S1_001", "--queue", queue)
    assert r.returncode == 0 and CaseQueue(queue).list() == []
    r = run("remove", "S1_001", "--queue", queue)
    assert r.returncode == 2 and "no case" in r.stderr


def test_labels_must_be_integer_classes_of_the_queue(tmp_path, case):
    image, label = case
    q = CaseQueue(tmp_path / "q")  # liver only
    for bad, message in [
        (label.astype(np.float32) * 0.5, "integers"),
        (np.where(label > 0, 255, 0).astype(np.uint8), r"\[255\] are not classes"),
        (label.astype(np.int16) - 1, r"-1\.\.0 are not classes"),
    ]:
        with pytest.raises(QueueError, match=message):
            q.add(image, bad)
    assert q.list() == []
    assert q.add(image, label.astype(bool))["case_id"] == "case_001"  # a mask is a labelmap too


@pytest.mark.parametrize("table, message", [
    ({"background": 7, "liver": 1}, "background"),
    ({"liver": "../../x"}, "integer"),
    ({"liver": 1, "spleen": 1}, "distinct"),
    ({"../evil": 1}, "letters"),
    ({"liver": 1.0}, "integer"),
    ({"liver": True}, "integer"),
    ({"liver": 300}, "1 to 255"),
    ([1, 2], "object"),
])
def test_malformed_label_tables_are_refused(tmp_path, table, message):
    with pytest.raises(QueueError, match=message):
        check_label_table(table)
    with pytest.raises(QueueError):
        CaseQueue(tmp_path / "q", labels=table)
    assert not (tmp_path / "q" / "dataset.json").exists()


def test_a_queue_keeps_one_task(tmp_path, case):
    image, label = case
    CaseQueue(tmp_path / "q", labels={"liver": 1}, modality="MR")
    with pytest.raises(QueueError, match="holds cases labelled"):
        CaseQueue(tmp_path / "q", labels={"liver": 1, "lesion": 2})
    with pytest.raises(QueueError, match="holds MR cases, this case is CT"):
        CaseQueue(tmp_path / "q", modality="CT")
    assert CaseQueue(tmp_path / "q", labels={"background": 0, "liver": 1}, modality="MR").labels == {
        "background": 0, "liver": 1}


def test_unwritable_queue_is_a_queue_error_naming_the_folder(tmp_path, case):
    image, label = case
    (tmp_path / "q").write_text("a file where the folder should be")
    with pytest.raises(QueueError, match=str(tmp_path / "q")):
        CaseQueue(tmp_path / "q")


WRITER = """
import sys
import numpy as np
from LiverSegmentationLogic.io.volumes import Geometry, Volume
from LiverSegmentationLogic.studies.case_queue import CaseQueue
folder, seed = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(seed)
for i in range(8):
    image = Volume(rng.random((16, 128, 128)).astype(np.float32), Geometry.identity())
    CaseQueue(folder).add(image, (image.array > 0.5).astype(np.uint8), {"study": "S"})
"""


def test_writers_in_several_processes_never_collide(tmp_path):
    """Three processes add eight cases each at once: 24 distinct committed cases, no temporary left."""
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "q"), str(seed)], stderr=subprocess.PIPE,
                              text=True) for seed in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    cases = CaseQueue(tmp_path / "q").list()
    assert len(cases) == 24 and len({c["case_id"] for c in cases}) == 24
    assert not list((tmp_path / "q").rglob("*.partial*"))
    assert json.loads((tmp_path / "q" / "dataset.json").read_text())["numTraining"] == 24
