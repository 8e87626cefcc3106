"""A segmentation scored against its reference, as the benchmarks and the cross-validation report
it: Dice and volumes per class, and the quality control's verdict on the prediction; a set of
cross-validated scores summarised for a model card (per patient and per class, Bland-Altman)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..io.datasets import CaseFiles
from ..io.volumes import read_volume
from ..readouts.metrics import bland_altman, dice
from ..readouts.quality import quality_check
from .segmenter import Segmenter

#: the quality control's targets (issue 17): every structure below BAD_DICE flagged, at most
#: 10 % of the cases whose structures all reach GOOD_DICE flagged
BAD_DICE, GOOD_DICE = 0.85, 0.93
#: datasets whose files carry a placeholder voxel size (LiTS-derived slices: 1 mm): their volumes
#: mean nothing, so neither the quality control's volume checks nor volume errors use them
NO_REAL_SPACING = ("lits-ct/",)
#: the lesion target (issue 17) counts patients whose reference has more than this much of a class
LARGE_ML = 1.0


def has_real_spacing(case_id: str) -> bool:
    return not case_id.startswith(NO_REAL_SPACING)


def score_case(segmenter: Segmenter, case: CaseFiles, reference_values: dict[str, Sequence[int]],
               check_volumes: bool = True, quality: bool = True) -> dict:
    """Segment ``case`` and compare with its reference label.

    Args:
        reference_values: class name -> the reference's label values that make up that class
            (:meth:`Task.reference_values`).
        check_volumes: False for images without a real voxel size (their volumes mean nothing to
            the quality control).
        quality: False leaves the quality control out (about a second on a 512 x 512 CT: a
            time-budgeted fine-tune gate that needs the Dice only skips it).

    Returns:
        ``{"case", "dice": {class: Dice}, "volume_ml": {...}, "reference_ml": {...}, "quality":
        quality_check's record}`` (no ``"quality"`` when it was left out).
    """
    images = [read_volume(p) for p in case.images]
    reference = np.rint(read_volume(case.label, validate=False).array)
    result = segmenter.segment(images)
    row = {"case": case.case_id, "dice": {}, "volume_ml": {}, "reference_ml": {}}
    if quality:
        row["quality"] = quality_check(result.labels, result.geometry, result.classes, result.uncertain_by_label,
                                       check_volumes=check_volumes, contrast_agreement=result.contrast_agreement)
    voxel_ml = result.geometry.voxel_volume_ml
    for c in result.classes:
        predicted, truth = result.labels == c["label"], np.isin(reference, list(reference_values[c["name"]]))
        row["dice"][c["name"]] = dice(predicted, truth)
        row["volume_ml"][c["name"]] = float(np.count_nonzero(predicted) * voxel_ml)
        row["reference_ml"][c["name"]] = float(np.count_nonzero(truth) * voxel_ml)
    return row


def flag_rates(rows: Sequence[dict]) -> dict:
    """The quality control against its targets, over rows of :func:`score_case`: structures with
    Dice < BAD_DICE and how many of them were flagged; cases whose every structure reaches
    GOOD_DICE and how many of those were flagged (needlessly)."""
    def flagged(row):
        return row["quality"]["status"] != "ok"

    bad = [(r, name) for r in rows for name, d in r["dice"].items() if d < BAD_DICE]
    good = [r for r in rows if min(r["dice"].values()) >= GOOD_DICE]
    return {
        f"structures_below_{BAD_DICE}": len(bad),
        f"structures_below_{BAD_DICE}_flagged": sum(flagged(r) for r, _ in bad),
        f"cases_all_at_least_{GOOD_DICE}": len(good),
        f"cases_all_at_least_{GOOD_DICE}_flagged": sum(flagged(r) for r in good),
        "missed": [f"{r['case']} {name} (Dice {r['dice'][name]:.3f})" for r, name in bad if not flagged(r)],
    }


def summarise(rows: Sequence[dict]) -> dict:
    """Rows of :func:`score_case` (each patient scored by a model that never saw it), per class:
    Dice mean/min (and over the patients with more than :data:`LARGE_ML` of it in the reference,
    where some have less: lesions), volume error per patient (in row order) and Bland-Altman in
    percent of the reference volume; and the quality control against its targets. A percentage
    needs no real voxel size (the placeholder spacing of the LiTS files cancels), so every patient
    counts."""
    names = list(rows[0]["dice"])
    per_class = {}
    for n in names:
        scores = [r["dice"][n] for r in rows]
        record = {"mean_dice": float(np.mean(scores)), "min_dice": float(np.min(scores))}
        large = [r["dice"][n] for r in rows if r["reference_ml"][n] > LARGE_ML]
        if len(large) < len(scores):  # lesions: small or absent ones would swamp the mean
            record.update(patients_over_1ml=len(large), mean_dice_over_1ml=float(np.mean(large)) if large else None,
                          min_dice_over_1ml=float(np.min(large)) if large else None)
        errors = [100.0 * (r["volume_ml"][n] - r["reference_ml"][n]) / r["reference_ml"][n] for r in rows
                  if r["reference_ml"][n] > 0]
        if errors:
            record["volume_error_percent"] = [round(e, 2) for e in errors]
        if len(errors) >= 2:
            agreement = bland_altman(errors, [0.0] * len(errors))
            record["bland_altman_percent"] = {k: round(v, 2) if isinstance(v, float) else v
                                              for k, v in agreement.items()}
        per_class[n] = record
    return {"per_class": per_class, "quality": flag_rates(rows)}


def validation_record(rows: Sequence[dict], summary: dict, names: Sequence[str], method: str) -> dict:
    """A model card's ``validation`` entry from cross-validated rows and their :func:`summarise`,
    for the classes ``names`` (a view of a task shows some of its classes)."""
    return {
        "metric": "Dice on the input grid after the full pipeline (postprocessing included)",
        "method": method,
        "validation_cases": [r["case"] for r in rows],
        "per_case_dice": {r["case"]: {n: r["dice"][n] for n in names} for r in rows},
        "mean_dice": {n: summary["per_class"][n]["mean_dice"] for n in names},
        "per_class": {n: summary["per_class"][n] for n in names},
        "quality": summary["quality"],
    }
