"""Tasks added as configuration only: trained briefly on real data and run end to end through the
CLI and the inference server (cascade, multi-class, multi-channel)."""

import json
import os

import numpy as np
import pytest
import slicerio

from LiverSegmentationLogic.cli import main as liverseg_main
from LiverSegmentationLogic.io.volumes import Volume, read_volume, write_labelmap
from LiverSegmentationLogic.models.tasks import load_task

from test_remote import start_server, stop, wait_ready


def add_task(home, base, name, **changes):
    """Write a user task file: a bundled task's spec with a small network and a short schedule."""
    spec = dict(load_task(base).spec, name=name, **changes)
    spec["network"] = {"width": 4, "depth": 3, "dropout": 0.0}
    (home / "tasks" / f"{name}.json").write_text(json.dumps(spec))


def run_json(args, tmp_path, capsys):
    out = tmp_path / "readout.json"
    code = liverseg_main([*map(str, args), "--json", str(out), "-q"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    return json.loads(out.read_text()), printed


def test_ct_liver_lesion_cascade_from_config_files(home, tmp_path, lits_ct, capsys):
    """A first-stage liver task and a lesion cascade task, both only task files: trained briefly,
    listed, then run by the CLI and by the server with the right classes and lesion readouts."""
    add_task(home, "liver-ct", "my-liver-ct", training={"epochs": 2})
    add_task(home, "liver-lesion-ct", "my-lesion-ct",
             cascade=dict(load_task("liver-lesion-ct").cascade, roi_task="my-liver-ct"),
             training={"epochs": 2, "class_weights": "balanced", "background_fraction": 1.0})
    (tmp_path / "lits-ct").mkdir()
    for n in (0, 1):
        for kind in ("image", "label"):
            os.symlink(lits_ct / f"{kind}_{n}.nii.gz", tmp_path / "lits-ct" / f"{kind}_{n}.nii.gz")
    for task in ("my-liver-ct", "my-lesion-ct"):
        assert liverseg_main(["train", str(tmp_path / "lits-ct"), "--task", task, "--validation", "1"]) == 0
    liverseg_main(["tasks"])
    listing = capsys.readouterr().out
    assert "cascade after my-liver-ct" in listing and "model: my-lesion-ct@1.0.0-train1" in listing

    image = lits_ct / "image_1.nii.gz"
    seg = tmp_path / "out.seg.nrrd"
    readout, printed = run_json(["segment", image, "-o", seg, "--model", "my-lesion-ct"], tmp_path, capsys)
    assert set(readout["volumes_ml"]) == {"liver", "lesion"}
    assert readout["model"]["roi_model"]["name"] == "my-liver-ct"
    lesions = readout["lesions"]
    assert {"count", "total_volume_ml", "burden_percent"} <= set(lesions) and "lesion count" in printed
    assert lesions["total_volume_ml"] == pytest.approx(readout["volumes_ml"]["lesion"])
    assert [s["name"] for s in slicerio.read_segmentation(str(seg))["segments"]] == ["liver", "lesion"]

    proc, address = start_server("--model", "my-lesion-ct", workers=1)
    try:
        wait_ready(address, 1)
        remote, _ = run_json(["segment", image, "-o", tmp_path / "remote.nii.gz", "--server", address],
                             tmp_path, capsys)
    finally:
        assert stop(proc) == 0
    assert remote["volumes_ml"] == readout["volumes_ml"] and remote["lesions"] == lesions


def test_shipped_ct_cascade_finds_liver_and_lesions(lits_ct):
    """The bundled liver-lesion-ct model on lits-ct patient 6 (a training patient: what unseen
    patients get is the card's cross-validated record, checked here to be complete)."""
    from LiverSegmentationLogic.inference.segmenter import Segmenter
    from LiverSegmentationLogic.readouts.metrics import dice
    from LiverSegmentationLogic.models.model_files import load_model

    model = load_model("liver-lesion-ct")
    assert [c["name"] for c in model.classes] == ["liver", "lesion"]
    assert model.card["cascade"]["roi_version"] == f"liver-ct {load_model('liver-ct').card['version']}"
    validation = model.card["validation"]
    assert sorted(validation["per_case_dice"]) == sorted(model.card["training"]["train_cases"])
    assert validation["per_class"]["lesion"]["patients_over_1ml"] >= 1
    labels = Segmenter(model, device="cpu").segment(read_volume(lits_ct / "image_6.nii.gz")).labels
    ref = np.rint(read_volume(lits_ct / "label_6.nii.gz", validate=False).array)
    assert dice(labels > 0, ref > 0) > 0.9  # the liver with its lesions
    found = labels == 2
    assert found.any() and (ref[found] > 0).mean() > 0.95  # lesions are found inside the liver
    assert dice(found, ref == 2) > 0.5


def test_abdominal_model_reads_out_each_organ(tmp_path, sample_case, capsys):
    readout, printed = run_json(
        ["segment", os.fspath(_write(sample_case[0], tmp_path / "mr.nii.gz")), "-o", tmp_path / "o.nii.gz",
         "--model", "abdomen-mr-t2"], tmp_path, capsys)
    organs = readout["volumes_ml"]
    assert list(organs) == ["liver", "right kidney", "left kidney", "spleen"]
    labels = read_volume(tmp_path / "o.nii.gz", validate=False).array
    voxel_ml = np.prod(sample_case[0].geometry.spacing) / 1000
    for label, name in enumerate(organs, start=1):
        assert organs[name] == pytest.approx((labels == label).sum() * voxel_ml, abs=0.01)
        assert 50 < organs[name] < 3500, name  # each organ found, at a plausible size
        assert f"{name} volume" in printed


def test_multichannel_task_trains_and_segments(home, tmp_path, chaos_mr, capsys):
    """A two-image (in-phase + opposed-phase) task in nnU-Net layout: trained, then segmented
    from two files; one file alone is refused with a message naming the channels."""
    add_task(home, "liver-dixon-mr", "my-dixon", training={"epochs": 2})
    data = tmp_path / "dixon"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    for n in (1, 21):
        image = read_volume(chaos_mr / f"image_{n}.nii.gz")
        label = np.rint(read_volume(chaos_mr / f"label_{n}.nii.gz", validate=False).array).astype(np.uint8)
        opposed = image.array * np.where(label == 1, 0.8, 1.0)  # 10 % fat in the liver
        _write(image, data / "imagesTr" / f"p{n}_0000.nii.gz")
        _write(Volume(opposed.astype(np.float32), image.geometry), data / "imagesTr" / f"p{n}_0001.nii.gz")
        write_labelmap(data / "labelsTr" / f"p{n}.nii.gz", label, image.geometry)
    assert liverseg_main(["train", str(data), "--task", "my-dixon", "--validation", "p21"]) == 0
    capsys.readouterr()
    channels = [data / "imagesTr" / "p21_0000.nii.gz", data / "imagesTr" / "p21_0001.nii.gz"]
    readout, _ = run_json(["segment", *channels, "-o", tmp_path / "o.nii.gz", "--model", "my-dixon"],
                          tmp_path, capsys)
    assert list(readout["volumes_ml"]) == ["liver"]
    assert read_volume(tmp_path / "o.nii.gz", validate=False).array.shape == read_volume(channels[0]).array.shape
    assert liverseg_main(["segment", str(channels[0]), "-o", str(tmp_path / "x.nii.gz"), "--model", "my-dixon"]) == 2
    assert "takes 2 input image(s) (in-phase, opposed-phase)" in capsys.readouterr().err

    # the same through the inference server: both channels travel, the result is the local one
    proc, address = start_server("--model", "my-dixon", workers=1)
    try:
        wait_ready(address, 1)
        remote, _ = run_json(["segment", *channels, "-o", tmp_path / "r.nii.gz", "--server", address],
                             tmp_path, capsys)
        one = liverseg_main(["segment", str(channels[0]), "-o", str(tmp_path / "y.nii.gz"), "--server", address])
        refused = capsys.readouterr().err
    finally:
        assert stop(proc) == 0
    assert remote["volumes_ml"] == readout["volumes_ml"]
    assert remote["audit"]["input"]["sha256"] == readout["audit"]["input"]["sha256"]
    np.testing.assert_array_equal(read_volume(tmp_path / "r.nii.gz", validate=False).array,
                                  read_volume(tmp_path / "o.nii.gz", validate=False).array)
    assert one != 0 and "takes 2 input image(s) (in-phase, opposed-phase)" in refused


def _write(volume, path):
    import SimpleITK as sitk

    sitk.WriteImage(volume.to_sitk(), str(path))
    return path


def test_ct_padding_outside_the_scan_circle_reads_as_air(chaos_ct, tmp_path):
    """Raw-HU CT as some scanners write it: -3024 outside the reconstructed circle. The shipped CT
    model gives the same liver on the CHAOS CT case with and without that padding."""
    from LiverSegmentationLogic.io.datasets import convert_chaos_ct
    from LiverSegmentationLogic.inference.segmenter import Segmenter
    from LiverSegmentationLogic.models.model_files import load_model
    from LiverSegmentationLogic.readouts.metrics import dice

    case = convert_chaos_ct(chaos_ct, tmp_path)
    image, reference = read_volume(case.images[0]), read_volume(case.label, validate=False).array == 1
    _, y, x = image.array.shape
    yy, xx = np.mgrid[:y, :x]
    outside = (yy - (y - 1) / 2) ** 2 + (xx - (x - 1) / 2) ** 2 > (y / 2) ** 2
    padded = image.array.copy()
    padded[:, outside] = -3024
    segmenter = Segmenter(load_model("liver-ct"), device="cpu")
    plain = segmenter.segment(image).labels == 1
    with_padding = segmenter.segment(Volume(padded, image.geometry)).labels == 1
    assert dice(plain, reference) > 0.95
    assert dice(with_padding, plain) > 0.99  # 0.58 against the reference before padding counted as air
