"""The fine-tuning queue: corrected cases in nnU-Net's raw dataset layout.

    QUEUE/dataset.json              channel and label names (nnU-Net v2 style)
    QUEUE/imagesTr/<case>_0000.nii.gz
    QUEUE/labelsTr/<case>.nii.gz
    QUEUE/meta/<case>.json          source, task, model, Dice(suggestion, correction), operator...

A case exists once its meta file exists: image and label are written first under temporary names
and renamed into place, the meta file last. A crash mid-export therefore never leaves a half case
(leftover temporary files are ignored and cleaned up). The same image queued twice (by content
hash) is replaced or versioned, never silently duplicated.

A queue holds one label table and one modality (``dataset.json``): a case whose label table,
label values or modality differ is refused with :class:`QueueError`, so cases of different tasks
never mix. Writers in several processes (the panel, ``liverseg queue add``, a server) take an
inter-process lock (``QUEUE/.lock``) around case-id allocation and commit, and their temporary
files have names of their own.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import uuid
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import SimpleITK as sitk

from ..errors import QueueError
from ..io.volumes import Volume
from ..readouts.audit import array_sha256

TMP_SUFFIX = ".partial"
LOCK_NAME = ".lock"
LABEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")


def _temporary_name(path: Path, ending: str = "") -> Path:
    """A temporary file beside ``path`` that no other writer (process or thread) can share."""
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}{TMP_SUFFIX}{ending}")


def _atomic_write_image(volume: Volume, path: Path):
    tmp = _temporary_name(path, ".nii.gz")
    sitk.WriteImage(volume.to_sitk(), str(tmp), useCompression=True)
    os.replace(tmp, path)


def _atomic_write_json(data: dict, path: Path):
    tmp = _temporary_name(path)
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive lock shared by every process that writes into ``folder`` (blocks until free)."""
    with open(folder / LOCK_NAME, "a+b") as handle:
        if os.name == "nt":
            import msvcrt

            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)  # retries for ~10 s, then raises
                    break
                except OSError:
                    continue
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def check_label_table(labels) -> dict[str, int]:
    """A label table (structure name -> label value), checked: names of letters, digits, space,
    ``_.-`` (up to 64); integer values 1-255, distinct; ``background`` only as 0.
    Returns it with ``background: 0`` first."""
    if not isinstance(labels, dict) or not labels:
        raise QueueError("the label table must be a non-empty object of structure name -> label value")
    table = {}
    for name, value in labels.items():
        if not isinstance(name, str) or not LABEL_NAME.fullmatch(name):
            raise QueueError(f"label name {name!r:.80} must be 1-64 letters, digits, spaces or '_.-'")
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 0 <= value <= 255:
            raise QueueError(f"label {name!r}: the value must be an integer from 1 to 255, got {value!r:.40}")
        if (name == "background") != (value == 0):
            raise QueueError(f"label {name!r} = {value}: 0 is background, and background is 0")
        table[name] = int(value)
    values = [v for v in table.values() if v]
    if len(set(values)) != len(values):
        raise QueueError(f"label values must be distinct, got {table}")
    return {"background": 0, **{k: v for k, v in table.items() if v}}


class CaseQueue:
    """A folder of corrected cases waiting for fine-tuning."""

    def __init__(self, folder: Union[str, os.PathLike], labels: Optional[dict[str, int]] = None,
                 modality: Optional[str] = None):
        """Open (or create) a queue.

        Args:
            folder: the queue folder.
            labels: the label table of the cases that will be added (structure name -> value);
                a new queue takes it (default ``{"liver": 1}``), an existing one must hold the same.
            modality: likewise for the modality (default ``MR`` for a new queue).

        Raises:
            QueueError: the label table or modality differ from the queue's, or the folder cannot
                be written.
        """
        self.folder = Path(folder)
        table = check_label_table(labels) if labels is not None else None
        dataset = self.folder / "dataset.json"
        with self._writing("open"):
            for sub in ("imagesTr", "labelsTr", "meta"):
                (self.folder / sub).mkdir(parents=True, exist_ok=True)
            with _folder_lock(self.folder):
                if not dataset.exists():
                    _atomic_write_json(
                        {
                            "channel_names": {"0": modality or "MR"},
                            "labels": table or {"background": 0, "liver": 1},
                            "numTraining": 0,
                            "file_ending": ".nii.gz",
                        },
                        dataset,
                    )
                self._clean_up()
        try:
            held = json.loads(dataset.read_text())
            self.labels = check_label_table(held["labels"])
            self.modality = str(held["channel_names"]["0"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise QueueError(f"{dataset} is not a readable queue description ({exc})") from exc
        if table is not None and table != self.labels:
            raise QueueError(f"the queue {self.folder} holds cases labelled {self.labels}, this case is labelled "
                             f"{table}: use a queue folder per task")
        if modality is not None and modality != self.modality:
            raise QueueError(f"the queue {self.folder} holds {self.modality} cases, this case is {modality}: "
                             "use a queue folder per task")

    @contextlib.contextmanager
    def _writing(self, what: str):
        """Disk errors as a :class:`QueueError` that names the folder."""
        try:
            yield
        except OSError as exc:
            raise QueueError(f"cannot {what} the fine-tuning queue {self.folder}: {exc}") from exc

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
            raise QueueError(f"label shape {label.shape} differs from image shape {image.array.shape}")
        if on_duplicate not in ("replace", "version"):
            raise QueueError(f"on_duplicate must be 'replace' or 'version', got {on_duplicate!r}")
        label = self._checked_labels(label)
        meta = dict(meta or {})
        image_hash = array_sha256(image.array)
        with self._writing("write to"), _folder_lock(self.folder):
            existing = self.find_image(image_hash)
            if existing and on_duplicate == "replace":
                case_id, version = existing["case_id"], existing.get("version", 1)
            elif existing:
                base = existing.get("base_case_id", existing["case_id"])
                version = 1 + max(m.get("version", 1) for m in self.list()
                                  if m.get("base_case_id", m["case_id"]) == base)
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
                "label_sha256": array_sha256(label),
                "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"),
            }
            paths = self.paths(case_id)
            _atomic_write_image(image, paths["image"])
            _atomic_write_image(Volume(label, image.geometry), paths["label"])
            _atomic_write_json(record, paths["meta"])  # the commit point
            self._update_count()
        return record

    def _checked_labels(self, label: np.ndarray) -> np.ndarray:
        """The labelmap as uint8, if it holds integers that are classes of this queue."""
        label = np.asarray(label)
        if label.dtype != bool and not np.issubdtype(label.dtype, np.integer):
            raise QueueError(f"a labelmap holds integers, got {label.dtype} values")
        allowed = set(self.labels.values())
        low, high = (int(label.min()), int(label.max())) if label.size else (0, 0)
        if low < 0 or high > 255:
            raise QueueError(f"label values {low}..{high} are not classes of this queue {self.labels}")
        label = label.astype(np.uint8, copy=False)
        present = set(np.flatnonzero(np.bincount(label.ravel(), minlength=256)).tolist())
        if present - allowed:
            raise QueueError(f"label values {sorted(present - allowed)} are not classes of this queue "
                             f"{self.labels}")
        return label

    def remove(self, case_id: str) -> None:
        paths = self.paths(case_id)
        with self._writing("remove from"), _folder_lock(self.folder):
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
