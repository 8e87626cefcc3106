import glob

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from LiverSegmentationLogic.readouts import metrics


def _png_stack(folder):
    files = sorted(glob.glob(str(folder / "*.png")))  # CHAOS orders slices by file name
    return np.stack([np.asarray(Image.open(f)) for f in files]) > 0


def _chaos_spacing(dicom_dir):
    """Slice step as the CHAOS evaluation computes it: first to last position over N - 1."""
    files = sorted(glob.glob(str(dicom_dir / "*.dcm")))

    def info(f):
        r = sitk.ImageFileReader()
        r.SetFileName(f)
        r.ReadImageInformation()
        return r

    first, last = info(files[0]), info(files[-1])
    t1 = np.array(first.GetMetaData("0020|0032").split("\\"), float)
    tn = np.array(last.GetMetaData("0020|0032").split("\\"), float)
    pixel = np.array(first.GetMetaData("0028|0030").split("\\"), float)
    return (np.linalg.norm(tn - t1) / (len(files) - 1), pixel[0], pixel[1])


def test_chaos_official_scores_reproduced(chaos_ct):
    ref = _png_stack(chaos_ct / "Ground")
    seg = _png_stack(chaos_ct / "Segmentation")
    m = metrics.segmentation_metrics(seg, ref, _chaos_spacing(chaos_ct / "DICOM_anon"))
    # the organisers' published scores for this sample prediction
    assert round(m["dice"], 3) == 0.978
    assert round(m["ravd_percent"], 3) == 0.665
    assert round(m["assd_mm"], 3) == 0.734
    assert round(m["mssd_mm"]) == 14


def test_overlap_metrics_on_known_boxes():
    ref = np.zeros((10, 10, 10), bool)
    pred = np.zeros_like(ref)
    ref[2:6, 2:6, 2:6] = True  # 64 voxels
    pred[2:6, 2:6, 4:8] = True  # 64 voxels, 32 shared
    assert metrics.dice(pred, ref) == pytest.approx(0.5)
    assert metrics.iou(pred, ref) == pytest.approx(32 / 96)
    assert metrics.precision(pred, ref) == pytest.approx(0.5)
    assert metrics.recall(pred, ref) == pytest.approx(0.5)
    assert metrics.relative_absolute_volume_difference(pred, ref) == 0.0
    bigger = ref.copy()
    bigger[6, 2:6, 2:6] = True  # +16 voxels = +25 %
    assert metrics.volume_error_percent(bigger, ref) == pytest.approx(25.0)
    assert metrics.volume_error_percent(ref, bigger) == pytest.approx(-20.0)
    assert metrics.relative_absolute_volume_difference(ref, bigger) == pytest.approx(20.0)


def test_surface_distances_use_spacing():
    ref = np.zeros((12, 12, 12), bool)
    ref[3:8, 3:8, 3:8] = True
    shifted = np.roll(ref, 1, axis=0)  # one slice up
    assd_iso, mssd_iso = metrics.assd_mssd(shifted, ref, (1.0, 1.0, 1.0))
    assd_thick, mssd_thick = metrics.assd_mssd(shifted, ref, (5.0, 1.0, 1.0))
    assert mssd_iso == pytest.approx(1.0)
    assert mssd_thick == pytest.approx(5.0)
    assert 0 < assd_iso < 1.0
    assert assd_iso < assd_thick < 5 * assd_iso  # side borders stay 0 mm apart, caps move 5 mm
    assert metrics.assd_mssd(ref, ref, (1, 1, 1)) == (0.0, 0.0)


def test_empty_masks():
    empty = np.zeros((4, 4, 4), bool)
    assert metrics.dice(empty, empty) == 1.0
    full = np.ones_like(empty)
    assert metrics.dice(empty, full) == 0.0
    assert np.isnan(metrics.assd_mssd(empty, full, (1, 1, 1))[0])
    with pytest.raises(ValueError):
        metrics.dice(empty, np.zeros((3, 3, 3), bool))


def test_bland_altman_known_values():
    measured = [1010.0, 1490.0, 2030.0, 1985.0]
    reference = [1000.0, 1500.0, 2000.0, 2000.0]
    ba = metrics.bland_altman(measured, reference)
    diffs = np.array([10.0, -10.0, 30.0, -15.0])
    assert ba["bias"] == pytest.approx(diffs.mean())
    assert ba["sd"] == pytest.approx(diffs.std(ddof=1))
    assert ba["loa_upper"] - ba["loa_lower"] == pytest.approx(2 * 1.96 * diffs.std(ddof=1))
    with pytest.raises(ValueError):
        metrics.bland_altman([1.0], [1.0])


def test_volume_agreement_counts_cases_without_a_real_voxel_size():
    """A volume error in percent needs no real spacing: the LiTS cases (placeholder 1 mm voxels)
    count in the cross-validated Bland-Altman beside the CHAOS CT case."""
    from LiverSegmentationLogic.inference.scoring import summarise

    rows = [{"case": case, "dice": {"liver": 0.95}, "volume_ml": {"liver": ml}, "reference_ml": {"liver": 100.0},
             "quality": {"status": "ok"}} for case, ml in (("lits-ct/0", 110.0), ("chaos-ct/1", 95.0))]
    liver = summarise(rows)["per_class"]["liver"]
    assert liver["volume_error_percent"] == [10.0, -5.0]
    assert liver["bland_altman_percent"]["bias"] == pytest.approx(2.5)


def test_lesion_dice_is_also_summarised_over_patients_with_more_than_1_ml():
    """The lesion target counts patients with lesions over 1 mL: a healthy liver (no lesion, Dice
    1.0 when nothing is found) or a 0.5 mL lesion would swamp the mean either way."""
    from LiverSegmentationLogic.inference.scoring import summarise

    def row(case, lesion_dice, reference_ml):
        return {"case": case, "dice": {"liver": 0.95, "lesion": lesion_dice},
                "volume_ml": {"liver": 100.0, "lesion": 1.0}, "reference_ml": {"liver": 100.0, "lesion": reference_ml},
                "quality": {"status": "ok"}}

    rows = [row("a", 0.7, 12.0), row("b", 0.5, 3.0), row("small", 0.0, 0.5), row("healthy", 1.0, 0.0)]
    summary = summarise(rows)["per_class"]
    lesion = summary["lesion"]
    assert lesion["mean_dice"] == pytest.approx(0.55)
    assert lesion["patients_over_1ml"] == 2
    assert lesion["mean_dice_over_1ml"] == pytest.approx(0.6) and lesion["min_dice_over_1ml"] == pytest.approx(0.5)
    assert "patients_over_1ml" not in summary["liver"]  # every patient counts there already
