"""The fine-tuning queue: corrected cases in nnU-Net's raw dataset layout.

    QUEUE/dataset.json              channel and label names (nnU-Net v2 style)
    QUEUE/imagesTr/<case>_0000.nii.gz
    QUEUE/labelsTr/<case>.nii.gz
    QUEUE/meta/<case>.json          source, task, model, Dice(suggestion, correction), operator...

A case exists once its meta file exists: image and label are written first under temporary names
and renamed into place, the meta file last. A crash mid-export therefore never leaves a half case
(leftover temporary files are ignored and cleaned up). The same image queued twice (by content
hash) is replaced or versioned, never silently duplicated.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import SimpleITK as sitk

from ..readouts.audit import array_sha256
from ..io.volumes import Volume

TMP_SUFFIX = ".partial"


def _atomic_write_image(volume: Volume, path: Path):
    tmp = path.with_name(path.name + TMP_SUFFIX + ".nii.gz")
    sitk.WriteImage(volume.to_sitk(), str(tmp), useCompression=True)
    os.replace(tmp, path)


def _atomic_write_json(data: dict, path: Path):
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class CaseQueue:
    """A folder of corrected cases waiting for fine-tuning."""

    def __init__(self, folder: str | os.PathLike, labels: Optional[dict[str, int]] = None, modality: str = "MR"):
        self.folder = Path(folder)
        for sub in ("imagesTr", "labelsTr", "meta"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        dataset = self.folder / "dataset.json"
        if not dataset.exists():
            _atomic_write_json(
                {
                    "channel_names": {"0": modality},
                    "labels": {"background": 0, **(labels or {"liver": 1})},
                    "numTraining": 0,
                    "file_ending": ".nii.gz",
                },
                dataset,
            )
        self._clean_up()

    def _clean_up(self):
        """Remove what an interrupted export left: temporary files, and image/label files of a
        case whose meta file (the commit point) was never written."""
        for path in self.folder.rglob(f"*{TMP_SUFFIX}*"):
            path.unlink(missing_ok=True)
        committed = {p.stem for p in self.folder.glob("meta/*.json")}
        for path in self.folder.glob("imagesTr/*_0000.nii.gz"):
            if path.name[: -len("_0000.nii.gz")] not in committed:
                path.unlink()
        for path in self.folder.glob("labelsTr/*.nii.gz"):
            if path.name[: -len(".nii.gz")] not in committed:
                path.unlink()

    def paths(self, case_id: str) -> dict[str, Path]:
        return {
            "image": self.folder / "imagesTr" / f"{case_id}_0000.nii.gz",
            "label": self.folder / "labelsTr" / f"{case_id}.nii.gz",
            "meta": self.folder / "meta" / f"{case_id}.json",
        }

    def list(self) -> list[dict]:
        """Complete cases (those with a meta file), oldest first."""
        cases = []
        for meta_path in sorted(self.folder.glob("meta/*.json")):
            meta = json.loads(meta_path.read_text())
            if all(p.exists() for p in self.paths(meta["case_id"]).values()):
                cases.append(meta)
        return sorted(cases, key=lambda m: m["exported"])

    def find_image(self, image_sha256: str) -> Optional[dict]:
        return next((m for m in self.list() if m["image_sha256"] == image_sha256), None)

    def add(
        self,
        image: Volume,
        label: np.ndarray,
        meta: Optional[dict] = None,
        on_duplicate: Literal["replace", "version"] = "replace",
    ) -> dict:
        """Queue a corrected case; returns its meta record.

        Args:
            image: the scan.
            label: the corrected labelmap on the image's grid.
            meta: extra fields (source, task, modality, model, suggestion_dice, operator, study...).
            on_duplicate: the same image already queued: ``replace`` its case, or add a new
                ``version`` of it (case id suffixed ``_v2``, ``_v3``...).
        """
        if label.shape != image.array.shape:
            raise ValueError(f"label shape {label.shape} differs from image shape {image.array.shape}")
        if on_duplicate not in ("replace", "version"):
            raise ValueError(f"on_duplicate must be 'replace' or 'version', got {on_duplicate!r}")
        meta = dict(meta or {})
        image_hash = array_sha256(image.array)
        existing = self.find_image(image_hash)
        if existing and on_duplicate == "replace":
            case_id, version = existing["case_id"], existing.get("version", 1)
        elif existing:
            base = existing.get("base_case_id", existing["case_id"])
            version = 1 + max(m.get("version", 1) for m in self.list() if m.get("base_case_id", m["case_id"]) == base)
            case_id = f"{base}_v{version}"
        else:
            case_id, version = self._new_case_id(meta.get("study")), 1
        record = {
            **meta,
            "case_id": case_id,
            "base_case_id": existing.get("base_case_id", existing["case_id"]) if existing else case_id,
            "version": version,
            "replaced": bool(existing and on_duplicate == "replace"),
            "image_sha256": image_hash,
            "label_sha256": array_sha256(np.asarray(label, dtype=np.uint8)),
            "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
        }
        paths = self.paths(case_id)
        _atomic_write_image(image, paths["image"])
        _atomic_write_image(Volume(np.asarray(label, dtype=np.uint8), image.geometry), paths["label"])
        _atomic_write_json(record, paths["meta"])  # the commit point
        self._update_count()
        return record

    def remove(self, case_id: str) -> None:
        paths = self.paths(case_id)
        if not paths["meta"].exists():
            raise KeyError(f"no case {case_id!r} in {self.folder}")
        paths["meta"].unlink()  # uncommit first, then the data
        paths["image"].unlink(missing_ok=True)
        paths["label"].unlink(missing_ok=True)
        self._update_count()

    def _new_case_id(self, study: Optional[str]) -> str:
        prefix = re.sub(r"[^A-Za-z0-9]+", "-", study or "case").strip("-") or "case"
        taken = {p.stem for p in self.folder.glob("meta/*.json")}
        n = 1
        while f"{prefix}_{n:03d}" in taken:
            n += 1
        return f"{prefix}_{n:03d}"

    def _update_count(self):
        dataset_path = self.folder / "dataset.json"
        dataset = json.loads(dataset_path.read_text())
        dataset["numTraining"] = len(self.list())
        _atomic_write_json(dataset, dataset_path)
