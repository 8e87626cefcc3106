"""Batch studies, the audit trail and review guidance, on real scans."""

import csv
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegmentationLogic.readouts.audit import array_sha256, verify_audit
from LiverSegmentationLogic.studies.batch import find_cases
from LiverSegmentationLogic.inference.guidance import axial_slice_positions, error_share_in_top, slices_to_check
from LiverSegmentationLogic.io.volumes import Volume, read_volume
from LiverSegmentationLogic.io.sample import sample_paths


def liverseg(*args):
    return subprocess.run([sys.executable, "-m", "LiverSegmentationLogic.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture()
def study(tmp_path):
    """Two real scans (one with a PDFF map and a label file beside it), a DICOM-free corrupt file."""
    image_path, label_path = sample_paths()
    root = tmp_path / "study"
    (root / "site-a").mkdir(parents=True)
    (root / "site-b" / "visit 2").mkdir(parents=True)
    shutil.copy(image_path, root / "site-a" / "p21.nii.gz")
    shutil.copy(label_path, root / "site-a" / "p21_label.nii.gz")  # not a scan
    image = read_volume(image_path)
    ref = np.rint(read_volume(label_path, validate=False).array) == 1
    sitk.WriteImage(Volume(np.where(ref, 9.0, 85.0).astype(np.float32), image.geometry).to_sitk(),
                    str(root / "site-a" / "p21_pdff.nrrd"))
    flipped = Volume(np.ascontiguousarray(image.array[:, ::-1]), image.geometry)  # another "scan"
    sitk.WriteImage(flipped.to_sitk(), str(root / "site-b" / "visit 2" / "scan.nrrd"))
    (root / "site-b" / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    return root


def test_find_cases_and_pairing(study):
    cases = {c["case"]: c for c in find_cases(study)}
    assert set(cases) == {"site-a__p21", "site-b__corrupt", "site-b__visit__2__scan"}
    assert cases["site-a__p21"]["ff"].name == "p21_pdff.nrrd"
    assert cases["site-b__visit__2__scan"]["ff"] is None


def test_batch_completes_reports_corrupt_case_and_resumes(study, tmp_path):
    out = tmp_path / "out"
    r = liverseg("batch", study, "-o", out)
    assert r.returncode == 1  # some case failed
    assert re.search(r"3 case\(s\): 2 done \(\d need review\), 1 failed", r.stdout), r.stdout
    table = list(csv.DictReader(open(out / "results.csv")))
    attention = [row["status"].startswith("failed") or row["quality"] == "needs review" for row in table]
    assert attention == sorted(attention, reverse=True)  # the cases needing attention come first
    rows = {row["case"]: row for row in table}
    assert rows["site-b__corrupt"]["status"].startswith("failed: Not a readable image")
    p21 = rows["site-a__p21"]
    assert p21["status"] == "done" and float(p21["liver_volume_ml"]) > 500
    assert float(p21["ff_median"]) == pytest.approx(9.0) and p21["steatosis"] == "yes"
    assert p21["model"] == "liver-mr-t2" and p21["slices_to_check"]
    assert p21["quality"] == "ok" and p21["quality_reasons"] == ""
    for case in ("site-a__p21", "site-b__visit__2__scan"):
        assert (out / case / "qa.png").stat().st_size > 1000
        assert (out / case / "segmentation.seg.nrrd").exists()
    # audit records match hashes recomputed from the files
    audit = json.loads((out / "site-a__p21" / "audit.json").read_text())
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "site-a__p21" / "segmentation.seg.nrrd")))
    assert verify_audit(audit, read_volume(study / "site-a" / "p21.nii.gz").array, seg)
    assert not verify_audit(audit, read_volume(study / "site-a" / "p21.nii.gz").array, np.zeros_like(seg))
    assert audit["model"]["sha256"] and audit["tool_version"]
    # a re-run skips the finished cases and still reports the corrupt one
    r = liverseg("batch", study, "-o", out)
    rows = {row["case"]: row for row in csv.DictReader(open(out / "results.csv"))}
    assert rows["site-a__p21"]["status"].startswith("done (skipped")
    assert rows["site-b__visit__2__scan"]["status"].startswith("done (skipped")
    assert rows["site-b__corrupt"]["status"].startswith("failed")


def test_segment_writes_an_audit_record(tmp_path):
    image_path, _ = sample_paths()
    r = liverseg("segment", image_path, "-o", tmp_path / "case.seg.nrrd")
    assert r.returncode == 0, r.stderr
    audit = json.loads((tmp_path / "case.audit.json").read_text())
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "case.seg.nrrd")))
    assert audit["input"]["sha256"] == array_sha256(read_volume(image_path).array)
    assert audit["segmentation_sha256"] == array_sha256(seg.astype(np.uint8))
    assert "slices to check" in r.stdout


def test_guidance_ranks_uncertain_slices(sample_case, sample_result):
    image, reference = sample_case
    flagged = slices_to_check(sample_result.slice_uncertainty, 0.1)
    assert len(flagged) == int(np.ceil(0.1 * image.array.shape[0]))
    assert all(sample_result.slice_uncertainty[a] >= sample_result.slice_uncertainty[b]
               for a, b in zip(flagged, flagged[1:], strict=False))
    # this sample is stored with slices already axial and inferior-to-superior, so axial order = k
    errors = ((sample_result.labels == 1) ^ (reference == 1)).sum(axis=(1, 2))
    share = error_share_in_top(sample_result.slice_uncertainty, errors, 0.1)
    assert share > 0.1  # better than flagging slices at random
    positions = axial_slice_positions(image.geometry, image.array.shape)
    assert np.all(np.diff(positions[:, 2]) > 0)  # inferior to superior
    with pytest.raises(ValueError):
        slices_to_check(sample_result.slice_uncertainty, 0)
