"""The shipped default model through the full pipeline, on real volumes."""

import threading

import numpy as np
import pytest

from LiverSegmentationLogic.errors import CancelledError, InvalidImageError
from LiverSegmentationLogic.io.volumes import Geometry, Volume, read_volume
from LiverSegmentationLogic.inference.segmenter import resolve_device
from LiverSegmentationLogic.readouts.metrics import dice
from LiverSegmentationLogic.inference.pipeline import segment_case


def test_default_model_card_is_complete(default_model):
    card = default_model.card
    for key in ("task", "modality", "classes", "preprocessing", "training", "validation", "version", "sha256"):
        assert key in card
    assert card["training"]["split"] == "patient-wise"
    validation = card["validation"]
    # cross-validated: every training patient was segmented once by a fold model that never saw it
    assert "cross-validation" in validation["method"] and "never saw it" in validation["method"]
    assert sorted(validation["validation_cases"]) == sorted(card["training"]["train_cases"])
    liver = [scores["liver"] for scores in validation["per_case_dice"].values()]
    assert validation["mean_dice"]["liver"] == pytest.approx(np.mean(liver))
    assert np.median(liver) >= 0.9
    assert set(validation["regression_cases"]) <= set(validation["validation_cases"])
    weights = default_model.folder / card["weights"]
    assert weights.stat().st_size <= 10 * 1024 * 1024


def test_the_shipped_weights_know_their_training_patients(default_model, chaos_mr):
    """The shipped weights, through the full pipeline, on the card's regression cases (patients
    they were trained on): at least 0.93 each, and at least what the fold model that never saw
    the patient scored (the card's cross-validated Dice). Weights that do not match their card,
    or a pipeline that changed under them, fail here; the cross-validated figures themselves are
    reproduced by test_cross_validation.py's run of the same steps."""
    from LiverSegmentationLogic.io.datasets import find_cases, select_cases
    from LiverSegmentationLogic.models.tasks import load_task
    from LiverSegmentationLogic.training.trainer import evaluate_cases

    validation = default_model.card["validation"]
    cases = select_cases(find_cases(chaos_mr), validation["regression_cases"])
    assert len(cases) == len(validation["regression_cases"]) >= 3
    measured = evaluate_cases(default_model, cases, load_task("liver-mr-t2").reference_values())
    for case in cases:
        dice_now = measured["per_case_dice"][case.case_id]["liver"]
        assert dice_now >= max(0.93, validation["per_case_dice"][case.case_id]["liver"]), case.case_id


def test_sample_segmentation_on_input_grid(sample_case, sample_result):
    image, reference = sample_case
    assert sample_result.labels.shape == image.array.shape
    assert sample_result.labels.dtype == np.uint8
    assert sample_result.geometry == image.geometry
    assert set(np.unique(sample_result.labels)) == {0, 1}
    assert dice(sample_result.labels == 1, reference == 1) >= 0.9


def test_postprocessing_leaves_one_liver_component(sample_result):
    from scipy import ndimage

    _, n = ndimage.label(sample_result.labels == 1, structure=np.ones((3, 3, 3)))
    assert n == 1


def test_storage_orientation_does_not_change_the_result(segmenter, sample_case, sample_result):
    """The same scan stored with its axes permuted and flipped (geometry adjusted so the physical
    content is identical) must give the same segmentation, in its own storage order."""
    image, _ = sample_case
    # stored[k, j, i] = original[k, i, ::-1 j]: index axes swapped, one flipped
    arr = np.ascontiguousarray(np.flip(np.transpose(image.array, (0, 2, 1)), axis=2))
    d = image.geometry.direction_matrix
    ni = image.array.shape[1]
    new_dir = np.stack([-d[:, 1], d[:, 0], d[:, 2]], axis=1)  # new i = old -j, new j = old i
    sp = image.geometry.spacing
    origin = np.array(image.geometry.origin) + d[:, 1] * sp[1] * (ni - 1)
    moved = Volume(arr, Geometry((sp[1], sp[0], sp[2]), tuple(origin), tuple(new_dir.ravel())))
    labels = segmenter.segment(moved).labels
    expected = np.flip(np.transpose(sample_result.labels, (0, 2, 1)), axis=2)
    assert dice(labels == 1, expected == 1) > 0.995


def test_progress_is_reported_in_order_and_cancel_stops(segmenter, sample_case):
    image, _ = sample_case
    calls = []
    segmenter.segment(image, progress=lambda done, total, stage: calls.append((done, total, stage)))
    dones = [c[0] for c in calls]
    assert dones == sorted(dones) and dones[-1] == calls[-1][1] == image.array.shape[0]
    assert {c[2] for c in calls} == {"inference"}

    cancel = threading.Event()

    def cancel_after_first(done, total, stage):
        cancel.set()

    with pytest.raises(CancelledError, match="cancelled after"):
        segmenter.segment(image, progress=cancel_after_first, cancel=cancel)


def test_readouts_through_the_pipeline(segmenter, sample_case):
    image, reference = sample_case
    ff_map = Volume(np.where(reference == 1, 12.0, 80.0).astype(np.float32), image.geometry)
    result, readout = segment_case(segmenter, image, ff_map, margin_mm=3.0)
    expected_ml = np.count_nonzero(result.labels == 1) * np.prod(image.geometry.spacing) / 1000
    assert readout["volumes_ml"]["liver"] == pytest.approx(expected_ml)
    assert readout["fat_fraction"]["median"] == pytest.approx(12.0)
    assert readout["fat_fraction"]["steatosis"] is True
    assert set(readout["timings"]) == {"preprocess", "inference", "postprocess", "readout"}
    review = readout["review"]
    assert review["slices_to_check"] and len(review["positions_lps"]) == len(review["slices_to_check"])
    z = review["slices_to_check"][0]
    # the position is the centre of that axial slice (this sample's k axis runs inferior to superior)
    expected = image.to_sitk().TransformIndexToPhysicalPoint([128, 128, z])
    assert review["positions_lps"][0] == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("n", [2, 32])
def test_other_real_patients(segmenter, chaos_mr, n):
    image = read_volume(chaos_mr / f"image_{n}.nii.gz")
    labels = segmenter.segment(image).labels
    assert labels.shape == image.array.shape
    assert (labels == 1).sum() > 0


def test_bad_input_and_device(segmenter):
    bad = Volume(np.full((4, 8, 8), np.nan, np.float32), Geometry.identity())
    with pytest.raises(InvalidImageError):
        segmenter.segment(bad)
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="CUDA"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
        resolve_device("cuda")


def test_a_class_threshold_moves_its_border_and_bad_thresholds_are_refused(default_model, sample_case, sample_result):
    """A class's ``threshold`` (postprocessing) decides where it wins over background: 0.5 weighs
    nothing (the plain argmax), a lower one grows the liver, a higher one shrinks it."""
    import copy
    import dataclasses

    from LiverSegmentationLogic.errors import ModelLoadError
    from LiverSegmentationLogic.inference.segmenter import Segmenter
    from LiverSegmentationLogic.models.tasks import TaskError, validate_task

    def liver_with(threshold):
        card = copy.deepcopy(default_model.card)
        next(c for c in card["classes"] if c["name"] == "liver")["postprocessing"]["threshold"] = threshold
        segmenter = Segmenter(dataclasses.replace(default_model, card=card), device="cpu")
        return segmenter.segment(sample_case[0]).labels == 1

    plain = sample_result.labels == 1
    lower, higher = liver_with(0.2), liver_with(0.8)
    assert plain.sum() < lower.sum() and higher.sum() < plain.sum()
    assert (lower & plain).sum() >= 0.99 * plain.sum() and (higher & ~plain).sum() <= 0.01 * higher.sum()
    assert np.array_equal(liver_with(0.5), plain)

    for bad in (0, 1, 1.5, "0.3", True):
        with pytest.raises(ModelLoadError, match="threshold"):
            liver_with(bad)
        spec = {"name": "t", "preprocessing": {}, "label_map": {"1": 1},
                "classes": [{"name": "liver", "postprocessing": {"threshold": bad}}]}
        with pytest.raises(TaskError, match="threshold"):
            validate_task(spec)
