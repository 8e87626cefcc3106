"""The fine-tuning queue: atomic export, duplicates, listing, removal."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegmentationLogic.studies import case_queue
from LiverSegmentationLogic.studies.case_queue import CaseQueue


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
    with pytest.raises(OSError, match="power cut"):
        q.add(image, label)
    monkeypatch.setattr(case_queue.os, "replace", real_replace)
    assert q.list() == []
    reopened = CaseQueue(tmp_path / "q")  # the next start cleans up the leftovers
    assert reopened.list() == []
    leftovers = [p for p in (tmp_path / "q").rglob("*") if p.is_file() and p.name != "dataset.json"]
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

    image_path, label_path = sample_paths()
    run = lambda *a: subprocess.run([sys.executable, "-m", "LiverSegmentationLogic.cli", "queue", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True)
    r = run("add", image_path, label_path, "--study", "S1", "--queue", tmp_path / "q")
    assert r.returncode == 0, r.stderr
    r = run("list", "--queue", tmp_path / "q")
    assert "S1_001" in r.stdout
    r = run("remove", "S1_001", "--queue", tmp_path / "q")
    assert r.returncode == 0 and CaseQueue(tmp_path / "q").list() == []
    r = run("remove", "S1_001", "--queue", tmp_path / "q")
    assert r.returncode == 2 and "no case" in r.stderr
