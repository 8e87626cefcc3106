"""A segmentation scored against its reference, as the benchmarks and the cross-validation report
it: Dice and volumes per class, and the quality control's verdict on the prediction."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..io.datasets import CaseFiles
from ..io.volumes import read_volume
from ..readouts.metrics import dice
from ..readouts.quality import quality_check
from .segmenter import Segmenter

#: the quality control's targets (issue 17): every structure below BAD_DICE flagged, at most
#: 10 % of the cases whose structures all reach GOOD_DICE flagged
BAD_DICE, GOOD_DICE = 0.85, 0.93


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
                                       check_volumes=check_volumes)
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
