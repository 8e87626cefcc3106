"""The ``liverseg`` command as a user runs it: real files in, files and exit codes out."""

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from LiverSegmentationLogic.io.volumes import Geometry, Volume, read_volume
from LiverSegmentationLogic.models.model_files import load_model
from LiverSegmentationLogic.io.sample import sample_paths


def liverseg(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "LiverSegmentationLogic.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=600,
    )


def test_segment_writes_on_exact_input_grid(tmp_path, chaos_mr):
    src = chaos_mr / "image_8.nii.gz"
    out = tmp_path / "seg.nii.gz"
    png = tmp_path / "qa.png"
    r = liverseg("segment", src, "-o", out, "--png", png, "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert "liver volume" in r.stdout and "mL" in r.stdout
    image, seg = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    assert seg.GetSize() == image.GetSize()
    np.testing.assert_allclose(seg.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(seg.GetOrigin(), image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(seg.GetDirection(), image.GetDirection(), atol=1e-6)
    assert png.stat().st_size > 1000
    ml = float(r.stdout.split("liver volume")[1].split("mL")[0])
    voxels = (sitk.GetArrayFromImage(seg) == 1).sum()
    assert ml == pytest.approx(voxels * np.prod(image.GetSpacing()) / 1000, abs=0.05)


def test_segment_seg_nrrd_with_ff_map(tmp_path):
    image_path, label_path = sample_paths()
    image = read_volume(image_path)
    ref = np.rint(read_volume(label_path, validate=False).array) == 1
    ff_path = tmp_path / "pdff.nrrd"
    sitk.WriteImage(Volume(np.where(ref, 0.2, 0.9).astype(np.float32), image.geometry).to_sitk(), str(ff_path))
    out = tmp_path / "case.seg.nrrd"
    r = liverseg("segment", image_path, "-o", out, "--ff", ff_path, "--margin-mm", "4")
    assert r.returncode == 0, r.stderr
    assert "20.00 %" in r.stdout and "map in fraction" in r.stdout and "YES" in r.stdout
    seg = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in seg["segments"]] == ["liver"]


def test_evaluate_prints_metrics(tmp_path, chaos_mr):
    pred = tmp_path / "pred.nii.gz"
    label = read_volume(chaos_mr / "label_3.nii.gz", validate=False)
    shifted = np.roll(np.rint(label.array).astype(np.uint8), 2, axis=2)
    sitk.WriteImage(Volume(shifted, label.geometry).to_sitk(), str(pred))
    r = liverseg("evaluate", pred, chaos_mr / "label_3.nii.gz")
    assert r.returncode == 0, r.stderr
    values = dict(line.split() for line in r.stdout.strip().splitlines())
    assert 0.9 < float(values["dice"]) < 1.0
    assert float(values["mssd_mm"]) >= 2.5  # 2 voxels of 1.25 mm


def test_demo(tmp_path):
    r = liverseg("demo", "-o", tmp_path / "demo")
    assert r.returncode == 0, r.stderr
    dice = float(r.stdout.split("liver Dice vs reference")[1].split()[0])
    assert dice >= 0.9
    assert "liver volume" in r.stdout and "liver PDFF median" in r.stdout
    assert (tmp_path / "demo" / "chaos-mr-t2-patient21.seg.nrrd").exists()


def _bad_inputs(tmp_path):
    text = tmp_path / "notes.nii.gz"
    text.write_text("hello")
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(8, 8).astype(np.float32)), str(flat))
    four = tmp_path / "four.nii.gz"  # a time series: two 3D volumes joined along a 4th axis
    frames = [sitk.GetImageFromArray(np.random.rand(3, 8, 8).astype(np.float32)) for _ in range(2)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(four))
    nan = tmp_path / "nan.nrrd"
    arr = np.random.rand(4, 8, 8).astype(np.float32)
    arr[0, 0, 0] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(nan))
    zeros = tmp_path / "zeros.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16)), str(zeros))
    return {
        "missing": (tmp_path / "missing.nii.gz", "No such file"),
        "not an image": (text, "Not a readable image"),
        "2D": (flat, "2D"),
        "4D": (four, "4D"),
        "NaN": (nan, "NaN"),
        "empty": (zeros, "empty"),
    }


@pytest.mark.parametrize("case", ["missing", "not an image", "2D", "4D", "NaN", "empty"])
def test_bad_input_gives_clear_error_without_traceback(tmp_path, case):
    path, message = _bad_inputs(tmp_path)[case]
    r = liverseg("segment", path, "-o", tmp_path / "out.nrrd")
    assert r.returncode == 2
    assert r.stderr.startswith("liverseg: error:") and message in r.stderr
    assert "Traceback" not in r.stderr


def test_ff_map_that_does_not_overlap(tmp_path):
    image_path, _ = sample_paths()
    image = read_volume(image_path)
    far = Geometry(image.geometry.spacing, (5000.0, 5000.0, 5000.0), image.geometry.direction)
    ff_path = tmp_path / "far.nrrd"
    sitk.WriteImage(Volume(np.full((10, 10, 10), 5.0, np.float32), far).to_sitk(), str(ff_path))
    r = liverseg("segment", image_path, "-o", tmp_path / "o.nrrd", "--ff", ff_path)
    assert r.returncode == 2 and "does not overlap" in r.stderr and "Traceback" not in r.stderr


def test_missing_and_corrupt_model(tmp_path):
    image_path, _ = sample_paths()
    r = liverseg("segment", image_path, "-o", tmp_path / "o.nrrd", "--model", tmp_path / "none")
    assert r.returncode == 2 and "No model found" in r.stderr
    src = load_model().folder
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_card.json").write_text((src / "model_card.json").read_text())
    weights = bytearray((src / "model.pt").read_bytes())
    weights[100:200] = b"\0" * 100
    (bad / "model.pt").write_bytes(bytes(weights))
    r = liverseg("segment", image_path, "-o", tmp_path / "o.nrrd", "--model", bad)
    assert r.returncode == 2 and "corrupt" in r.stderr and "Traceback" not in r.stderr


def test_curve_key_files_are_checked_before_anything_runs(tmp_path):
    key = tmp_path / "server.key"
    key.write_text("")
    for args, error in ((["--server", "tcp://gpu:5555", "--curve-server-key", key], "needs both"),  # no certificate
                        (["--server", "tcp://gpu:5555", "--curve-server-key", key, "--curve-client-cert", key],
                         "cannot read"),  # not a certificate
                        (["--curve-server-key", key, "--curve-client-cert", key], "add --server")):
        r = liverseg("review", tmp_path, *args, "--port", 0)
        assert r.returncode == 2 and error in r.stderr and "Traceback" not in r.stderr, r.stderr
    image_path, _ = sample_paths()
    r = liverseg("segment", image_path, "-o", tmp_path / "o.nrrd", "--server", "tcp://127.0.0.1:9",
                 "--curve-server-key", tmp_path / "missing.key", "--curve-client-cert", tmp_path / "missing.key_secret")
    assert r.returncode == 2 and "cannot read the CurveZMQ key files" in r.stderr and "Traceback" not in r.stderr
