"""Segmentation agreement metrics, in voxels and in millimetres.

Surface distances follow the CHAOS challenge's definitions (Kavur et al. 2021): the border of a
mask is the mask minus its 6-connected erosion (the volume's edge counts as inside); ASSD is the
mean of all border-to-nearest-border distances in both directions; MSSD is their maximum.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage


def _pair(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    return pred, ref


def dice(pred, ref) -> float:
    """2|A and B| / (|A| + |B|); 1.0 when both are empty."""
    pred, ref = _pair(pred, ref)
    denom = pred.sum() + ref.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(pred, ref).sum() / denom)


def iou(pred, ref) -> float:
    """|A and B| / |A or B|; 1.0 when both are empty."""
    pred, ref = _pair(pred, ref)
    union = np.logical_or(pred, ref).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, ref).sum() / union)


def precision(pred, ref) -> float:
    pred, ref = _pair(pred, ref)
    n = pred.sum()
    return float("nan") if n == 0 else float(np.logical_and(pred, ref).sum() / n)


def recall(pred, ref) -> float:
    pred, ref = _pair(pred, ref)
    n = ref.sum()
    return float("nan") if n == 0 else float(np.logical_and(pred, ref).sum() / n)


def relative_absolute_volume_difference(pred, ref) -> float:
    """RAVD in percent: |V_pred - V_ref| / V_ref x 100."""
    pred, ref = _pair(pred, ref)
    n = ref.sum()
    return float("nan") if n == 0 else float(abs(int(pred.sum()) - int(n)) / n * 100.0)


def volume_error_percent(pred, ref) -> float:
    """Signed volume error in percent: (V_pred - V_ref) / V_ref x 100."""
    pred, ref = _pair(pred, ref)
    n = ref.sum()
    return float("nan") if n == 0 else float((int(pred.sum()) - int(n)) / n * 100.0)


def border(mask: np.ndarray) -> np.ndarray:
    """Mask minus its 6-connected erosion; voxels on the array's edge are not borders by default."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=1)


def surface_distances(pred, ref, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each pred border voxel to the nearest ref border voxel, and back.

    Args:
        spacing: voxel size per array axis, in the array's axis order (e.g. (z, y, x) for a
            numpy (k, j, i) array).
    """
    pred, ref = _pair(pred, ref)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing has {len(spacing)} values for a {pred.ndim}D mask")
    pb, rb = border(pred), border(ref)
    if not pb.any() or not rb.any():
        return np.array([]), np.array([])
    # The Euclidean distance transform of "not border" gives the exact distance to the nearest
    # border voxel. Every border voxel lies in the bounding box of both borders, so the
    # transform is done in that box only (same result, far less work).
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(pb | rb))
    pb, rb = pb[box], rb[box]
    to_ref = ndimage.distance_transform_edt(~rb, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pb, sampling=spacing)
    return to_ref[pb], to_pred[rb]


def assd_mssd(pred, ref, spacing: Sequence[float]) -> tuple[float, float]:
    """Average and maximum symmetric surface distance in mm (nan when a mask is empty)."""
    a, b = surface_distances(pred, ref, spacing)
    if a.size == 0 or b.size == 0:
        return float("nan"), float("nan")
    both = np.concatenate([a, b])
    return float(both.mean()), float(both.max())


def segmentation_metrics(pred, ref, spacing: Sequence[float]) -> dict:
    """Every metric for one binary pair; ``spacing`` in the arrays' axis order (mm)."""
    assd, mssd = assd_mssd(pred, ref, spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    pred_b, ref_b = _pair(pred, ref)
    return {
        "dice": dice(pred, ref),
        "iou": iou(pred, ref),
        "precision": precision(pred, ref),
        "recall": recall(pred, ref),
        "ravd_percent": relative_absolute_volume_difference(pred, ref),
        "volume_error_percent": volume_error_percent(pred, ref),
        "assd_mm": assd,
        "mssd_mm": mssd,
        "volume_pred_ml": float(pred_b.sum()) * voxel_ml,
        "volume_ref_ml": float(ref_b.sum()) * voxel_ml,
    }


def bland_altman(measured: Sequence[float], reference: Sequence[float]) -> dict:
    """Bland-Altman agreement of paired measurements (e.g. volumes in mL).

    Returns:
        bias (mean of measured - reference), sd of the differences, and the 95 % limits of
        agreement bias +- 1.96 sd; ``n`` pairs.
    """
    m, r = np.asarray(measured, dtype=float), np.asarray(reference, dtype=float)
    if m.shape != r.shape or m.ndim != 1:
        raise ValueError("measured and reference must be 1D sequences of the same length")
    if m.size < 2:
        raise ValueError("Bland-Altman needs at least two pairs")
    diff = m - r
    bias, sd = float(diff.mean()), float(diff.std(ddof=1))
    return {"n": int(m.size), "bias": bias, "sd": sd, "loa_lower": bias - 1.96 * sd, "loa_upper": bias + 1.96 * sd}
