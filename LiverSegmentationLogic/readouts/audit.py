"""The audit trail: what made each readout, checkable later by recomputing hashes.

A record holds the tool and model (name, version, weights sha256), content hashes of the input
image and of the segmentation, the readout, the time and, after review, how much the operator
changed (Dice between suggestion and final, changed volume per class).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .. import __version__
from ..io.volumes import Geometry
from .metrics import dice


def array_sha256(array: np.ndarray) -> str:
    """Content hash of an array (dtype, shape and voxel bytes): the same scan read from NIfTI,
    NRRD or DICOM hashes the same."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def audit_record(image: np.ndarray, labels: np.ndarray, model: dict, readout: dict,
                 source: Optional[str] = None) -> dict:
    """The record of one segmentation and its readout."""
    return {
        "tool": "liverseg",
        "tool_version": __version__,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {k: model.get(k) for k in ("name", "version", "sha256", "roi_model") if k in model},
        "input": {"source": source, "sha256": array_sha256(image)},
        "segmentation_sha256": array_sha256(np.asarray(labels, dtype=np.uint8)),
        "readout": {k: readout.get(k) for k in ("volumes_ml", "fat_fraction", "lesions")},
    }


def correction_effort(suggestion: np.ndarray, final: np.ndarray) -> dict:
    """The operator's effort to turn the suggestion into the final labels: voxels changed and
    the slices (first array axis) they lie on."""
    changed = np.asarray(suggestion) != np.asarray(final)
    touched = np.flatnonzero(changed.reshape(changed.shape[0], -1).any(1))
    return {"changed_voxels": int(np.count_nonzero(changed)), "slices_touched": [int(z) for z in touched]}


def review_record(suggestion: np.ndarray, final: np.ndarray, geometry: Geometry, classes: Sequence[dict]) -> dict:
    """How much the operator changed the suggestion: Dice and volume change (mL) per class, and
    the effort (:func:`correction_effort`)."""
    voxel_ml = geometry.voxel_volume_ml
    return {
        **correction_effort(suggestion, final),
        "suggestion_dice": {c["name"]: dice(suggestion == c["label"], final == c["label"]) for c in classes},
        "changed_volume_ml": {
            c["name"]: float(np.count_nonzero(final == c["label"]) - np.count_nonzero(suggestion == c["label"]))
            * voxel_ml
            for c in classes
        },
        "final_segmentation_sha256": array_sha256(np.asarray(final, dtype=np.uint8)),
    }


def write_audit(path: Union[str, os.PathLike], record: dict) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def verify_audit(record: dict, image: np.ndarray, labels: np.ndarray) -> bool:
    """True when the image and segmentation on disk are the ones the record describes."""
    return (record["input"]["sha256"] == array_sha256(image)
            and record["segmentation_sha256"] == array_sha256(np.asarray(labels, dtype=np.uint8)))
