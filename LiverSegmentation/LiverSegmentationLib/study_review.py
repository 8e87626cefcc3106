"""Reviewing a whole study case after case, for any front end (the browser review app today):
which cases there are and how far each one is, opening one into the scene, and what Accept writes.

No Qt and no trame here. Segmenting, the readout after each edit and the export to the fine-tuning
queue are the :class:`panel_controller.PanelController`'s, exactly as in the Slicer panel, so both
front ends share one meaning of "an edit", "the readout" and "an export".

Files, beside what ``liverseg batch`` writes in ``OUT/<case>/``:
- ``reviewed.seg.nrrd``: the accepted segmentation (the batch's ``segmentation.seg.nrrd``, the
  model's suggestion, stays as it was);
- ``review.json``, written last: who accepted it and when, the readout of the accepted
  segmentation, how much was changed (Dice with the suggestion, voxels and slices changed) and the
  fine-tuning queue entry when it was sent there.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import mrml_bridge as bridge
from .jobs import DONE
from .panel_controller import (
    AUDIT_ATTRIBUTE,
    CLASSES_ATTRIBUTE,
    MODEL_ATTRIBUTE,
    PanelController,
    PanelError,
    classes_of_model,
    classes_of_segmentation,
    model_of_segmentation,
)

REVIEW_FILE = "review.json"
REVIEWED_SEGMENTATION = "reviewed.seg.nrrd"
SUGGESTION_FILE = "segmentation.seg.nrrd"  # what liverseg batch wrote
NEW, SEGMENTED, ACCEPTED = "new", "segmented", "accepted"


@dataclass
class ReviewCase:
    """One scan of the study and how far its review is."""

    case: str
    source: Path
    ff: Optional[Path]
    status: str = NEW  # new, segmented (a suggestion is waiting), accepted
    quality: str = ""  # "ok", "needs review" or "" (not segmented yet)
    reasons: list = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return self.quality == "needs review"


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def study_cases(study: Path, out: Path) -> list[ReviewCase]:
    """The study's scans as ``liverseg batch`` finds them, each with its status and quality flag;
    flagged cases first (study order within), as in the batch table."""
    from LiverSegmentationLogic.studies.batch import find_cases

    cases = []
    for found in find_cases(Path(study)):
        entry = ReviewCase(found["case"], found["source"], found["ff"])
        folder = Path(out) / entry.case
        review, readout = _read_json(folder / REVIEW_FILE), _read_json(folder / "readout.json")
        if review is not None:
            entry.status, readout = ACCEPTED, review.get("readout")
        elif readout is not None and (folder / SUGGESTION_FILE).exists():
            entry.status = SEGMENTED
        quality = (readout or {}).get("quality") or {}
        entry.quality, entry.reasons = quality.get("status", ""), list(quality.get("reasons", []))
        cases.append(entry)
    return sorted(cases, key=lambda c: not c.flagged)


def _review_stamp(folder: Path) -> Optional[int]:
    """When the case's review was last written (None: never): another tab or window accepting the
    same case meanwhile changes it."""
    try:
        return (folder / REVIEW_FILE).stat().st_mtime_ns
    except OSError:
        return None


class StudyReview:
    """The review of one study: the case list, the open case's nodes, Accept.

    Args:
        study: the folder of scans (as for ``liverseg batch``).
        out: the results folder (``liverseg batch -o``); reviews are written beside the batch's.
        controller: segments, computes readouts and exports (its settings: backend, model, study,
            operator name...).
        scene: the MRML scene the cases are opened in (``slicer.mrmlScene``).
    """

    def __init__(self, study, out, controller: PanelController, scene):
        self.study, self.out = Path(study), Path(out)
        if not self.study.is_dir():
            raise PanelError(f"the study folder {self.study} does not exist")
        self.out.mkdir(parents=True, exist_ok=True)
        self.controller, self.scene = controller, scene
        self.cases: list[ReviewCase] = []
        self.current: Optional[ReviewCase] = None
        self.input_node = self.ff_node = self.segmentation_node = None
        self.slices_to_check: list = []  # {"slice", "position_lps"} of the open case
        self._opened_stamp: Optional[int] = None
        self._export: Optional[Path] = None  # review.json waiting for its queue entry
        self._segmenting = False  # a job of this review is running
        self.refresh()

    # ------------------------------------------------------------------ the case list
    def refresh(self) -> list[ReviewCase]:
        self.cases = study_cases(self.study, self.out)
        if self.current is not None:
            self.current = next((c for c in self.cases if c.case == self.current.case), self.current)
        return self.cases

    def neighbour(self, step: int) -> Optional[str]:
        """The case ``step`` places after (before, when negative) the open one in the list."""
        if not self.cases:
            return None
        names = [c.case for c in self.cases]
        index = names.index(self.current.case) + step if self.current and self.current.case in names else 0
        return names[min(max(index, 0), len(names) - 1)]

    # ------------------------------------------------------------------ opening a case
    def open(self, case: str, closing: Optional[Callable[[], None]] = None):
        """Load a case into the scene in place of the open one, with its accepted review or the
        batch's suggestion when there is one. Raises :class:`PanelError` for a case that cannot be
        read (the open case then stays).

        Args:
            closing: called once the new case could be read, before the open case's nodes are
                removed (a front end lets go of them: e.g. the segment editor).
        """
        from LiverSegmentationLogic.io.volumes import read_volume

        if self.controller.running:
            raise PanelError("wait for the segmentation to finish (or cancel it) before opening another case")
        entry = next((c for c in self.cases if c.case == case), None)
        if entry is None:
            raise PanelError(f"no case {case!r} in this study")
        try:
            volume = read_volume(entry.source)
            ff_map = read_volume(entry.ff, validate=False) if entry.ff else None
        except Exception as exc:  # noqa: BLE001 (any reader error is the case's, shown on the page)
            raise PanelError(f"cannot read case {case}: {exc}") from exc
        if closing is not None:
            closing()
        self._close_case()
        self.current, self.slices_to_check = entry, []
        self.input_node = bridge.add_volume_node(volume, entry.case)
        self.ff_node = bridge.add_volume_node(ff_map, f"{entry.case} fat fraction") if ff_map is not None else None
        self.segmentation_node = self._load_results(entry, volume)
        self._opened_stamp = _review_stamp(self.out / entry.case)
        said = {NEW: "not segmented yet", SEGMENTED: "the batch's suggestion", ACCEPTED: "accepted before"}
        self.controller.status = f"Opened {entry.case}: {said[entry.status]}"
        self.controller.select(self.input_node, self.ff_node, self.segmentation_node)

    def _close_case(self):
        """Remove the open case's nodes (and only those) from the scene."""
        c = self.controller
        nodes = [self.input_node, self.ff_node, self.segmentation_node, c.result_node, c.readout_table]
        nodes += [n.GetNodeReference(bridge.SUGGESTION_ROLE) for n in (self.segmentation_node, c.result_node) if n]
        c.scene_closing()  # stops a job and forgets the controller's nodes
        for node in nodes:
            if node is not None and node.GetScene() is self.scene:
                self.scene.RemoveNode(node)
        self.input_node = self.ff_node = self.segmentation_node = None
        self._segmenting = False

    def _load_results(self, entry: ReviewCase, volume):
        """The segmentation node of what is on disk for the case: the accepted labels (else the
        suggestion), with the suggestion kept beside them for the review record."""
        from LiverSegmentationLogic.io.volumes import read_volume

        folder = self.out / entry.case
        readout = _read_json(folder / "readout.json")
        if readout is None or not (folder / SUGGESTION_FILE).exists():
            return None
        suggestion = read_volume(folder / SUGGESTION_FILE, validate=False).array.astype(np.uint8)
        final = suggestion
        if entry.status == ACCEPTED and (folder / REVIEWED_SEGMENTATION).exists():
            final = read_volume(folder / REVIEWED_SEGMENTATION, validate=False).array.astype(np.uint8)
        if suggestion.shape != volume.array.shape or final.shape != volume.array.shape:
            raise PanelError(f"the results of case {entry.case} do not fit its scan (was the scan replaced?)")
        classes = classes_of_model(readout["model"]["name"])
        node = bridge.segmentation_from_labels(final, volume.geometry, classes, self.input_node,
                                               name=f"{entry.case} segmentation")
        bridge.store_suggestion(node, suggestion, self.input_node)
        node.SetAttribute(MODEL_ATTRIBUTE, json.dumps(readout["model"]))
        node.SetAttribute(CLASSES_ATTRIBUTE, json.dumps(classes))
        node.SetAttribute(AUDIT_ATTRIBUTE, json.dumps(readout.get("audit")))
        self.slices_to_check = _slices_to_check(readout.get("review"))
        return node

    # ------------------------------------------------------------------ segmenting and editing
    def segment(self):
        """Segment the open case (the controller's backend: this machine or the server)."""
        if self.input_node is None:
            raise PanelError("open a case first")
        self.controller.start(self.input_node, self.ff_node, self.segmentation_node)
        self.controller.result_node, self._segmenting = None, True

    def edited(self):
        """The segmentation was edited: the readout follows once edits pause."""
        self.controller.segmentation_edited()

    def tick(self) -> bool:
        """Advance the controller (job, readout, export); True when a new segmentation arrived."""
        self.controller.tick()
        self._tick_export()
        if not self._segmenting or self.controller.running:
            return False
        self._segmenting, node = False, self.controller.result_node
        if node is None:  # failed or cancelled: the controller's status says so
            return False
        self.segmentation_node = node
        self.slices_to_check = _slices_to_check(self.controller.review)
        self.controller.select(self.input_node, self.ff_node, node)
        return True

    def jump_to(self, index: int):
        """Centre the views on the ``index``-th slice to check."""
        bridge.jump_to(self.scene, self.slices_to_check[index]["position_lps"])

    # ------------------------------------------------------------------ accepting
    def accept(self, queue: bool = False) -> Path:
        """Write the accepted segmentation and its review record beside the batch's results; with
        ``queue``, also send the case to the fine-tuning queue (the controller's export). Returns
        the review record's path."""
        from LiverSegmentationLogic.io.volumes import write_seg_nrrd
        from LiverSegmentationLogic.readouts.audit import array_sha256, review_record, write_audit
        from LiverSegmentationLogic.readouts.measurements import segmentation_readouts

        c = self.controller
        if self.current is None or self.segmentation_node is None:
            raise PanelError("open a case and segment it before accepting")
        if c.running:
            raise PanelError("wait for the segmentation to finish")
        operator = c.settings["operatorName"].strip()
        if not operator:
            raise PanelError("enter the operator's name before accepting (it is recorded with the case)")
        folder = self.out / self.current.case
        if _review_stamp(folder) != self._opened_stamp:
            raise PanelError(f"case {self.current.case} was accepted in another tab or window after you opened it; "
                             "open it again to see that review before changing it")
        model = model_of_segmentation(self.segmentation_node)
        if model is None:
            raise PanelError("this segmentation was not made by LiverSegmentation: segment the case first")
        if queue:  # the export's own checks (operator, study...) run before anything is written
            c.export(self.input_node, self.segmentation_node)
        classes = classes_of_segmentation(self.segmentation_node)
        final = bridge.labels_from_segmentation(self.segmentation_node, self.input_node, classes)
        suggestion = bridge.suggestion_of(self.segmentation_node)
        geometry = bridge.geometry_from_volume_node(self.input_node, world=False)
        ff_map, unit = c.fat_fraction_map(self.ff_node)
        readout = segmentation_readouts(final, geometry, classes, ff_map, c.settings["marginMm"], unit)
        record = {
            "case": self.current.case,
            "source": str(self.current.source),
            "operator": operator,
            "study": c.settings["study"].strip(),
            "accepted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": model,
            "readout": readout,
            "suggestion_audit": json.loads(self.segmentation_node.GetAttribute(AUDIT_ATTRIBUTE) or "null"),
            **(review_record(suggestion, final, geometry, classes) if suggestion is not None
               else {"changed_voxels": 0, "slices_touched": [], "final_segmentation_sha256": array_sha256(final)}),
            "queue": "sending" if queue else None,
        }
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / ("partial-" + REVIEWED_SEGMENTATION)
        segments = [{k: cls.get(k) for k in ("label", "name", "color", "terminology")} for cls in classes]
        write_seg_nrrd(partial, final, geometry, segments)
        os.replace(partial, folder / REVIEWED_SEGMENTATION)
        path = write_audit(folder / REVIEW_FILE, record)  # last: the case is accepted
        self._opened_stamp = _review_stamp(folder)
        self._export = path if queue else None
        self.refresh()
        c.status = f"Accepted {self.current.case}" + (" (sending it to the fine-tuning queue...)" if queue else "")
        return path

    def _tick_export(self):
        """Once the export of an accepted case ends, its review record says where it went."""
        outcome = self.controller.task_outcome
        if self._export is None or outcome is None or outcome[0] != "Export":
            return
        from LiverSegmentationLogic.readouts.audit import write_audit

        path, self._export = self._export, None
        record = _read_json(path) or {}
        _, state, value = outcome
        if state == DONE:
            queued, where = value
            record["queue"] = {"case_id": queued["case_id"], "where": where}
        else:
            record["queue"] = f"failed: {value}"
        write_audit(path, record)
        if path.parent.name == (self.current.case if self.current else None):
            self._opened_stamp = _review_stamp(path.parent)


def _slices_to_check(review: Optional[dict]) -> list:
    review = review or {}
    return [{"slice": int(z), "position_lps": list(p)}
            for z, p in zip(review.get("slices_to_check", []), review.get("positions_lps", []))]
