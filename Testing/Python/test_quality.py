"""Quality control: which segmentations are flagged for review, and why."""

import numpy as np
import pytest

from LiverSegmentationLogic.io.volumes import Geometry
from LiverSegmentationLogic.models.anatomy import class_entry
from LiverSegmentationLogic.readouts.quality import NEEDS_REVIEW, OK, quality_check

CLASSES = [class_entry(1, "liver"), class_entry(2, "right kidney"), class_entry(3, "left kidney"),
           class_entry(4, "spleen")]
GRID = Geometry.identity((2.0, 2.0, 2.0))  # 8 uL voxels; LPS x grows with the array's last index


def abdomen() -> np.ndarray:
    """A plausible abdomen: liver on the patient's right (low x), spleen and left kidney on the left."""
    labels = np.zeros((80, 160, 220), np.uint8)
    labels[20:70, 30:120, 10:100] = 1  # liver: 50 x 90 x 90 voxels = 3.24 L
    labels[0:18, 60:100, 40:60] = 2  # right kidney, below the liver: 115 mL
    labels[0:18, 60:100, 150:170] = 3  # left kidney: 115 mL
    labels[40:70, 60:100, 180:200] = 4  # spleen: 192 mL
    return labels


def test_a_plausible_abdomen_is_ok():
    result = quality_check(abdomen(), GRID, CLASSES)
    assert result["status"] == OK and result["reasons"] == []
    liver = result["structures"]["liver"]
    assert liver["volume_ml"] == pytest.approx(50 * 90 * 90 * 0.008) and liver["components"] == 1
    assert liver["largest_component_share"] == 1.0 and liver["uncertain_share"] is None


@pytest.mark.parametrize("change, reason", [
    (lambda a: a.__setitem__(a == 4, 0), "no spleen found"),
    (lambda a: a[:, :, 150:].__setitem__(a[:, :, 150:] == 3, 0), "no left kidney found"),
    (lambda a: a.__setitem__((a == 4), 1) or a[10:75, 0:160, 110:215].__setitem__(
        a[10:75, 0:160, 110:215] >= 0, 4), "spleen volume"),  # a runaway spleen over the left abdomen
    (lambda a: a[:, :, 40:60].__setitem__(a[:, :, 40:60] == 1, 0), "liver is in 2 pieces"),
    (lambda a: a.__setitem__(a == 4, 0) or a[40:70, 60:100, 20:40].__setitem__(a[40:70, 60:100, 20:40] >= 0, 4),
     "the spleen is not on the patient's left of the liver"),
    (lambda a: a.__setitem__(a == 1, 0) or a[30:40, 30:60, 10:40].__setitem__(a[30:40, 30:60, 10:40] >= 0, 1),
     "liver volume 72 mL is outside"),
])
def test_implausible_segmentations_need_review_with_the_reason(change, reason):
    labels = abdomen()
    change(labels)
    result = quality_check(labels, GRID, CLASSES)
    assert result["status"] == NEEDS_REVIEW
    assert any(reason in r for r in result["reasons"]), result["reasons"]


def test_a_spleen_that_outgrows_the_liver_is_flagged():
    labels = abdomen()
    labels[labels == 1] = 0
    labels[20:70, 30:80, 10:100] = 1  # a small liver: 1.8 L
    labels[5:78, 40:150, 150:215] = 4  # and a spleen of 4 L where it belongs
    reasons = quality_check(labels, GRID, CLASSES)["reasons"]
    assert any("more than 75 % of the liver" in r for r in reasons), reasons


def test_uncertainty_and_volume_checks_can_be_left_out():
    labels = abdomen()
    uncertain = np.zeros(256, np.int64)
    uncertain[4] = np.count_nonzero(labels == 4) // 2  # the model hesitated on half of the spleen
    result = quality_check(labels, GRID, CLASSES, uncertain_by_label=uncertain)
    assert result["reasons"] == ["the model was unsure of 50 % of the spleen"]
    assert result["structures"]["spleen"]["uncertain_share"] == pytest.approx(0.5, abs=1e-3)
    tiny = np.zeros_like(labels)
    tiny[30:40, 30:60, 10:40] = 1
    assert quality_check(tiny, GRID, CLASSES[:1], check_volumes=False)["status"] == OK  # no real voxel size


def test_every_readout_carries_the_quality_check(segmenter, sample_case):
    """Through the pipeline (CLI, batch, server and panel all use it): the sample is ok, and a crop
    holding a sliver of liver is flagged."""
    from LiverSegmentationLogic.inference.pipeline import format_readout, segment_case
    from LiverSegmentationLogic.io.volumes import crop_volume

    image, _ = sample_case
    _, readout = segment_case(segmenter, image)
    assert readout["quality"]["status"] == OK, readout["quality"]["reasons"]
    assert readout["quality"]["structures"]["liver"]["uncertain_share"] < 0.2
    _, readout = segment_case(segmenter, crop_volume(image, (slice(0, 6), slice(None), slice(None))))
    assert readout["quality"]["status"] == NEEDS_REVIEW
    text = format_readout(readout)
    assert "needs review" in text and "liver volume" in text


def test_the_panel_shows_the_flag():
    pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")
    from LiverSegmentationLib.panel_controller import readout_html

    flagged = {"volumes_ml": {"liver": 300.0}, "fat_fraction": None,
               "quality": {"status": NEEDS_REVIEW, "reasons": ["liver volume 300 mL is outside 600-4500 mL"]}}
    html = readout_html(flagged, None)
    assert "Needs review" in html and "outside 600-4500 mL" in html
    assert "Quality check: ok" in readout_html(dict(flagged, quality={"status": OK, "reasons": []}), None)


def test_flag_rates_count_missed_structures_and_needless_flags():
    from LiverSegmentationLogic.inference.scoring import flag_rates

    def row(case, dice, status):
        return {"case": case, "dice": dice, "quality": {"status": status}}

    rows = [row("a", {"liver": 0.96, "spleen": 0.00}, NEEDS_REVIEW),  # a missed spleen, flagged
            row("b", {"liver": 0.95, "spleen": 0.83}, OK),            # a poor spleen nobody flagged
            row("c", {"liver": 0.95, "spleen": 0.94}, NEEDS_REVIEW),  # a good case flagged needlessly
            row("d", {"liver": 0.97, "spleen": 0.93}, OK)]
    rates = flag_rates(rows)
    assert rates["structures_below_0.85"] == 2 and rates["structures_below_0.85_flagged"] == 1
    assert rates["cases_all_at_least_0.93"] == 2 and rates["cases_all_at_least_0.93_flagged"] == 1
    assert rates["missed"] == ["b spleen (Dice 0.830)"]


def test_lesions_are_checked_for_certainty_only():
    """Any number and size of lesions is plausible (none at all too); an outline the model was
    unsure of is not (on the cross-validated CT cascade such outlines were the poor ones)."""
    classes = [class_entry(1, "liver"), class_entry(2, "lesion")]
    labels = np.zeros((80, 160, 220), np.uint8)
    labels[20:70, 30:120, 10:100] = 1
    uncertain = np.zeros(256, np.int64)
    uncertain[1] = 1000  # a sure liver
    assert quality_check(labels, GRID, classes, uncertain)["status"] == OK  # no lesion found: fine
    labels[30:34, 50:60, 20:30] = 2  # 400 lesion voxels
    labels[60:61, 100:101, 80:81] = 2  # and a speck: two pieces, 3.2 uL
    uncertain[2] = 80
    assert quality_check(labels, GRID, classes, uncertain)["status"] == OK
    uncertain[2] = 200
    result = quality_check(labels, GRID, classes, uncertain)
    assert result["status"] == NEEDS_REVIEW and result["reasons"] == ["the model was unsure of 50 % of the lesion"]


def test_a_structure_that_moves_when_the_contrast_is_bent_needs_review():
    labels = abdomen()
    held = quality_check(labels, GRID, CLASSES, contrast_agreement={1: 0.99, 2: 0.97, 3: 0.98, 4: 0.96})
    assert held["status"] == OK and held["structures"]["spleen"]["contrast_agreement"] == 0.96
    moved = quality_check(labels, GRID, CLASSES, contrast_agreement={1: 0.99, 2: 0.97, 3: 0.98, 4: 0.899})
    assert moved["reasons"] == ["the spleen changed when the image's contrast was bent (Dice 0.899 with itself, "
                                "expected at least 0.95)"]
    assert quality_check(labels, GRID, CLASSES)["structures"]["spleen"]["contrast_agreement"] is None  # not run


def test_the_contrast_check_holds_on_a_clean_scan_and_flags_a_shaded_one(sample_case):
    """The sample as it is: every structure holds under the bent contrasts. The same scan under a
    strong shading (0.2x on the patient's right to 4x on the left, as a surface coil can give): the
    structures it spoils (Dice < 0.85) move, and the readout says so."""
    from LiverSegmentationLogic.inference.pipeline import segment_case
    from LiverSegmentationLogic.inference.segmenter import Segmenter
    from LiverSegmentationLogic.io.volumes import Volume
    from LiverSegmentationLogic.models.model_files import load_model
    from LiverSegmentationLogic.models.tasks import load_task
    from LiverSegmentationLogic.readouts.metrics import dice

    model = load_model("abdomen-mr-t2")
    assert Segmenter(model, device="cpu").contrast_check  # its task asks for it
    assert not Segmenter(model, device="cpu", contrast_check=False).contrast_check
    segmenter = Segmenter(model, device="cpu")
    image, truth = sample_case
    reference = load_task("abdomen-mr-t2").reference_values()
    result, readout = segment_case(segmenter, image)
    assert set(result.contrast_agreement) == {1, 2, 3, 4} and min(result.contrast_agreement.values()) >= 0.95
    assert readout["quality"]["status"] == OK and "contrast check" in readout["timings"]

    shading = np.linspace(0.2, 4.0, image.array.shape[2], dtype=np.float32)[None, None, :]
    result, readout = segment_case(segmenter, Volume(image.array * shading, image.geometry))
    spoiled = [c["name"] for c in result.classes
               if dice(result.labels == c["label"], np.isin(truth, reference[c["name"]])) < 0.85]
    assert spoiled, "the shading no longer spoils any structure: pick a harder perturbation"
    for name in spoiled:
        assert any(r.startswith(f"the {name} changed when the image's contrast was bent")
                   for r in readout["quality"]["reasons"]), readout["quality"]["reasons"]


def test_with_gamma_bends_the_mid_tones_and_keeps_the_range(sample_case):
    from LiverSegmentationLogic.inference.contrast_check import with_gamma

    image, _ = sample_case
    lo, mid, hi = np.percentile(image.array, [0.5, 50, 99.5])
    for gamma in (0.7, 1.4):
        bent = with_gamma(image, gamma)
        assert bent.geometry == image.geometry and bent.array.shape == image.array.shape
        b_lo, b_mid, b_hi = np.percentile(bent.array, [0.5, 50, 99.5])
        assert b_lo == pytest.approx(lo, abs=1e-3 * hi) and b_hi == pytest.approx(hi, rel=1e-3)
        assert (b_mid > mid) == (gamma < 1)  # gamma < 1 brightens the mid-tones
    assert np.allclose(with_gamma(image, 1.0).array, np.maximum(image.array, lo), rtol=1e-5, atol=1e-3)
