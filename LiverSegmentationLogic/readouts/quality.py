"""Quality control of a segmentation: is it plausible enough to accept, or does it need review?

Per structure, from the labels alone (and the model's uncertainty where the segmenter gives it):

- **volume** within the adult range of that organ (:data:`PLAUSIBLE_VOLUME_ML`) and, for the
  spleen and kidneys, not too large next to the liver (:data:`MAX_SHARE_OF_LIVER`);
- **found at all** (an expected organ with no voxel);
- **one piece**: the largest connected component holds at least :data:`MIN_LARGEST_SHARE` of it;
- **position**: the spleen lies well to the patient's left of the liver, the left kidney well to
  the left of the right kidney (LPS: x grows to the patient's left);
- **certainty**: at most :data:`MAX_UNCERTAIN_SHARE` of its voxels were uncertain to the network
  (winning probability below ``inference.results.UNCERTAIN_BELOW``). Lesions get this check only:
  any number and size of them is plausible, but on the cross-validated CT cascade an unsure
  outline went with a poor one (``scripts/cross_validate.py evaluate``);
- **contrast**, where the segmenter ran the contrast check (``inference.contrast_check``): the
  structure holds, Dice at least :data:`MIN_CONTRAST_AGREEMENT` with itself, when the image's
  contrast is bent. It catches confident errors the checks above let through.

Each failed check adds a reason; a case with any reason "needs review". The thresholds were set
on the patients in ../shared/data and their effect is measured by ``benchmarks/bench_quality.py``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from ..io.volumes import Geometry

#: adult organ volumes (mL) outside which a segmentation is implausible: wide enough for
#: hepatomegaly and splenomegaly, narrow enough to catch a lost or runaway organ
PLAUSIBLE_VOLUME_ML = {
    "liver": (600.0, 4500.0),
    "right kidney": (50.0, 450.0),
    "left kidney": (50.0, 450.0),
    "spleen": (30.0, 1200.0),
}
#: at most this fraction of the liver's volume (a runaway spleen or kidney grows past it)
MAX_SHARE_OF_LIVER = {"spleen": 0.75, "right kidney": 0.3, "left kidney": 0.3}
MIN_LARGEST_SHARE = 0.9
MAX_UNCERTAIN_SHARE = 0.2
#: (structure on the patient's left, structure on the patient's right): their centroids lie at least
#: MIN_LEFT_MM apart along the patient's right-left axis (107-210 mm in the CHAOS MR patients)
LEFT_OF = (("spleen", "liver"), ("left kidney", "right kidney"))
MIN_LEFT_MM = 50.0
#: drawn on MR cross-validation folds 0-1, where the two confidently wrong spleens that passed every
#: other check scored 0.899 and 0.945 and well-segmented structures 0.948-0.989
#: (benchmarks/bench_qc_signals.py); on folds 2-4 it caught the one such error (0.899, a left
#: kidney of Dice 0.822) and flagged none of the 27 structures of Dice >= 0.90 (README)
MIN_CONTRAST_AGREEMENT = 0.95
OK, NEEDS_REVIEW = "ok", "needs review"


def structure_measures(labels: np.ndarray, geometry: Geometry, label: int,
                       uncertain_voxels: Optional[int] = None, contrast_agreement: Optional[float] = None) -> dict:
    """Volume, pieces, centroid (LPS mm), uncertain share and contrast agreement of one label."""
    mask = labels == label
    count = int(np.count_nonzero(mask))
    out = {"volume_ml": count * geometry.voxel_volume_ml, "components": 0, "largest_component_share": None,
           "uncertain_share": None, "centroid_lps": None, "contrast_agreement": contrast_agreement}
    if count == 0:
        return out
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    pieces, n = ndimage.label(mask[box], structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(pieces.ravel())[1:]
    kji = np.array(ndimage.center_of_mass(mask[box])) + [s.start for s in box]
    centroid = geometry.index_to_lps() @ np.append(kji[::-1], 1.0)
    out.update(components=int(n), largest_component_share=float(sizes.max() / count),
               centroid_lps=[float(v) for v in centroid[:3]])
    if uncertain_voxels is not None:
        out["uncertain_share"] = float(min(1.0, uncertain_voxels / count))
    return out


def quality_check(labels: np.ndarray, geometry: Geometry, classes: Sequence[dict],
                  uncertain_by_label: Optional[np.ndarray] = None, check_volumes: bool = True,
                  contrast_agreement: Optional[dict] = None) -> dict:
    """``{"status": "ok" | "needs review", "reasons": [...], "structures": {name: measures}}``.

    Args:
        uncertain_by_label: uncertain voxel count per label value (the segmenter's); without it
            (e.g. after manual edits) the certainty check is skipped.
        contrast_agreement: label value -> the segmentation's Dice with itself on the image with
            its contrast bent (the segmenter's, when it ran the contrast check); without it the
            contrast check is skipped.
        check_volumes: False for images without a real voxel size (the volume ranges mean nothing).
    """
    structures, reasons = {}, []
    for c in classes:
        name, label = c["name"], int(c["label"])
        uncertain = int(uncertain_by_label[label]) if uncertain_by_label is not None else None
        agreement = (contrast_agreement or {}).get(label)
        m = structures[name] = structure_measures(labels, geometry, label, uncertain, agreement)
        if name == "lesion":  # any number and size of lesions is plausible, an unsure outline is not
            _check_certainty(m, name, reasons)
            continue
        if m["components"] == 0:
            reasons.append(f"no {name} found")
            continue
        low, high = PLAUSIBLE_VOLUME_ML.get(name, (0.0, float("inf")))
        if check_volumes and not low <= m["volume_ml"] <= high:
            reasons.append(f"{name} volume {m['volume_ml']:.0f} mL is outside {low:.0f}-{high:.0f} mL")
        if m["largest_component_share"] < MIN_LARGEST_SHARE:
            reasons.append(f"{name} is in {m['components']} pieces (the largest holds "
                           f"{100 * m['largest_component_share']:.0f} %)")
        _check_certainty(m, name, reasons)
        if agreement is not None and agreement < MIN_CONTRAST_AGREEMENT:
            reasons.append(f"the {name} changed when the image's contrast was bent (Dice {agreement:.3f} with "
                           f"itself, expected at least {MIN_CONTRAST_AGREEMENT})")
    liver = structures.get("liver")
    for name, share in MAX_SHARE_OF_LIVER.items():
        m = structures.get(name)
        if m and liver and liver["volume_ml"] > 0 and m["volume_ml"] > share * liver["volume_ml"]:
            reasons.append(f"the {name} ({m['volume_ml']:.0f} mL) is more than {100 * share:.0f} % of the liver "
                           f"({liver['volume_ml']:.0f} mL)")
    for left, right in LEFT_OF:
        a, b = structures.get(left), structures.get(right)
        if a and b and a["centroid_lps"] and b["centroid_lps"]:
            offset = a["centroid_lps"][0] - b["centroid_lps"][0]
            if offset < MIN_LEFT_MM:
                reasons.append(f"the {left} is not on the patient's left of the {right} (centres {offset:.0f} mm "
                               f"apart, expected at least {MIN_LEFT_MM:.0f})")
    return {"status": NEEDS_REVIEW if reasons else OK, "reasons": reasons, "structures": structures}


def _check_certainty(measures: dict, name: str, reasons: list):
    if measures["uncertain_share"] is not None and measures["uncertain_share"] > MAX_UNCERTAIN_SHARE:
        reasons.append(f"the model was unsure of {100 * measures['uncertain_share']:.0f} % of the {name}")
