"""One case end to end: segment a volume, read out volumes and fat fraction, write the results.

Local inference, the CLI, batch, the background job of the Slicer panel and the inference server
all call :func:`segment_case`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Sequence, Union

from ..readouts.audit import audit_record
from .guidance import axial_slice_positions, slices_to_check
from ..io.volumes import Volume, channel_array, write_labelmap, write_seg_nrrd
from .results import ProgressCallback, SegmentationResult
from .segmenter import Segmenter
from ..readouts.measurements import DEFAULT_MARGIN_MM, segmentation_readouts


def segment_case(
    segmenter: Segmenter,
    volume: Union[Volume, Sequence[Volume]],
    ff_map: Optional[Volume] = None,
    margin_mm: float = DEFAULT_MARGIN_MM,
    ff_unit: str = "auto",
    progress: Optional[ProgressCallback] = None,
    cancel=None,
    source: Optional[str] = None,
) -> tuple[SegmentationResult, dict]:
    """Segment ``volume`` and compute its readouts.

    Args:
        volume: the scan, or one scan per input channel of a multi-channel model.
        source: where the volume came from (a path), for the audit record.

    Returns:
        the segmentation and a readout dict: ``volumes_ml`` per class name, ``fat_fraction``
        (None without a map; computed in the class named "liver"), ``model``, ``review`` (slices
        to check), ``timings`` and ``audit`` (see :mod:`readouts.audit`).
    """
    result = segmenter.segment(volume, progress=progress, cancel=cancel)
    t0 = time.perf_counter()
    kinds = segmenter.model.card.get("readouts", ["volume", "fat_fraction"])
    readout = segmentation_readouts(result.labels, result.geometry, result.classes, ff_map, margin_mm, ff_unit,
                                    kinds, result.uncertain_by_label, result.contrast_agreement)
    readout["model"] = result.model
    if result.slice_uncertainty is not None:
        flagged = slices_to_check(result.slice_uncertainty)
        positions = axial_slice_positions(result.geometry, result.labels.shape)
        readout["review"] = {
            "slices_to_check": flagged,  # axial slice indices, most uncertain first
            "uncertain_voxels": [int(result.slice_uncertainty[z]) for z in flagged],
            "positions_lps": [positions[z].tolist() for z in flagged],
            "uncertain_voxels_total": int(result.slice_uncertainty.sum()),
        }
    result.timings["readout"] = time.perf_counter() - t0
    readout["timings"] = dict(result.timings)
    # every readout carries its audit record, wherever it is computed (CLI, batch, server, panel)
    volumes = [volume] if isinstance(volume, Volume) else list(volume)
    readout["audit"] = audit_record(channel_array(volumes), result.labels, result.model, readout, source=source)
    return result, readout


def write_segmentation(path: Union[str, os.PathLike], result: SegmentationResult) -> Path:
    """Write by extension: ``.seg.nrrd`` (Slicer segmentation with named segments) or any
    labelmap format SimpleITK writes (``.nrrd``, ``.nii.gz``, ``.mha``...)."""
    path = Path(path)
    if path.name.endswith(".seg.nrrd"):
        segments = [
            {"label": c["label"], "name": c["name"], "color": c["color"], "terminology": c.get("terminology")}
            for c in result.classes
        ]
        return write_seg_nrrd(path, result.labels, result.geometry, segments)
    return write_labelmap(path, result.labels, result.geometry)


def format_readout(readout: dict) -> str:
    """A plain-text table of the readouts."""
    rows = [("model", f"{readout['model']['name']} {readout['model']['version']}")]
    for name, ml in readout["volumes_ml"].items():
        rows.append((f"{name} volume", f"{ml:.1f} mL"))
    lesions = readout.get("lesions")
    if lesions:
        burden = lesions["burden_percent"]
        rows += [
            ("lesion count", str(lesions["count"])),
            ("lesion volume", f"{lesions['total_volume_ml']:.1f} mL"),
            ("lesion burden", "n/a (no liver)" if burden is None else f"{burden:.2f} % of the liver"),
        ]
    ff = readout.get("fat_fraction")
    if ff:
        rows += [
            ("liver PDFF median", f"{ff['median']:.2f} %"),
            ("liver PDFF mean", f"{ff['mean']:.2f} %"),
            ("liver PDFF IQR", f"{ff['p25']:.2f} - {ff['p75']:.2f} % ({ff['iqr']:.2f})"),
            ("PDFF voxels", f"{ff['n_voxels']} (margin {ff['margin_mm']:g} mm, map in {ff['unit']})"),
            ("steatosis (> 5.56 %)", "YES" if ff["steatosis"] else "no"),
        ]
    elif "liver" in readout["volumes_ml"]:
        rows.append(("liver PDFF", "n/a (no fat-fraction map given)"))
    quality = readout.get("quality")
    if quality:
        rows.append(("quality", quality["status"]))
        rows += [("", f"- {reason}") for reason in quality["reasons"]]
    timings = readout.get("timings", {})
    if timings:
        rows.append(("time", ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)

