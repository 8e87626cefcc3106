"""Readouts from a segmentation: organ volumes and the liver fat fraction (PDFF)."""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import FatFractionError
from ..io.volumes import Geometry, Volume, crop_volume
from .quality import quality_check

#: liver PDFF above this (percent) flags steatosis (Szczepaniak et al. 2005, the common MR cut-off)
STEATOSIS_THRESHOLD_PERCENT = 5.56
DEFAULT_MARGIN_MM = 3.0
UNIT_SAMPLE = 1_000_000  # map values the unit detection looks at
MAX_BALL_VOXELS = 20_000  # erosion by a ball up to this size, beyond it by a distance map


def label_volume_ml(labels: np.ndarray, geometry: Geometry, label: int = 1) -> float:
    """Volume of one label in mL: voxel count x voxel volume, on the labelmap's own grid."""
    return float(np.count_nonzero(labels == label)) * geometry.voxel_volume_ml


def detect_fat_fraction_unit(values: np.ndarray) -> Literal["percent", "fraction"]:
    """Tell a percent map (0-100) from a fraction map (0-1) by its 99th percentile.

    A whole fat-fraction map always holds some fatty tissue (subcutaneous fat, > 50 %), so a
    fraction map stays at or below ~1 and a percent map goes well above it.

    Raises:
        FatFractionError: the values fit neither unit unambiguously; pass the unit explicitly.
    """
    flat = values.ravel()
    step = max(1, flat.size // UNIT_SAMPLE)  # a regular sample: a 300 x 512 x 512 map costs milliseconds
    finite = flat[::step][np.isfinite(flat[::step])]
    if finite.size == 0:
        raise FatFractionError("The fat-fraction map has no finite values")
    p99 = float(np.percentile(finite, 99))
    if p99 <= 1.05:
        return "fraction"
    if 5.0 <= p99 <= 150.0:
        return "percent"
    raise FatFractionError(
        f"Cannot tell whether the fat-fraction map is in percent or fraction (99th percentile {p99:.3g}); "
        "give the unit explicitly (the panel's 'PDFF map unit', or --ff-unit percent|fraction)"
    )


def resample_mask_to(mask: Volume, target: Geometry, target_shape: tuple[int, int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of a mask onto another grid, by physical (LPS) coordinates.
    Where the target grid is the mask's own grid shifted by whole voxels (a map from the same
    acquisition), the mask is sliced instead."""
    shifted = _same_grid_offset(mask.geometry, target)
    if shifted is not None:
        return _shifted_window(np.asarray(mask.array, dtype=bool), shifted, target_shape)
    reference = sitk.Image([int(s) for s in target_shape[::-1]], sitk.sitkUInt8)
    reference.SetSpacing(target.spacing)
    reference.SetOrigin(target.origin)
    reference.SetDirection(target.direction)
    moving = Volume(mask.array.astype(np.uint8), mask.geometry).to_sitk()
    out = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out).astype(bool)


def _same_grid_offset(source: Geometry, target: Geometry, tol: float = 1e-4) -> Optional[np.ndarray]:
    """The (k, j, i) index of ``target``'s first voxel on ``source``'s grid, when both grids share
    spacing and direction and that index is whole; else None."""
    if not (np.allclose(source.spacing, target.spacing, rtol=tol, atol=0)
            and np.allclose(source.direction, target.direction, atol=tol)):
        return None
    ijk = np.linalg.inv(source.index_to_lps()) @ np.array([*target.origin, 1.0])
    whole = np.rint(ijk[:3])
    return whole[::-1].astype(int) if np.allclose(ijk[:3], whole, atol=1e-3) else None


def _shifted_window(array: np.ndarray, start_kji: np.ndarray, shape) -> np.ndarray:
    """``array[start : start + shape]``, False where the window leaves the array."""
    out = np.zeros(tuple(int(n) for n in shape), dtype=bool)
    src = tuple(slice(max(a, 0), min(a + n, size)) for a, n, size in zip(start_kji, shape, array.shape))
    dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, start_kji))
    if all(s.stop > s.start for s in src):
        out[dst] = array[src]
    return out


def _box_around(mask: Volume, target: Geometry, target_shape) -> Optional[tuple]:
    """The index box (k, j, i slices) of ``target``'s grid that holds the mask's voxels, one voxel
    wider on every side; None where they do not meet."""
    present = [np.flatnonzero(np.any(mask.array, axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]
    if any(p.size == 0 for p in present):
        return None
    low_kji = np.array([p[0] for p in present], dtype=float) - 0.5
    high_kji = np.array([p[-1] for p in present], dtype=float) + 0.5
    corners_ijk = np.array([[i, j, k, 1.0] for k in (low_kji[0], high_kji[0]) for j in (low_kji[1], high_kji[1])
                            for i in (low_kji[2], high_kji[2])])
    to_target = np.linalg.inv(target.index_to_lps()) @ mask.geometry.index_to_lps()
    target_kji = (corners_ijk @ to_target.T)[:, 2::-1]
    start = np.maximum(np.floor(target_kji.min(axis=0)).astype(int) - 1, 0)
    stop = np.minimum(np.ceil(target_kji.max(axis=0)).astype(int) + 2, np.asarray(target_shape))
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def erode_mm(mask: np.ndarray, spacing_zyx, margin_mm: float) -> np.ndarray:
    """Keep the voxels farther than ``margin_mm`` from the mask's outside (exact in mm; beyond the
    array counts as inside, as for a distance transform).

    Voxels whose whole box of +-margin lies inside survive for sure (three running minima); only
    the band left near the border is eroded with the ball of radius ``margin_mm``. The cost follows
    the border, not the volume: the readout reruns after every edit.
    """
    if margin_mm <= 0:
        return mask
    # offsets longer than the array never reach a voxel of it
    radius = [min(int(np.floor(margin_mm / s)), n - 1) for s, n in zip(spacing_zyx, mask.shape)]
    if np.prod([2 * r + 1 for r in radius]) > MAX_BALL_VOXELS:  # a margin of many voxels: the distance map is cheaper
        return ndimage.distance_transform_edt(mask, sampling=spacing_zyx) > margin_mm
    sure = mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8)
    for axis, r in enumerate(radius):
        if r:
            sure = ndimage.minimum_filter1d(sure, 2 * r + 1, axis=axis, mode="constant", cval=1)
    band = mask & ~sure.view(bool)
    offsets = np.meshgrid(*[np.arange(-r, r + 1) * s for r, s in zip(radius, spacing_zyx)], indexing="ij")
    ball = sum(o**2 for o in offsets) <= margin_mm**2
    return ndimage.binary_erosion(mask, structure=ball, mask=band, border_value=1)


def fat_fraction_readout(
    liver_mask: Volume,
    ff_map: Volume,
    margin_mm: float = DEFAULT_MARGIN_MM,
    unit: Literal["auto", "percent", "fraction"] = "auto",
) -> dict:
    """Liver fat fraction inside an eroded liver mask, on the fat-fraction map's own grid.

    The mask is resampled into the map's grid by physical coordinates (so the map may have any
    spacing, extent or orientation), eroded by ``margin_mm`` to stay clear of partial-volume
    voxels at the liver border, and the map is summarised inside it. Non-finite map voxels
    (e.g. background set to NaN) are ignored.

    Args:
        liver_mask: boolean/0-1 liver mask with its geometry.
        ff_map: fat-fraction (PDFF) map, percent or fraction.
        margin_mm: erosion margin from the liver border.
        unit: unit of ``ff_map``; ``"auto"`` detects it (see :func:`detect_fat_fraction_unit`).

    Returns:
        median, mean, p25, p75, iqr (all percent), n_voxels, margin_mm, unit (of the input map),
        steatosis (median > 5.56 %).

    Raises:
        FatFractionError: no overlap, nothing left after erosion, or an ambiguous unit.
    """
    if margin_mm < 0:
        raise FatFractionError(f"margin_mm must be >= 0, got {margin_mm}")
    if unit not in ("auto", "percent", "fraction"):
        raise FatFractionError(f"unit must be auto, percent or fraction, got {unit!r}")
    if ff_map.array.ndim != 3:
        raise FatFractionError(f"The fat-fraction map must be 3D, got {ff_map.array.ndim}D")
    if not np.any(liver_mask.array):
        raise FatFractionError("The liver mask is empty: nothing to measure the fat fraction in")
    if unit == "auto":
        unit = detect_fat_fraction_unit(ff_map.array)
    liver_mask = crop_volume(liver_mask, ndimage.find_objects(np.asarray(liver_mask.array, dtype=np.uint8))[0])
    # only the map around the liver is read: the cost follows the liver, not the map (the readout
    # reruns after every edit); one voxel of padding keeps the erosion exact
    box = _box_around(liver_mask, ff_map.geometry, ff_map.array.shape)
    if box is None:
        raise FatFractionError("The fat-fraction map does not overlap the liver mask (check both scans' positions)")
    ff_map = crop_volume(ff_map, box)
    values = np.asarray(ff_map.array, dtype=np.float64)
    mask = resample_mask_to(liver_mask, ff_map.geometry, values.shape)
    if not mask.any():
        raise FatFractionError("The fat-fraction map does not overlap the liver mask (check both scans' positions)")
    spacing_zyx = ff_map.geometry.spacing[::-1]
    inner = erode_mm(mask, spacing_zyx, margin_mm) & np.isfinite(values)
    if not inner.any():
        raise FatFractionError(
            f"No liver voxel of the fat-fraction map is more than {margin_mm} mm inside the liver; "
            "use a smaller margin"
        )
    sample = values[inner] * (100.0 if unit == "fraction" else 1.0)
    p25, median, p75 = np.percentile(sample, [25, 50, 75])
    return {
        "median": float(median),
        "mean": float(sample.mean()),
        "p25": float(p25),
        "p75": float(p75),
        "iqr": float(p75 - p25),
        "n_voxels": int(sample.size),
        "margin_mm": float(margin_mm),
        "unit": unit,
        "steatosis": bool(median > STEATOSIS_THRESHOLD_PERCENT),
    }


def lesion_readout(labels: np.ndarray, geometry: Geometry, lesion_label: int, liver_label: Optional[int]) -> dict:
    """Lesion count (26-connected components), total volume (mL) and burden: lesion volume as a
    percentage of the liver including its lesions."""
    lesion = labels == lesion_label
    components, count = ndimage.label(lesion, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(components.ravel())[1:] * geometry.voxel_volume_ml
    total = float(sizes.sum())
    liver_ml = label_volume_ml(labels, geometry, liver_label) + total if liver_label is not None else 0.0
    return {
        "count": int(count),
        "total_volume_ml": total,
        "burden_percent": 100.0 * total / liver_ml if liver_ml > 0 else None,
        "volumes_ml": sorted((float(v) for v in sizes), reverse=True),
    }


def segmentation_readouts(
    labels: np.ndarray,
    geometry: Geometry,
    classes: Sequence[dict],
    ff_map: Optional[Volume] = None,
    margin_mm: float = DEFAULT_MARGIN_MM,
    ff_unit: str = "auto",
    readouts: Sequence[str] = ("volume", "fat_fraction", "lesions"),
    uncertain_by_label: Optional[np.ndarray] = None,
    contrast_agreement: Optional[dict] = None,
) -> dict:
    """The readouts of a labelmap: ``volumes_ml`` per class name, ``fat_fraction`` (measured in
    the class named "liver"; None without a map or without a liver class), ``lesions`` (for a
    class named "lesion"; None otherwise) and ``quality`` ("ok" or "needs review" with the
    reasons, see :mod:`readouts.quality`).

    Args:
        readouts: which apply (a model card's ``readouts``); volumes and quality are always given.
        uncertain_by_label: the segmenter's uncertain voxel counts per label (for the QC).
        contrast_agreement: the segmenter's contrast check per label (for the QC).
    """
    by_name = {c["name"]: int(c["label"]) for c in classes}
    readout = {
        "volumes_ml": {c["name"]: label_volume_ml(labels, geometry, c["label"]) for c in classes},
        "fat_fraction": None,
        "lesions": None,
    }
    if ff_map is not None and "liver" in by_name and "fat_fraction" in readouts:
        readout["fat_fraction"] = fat_fraction_readout(Volume(labels == by_name["liver"], geometry), ff_map,
                                                       margin_mm=margin_mm, unit=ff_unit)
    if "lesion" in by_name and "lesions" in readouts:
        readout["lesions"] = lesion_readout(labels, geometry, by_name["lesion"], by_name.get("liver"))
    readout["quality"] = quality_check(labels, geometry, classes, uncertain_by_label,
                                       contrast_agreement=contrast_agreement)
    return readout


def dixon_fat_fraction(in_phase: Volume, opposed_phase: Volume, min_signal_fraction: float = 0.05) -> Volume:
    """Two-point Dixon fat fraction (percent) from in-phase and opposed-phase magnitude images.

    With water W and fat F, IP = W + F and OP = |W - F|; assuming water dominates (the usual
    liver case), FF = F / (W + F) = (IP - OP) / (2 IP). Magnitude two-point Dixon cannot tell
    FF from 100 - FF, so the result lies in 0-50 %. Voxels whose in-phase signal is below
    ``min_signal_fraction`` x the 99th percentile are background and set to NaN.

    Raises:
        FatFractionError: the two images are not on the same grid.
    """
    if in_phase.array.shape != opposed_phase.array.shape or not in_phase.geometry.allclose(opposed_phase.geometry):
        raise FatFractionError("In-phase and opposed-phase images must be on the same grid")
    ip = np.asarray(in_phase.array, dtype=np.float32)
    op = np.abs(np.asarray(opposed_phase.array, dtype=np.float32))
    floor = min_signal_fraction * float(np.percentile(ip[np.isfinite(ip)], 99))
    with np.errstate(divide="ignore", invalid="ignore"):
        ff = np.clip((ip - op) / (2.0 * ip) * 100.0, 0.0, 50.0)
    ff[~(ip > floor)] = np.nan
    return Volume(ff.astype(np.float32), in_phase.geometry)
