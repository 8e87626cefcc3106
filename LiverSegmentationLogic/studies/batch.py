"""Batch studies: segment every scan under a folder, one result folder per case and one table.

Scans are NIfTI/NRRD/MHA files or DICOM series folders, found recursively. Not scans: files whose
name contains ``label``, ``mask`` or ``seg``, and fat-fraction maps. A fat-fraction map is paired
with the scan of the same name plus ``_ff`` or ``_pdff`` in the same folder (``case7.nii.gz`` and
``case7_pdff.nii.gz``). Results: ``OUT/<case>/{segmentation.seg.nrrd, qa.png, readout.json,
audit.json}`` and ``OUT/results.csv``. A re-run skips finished cases; a failing case gets a row
saying why and does not stop the others. The table lists first the cases that need attention:
those the quality control flags ("needs review", with its reasons) and those that failed.
"""

from __future__ import annotations

import csv
import json
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Optional

from ..readouts.audit import write_audit
from ..readouts.quality import NEEDS_REVIEW
from ..errors import CancelledError, LiverSegError
from ..io.volumes import IMAGE_SUFFIXES, Volume, read_volume, split_image_suffix
from ..inference.pipeline import segment_case, write_segmentation
from ..inference.overlay import overlay_mosaic

FF_TAGS = ("_ff", "_pdff")
NOT_SCANS = re.compile(r"label|mask|seg", re.IGNORECASE)
COLUMNS = ["case", "status", "quality", "quality_reasons", "liver_volume_ml", "ff_median", "ff_mean", "steatosis",
           "model", "model_version",
           "uncertain_voxels", "slices_to_check", "seconds", "source", "ff_map", "input_sha256",
           "segmentation_sha256", "weights_sha256"]


def find_cases(study: Path) -> list[dict]:
    """Scans under ``study`` (sorted), each with a case id and its paired fat-fraction map."""
    study = Path(study)
    cases = []
    for folder in sorted({p.parent for p in study.rglob("*.dcm")}):
        cases.append({"source": folder, "ff": None})
    for path in sorted(study.rglob("*")):
        stem, suffix = split_image_suffix(path.name)
        if (not path.is_file() or suffix in ("", ".seg.nrrd") or NOT_SCANS.search(stem)
                or stem.lower().endswith(FF_TAGS)):
            continue
        ff = next((p for tag in FF_TAGS for sfx in IMAGE_SUFFIXES if (p := path.with_name(stem + tag + sfx)).exists()),
                  None)
        cases.append({"source": path, "ff": ff})
    for case in cases:
        relative = case["source"].relative_to(study)
        stem = split_image_suffix(relative.name)[0] if case["source"].is_file() else relative.as_posix()
        case["case"] = re.sub(r"[^A-Za-z0-9._-]+", "__", str(Path(relative.parent, stem).as_posix())).strip("_")
    return cases


#: segment(volume, ff_map, source, cancel) -> (SegmentationResult, readout): how a case is
#: segmented (locally, or on an inference server); called from several threads at once when
#: cases are kept in flight
SegmentFunction = Callable[[Volume, Optional[Volume], str, threading.Event], tuple]


def local_segment(segmenter) -> SegmentFunction:
    """Segment on this machine with ``segmenter`` (one case at a time)."""

    def segment(volume, ff_map, source, cancel):
        return segment_case(segmenter, volume, ff_map, source=source, cancel=cancel)

    return segment


def run_batch(study: Path, out: Path, segment: SegmentFunction, on_case: Optional[Callable[[dict], None]] = None,
              in_flight: int = 1, on_start: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Segment every case; returns the table rows (also written to ``out/results.csv``).

    Args:
        segment: a :data:`SegmentFunction` (:func:`local_segment`, or the server's
            ``remote.batch_client.RemoteSegment``).
        in_flight: cases worked on at once (reading, segmenting, writing overlap); more than one
            pays when ``segment`` runs elsewhere (an inference server with several workers).
        on_start: called with a case (see :func:`find_cases`) when it starts.
        on_case: called with a case's table row when it ends (both from the calling thread).

    Ctrl-C (KeyboardInterrupt) cancels the cases in flight, keeps what is finished (a re-run
    skips it) and is raised again.
    """
    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1, got {in_flight}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases = find_cases(study)
    rows: list[Optional[dict]] = [None] * len(cases)
    cancel = threading.Event()

    def finished(index: int, row: dict):
        rows[index] = row
        _write_table(out / "results.csv", [r for r in rows if r is not None])  # kept current
        if on_case:
            on_case(row)

    pending = []
    for index, case in enumerate(cases):
        done = out / case["case"] / "row.json"
        if done.exists():
            finished(index, dict(json.loads(done.read_text()), status="done (skipped, already finished)"))
        else:
            pending.append(index)
    with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="liverseg-batch") as pool:
        running = {}
        try:
            while pending or running:
                while pending and len(running) < in_flight:
                    index = pending.pop(0)
                    if on_start:
                        on_start(cases[index])
                    running[pool.submit(_run_case, cases[index], out / cases[index]["case"], segment, cancel)] = index
                finished_now, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished_now:
                    finished(running.pop(future), future.result())
        except KeyboardInterrupt:
            cancel.set()  # the cases in flight stop (a remote one is cancelled on the server)
            wait(running)
            raise
    return [r for r in rows if r is not None]


def _run_case(case: dict, folder: Path, segment, cancel: threading.Event) -> dict:
    t0 = time.perf_counter()
    row = {"case": case["case"], "source": str(case["source"]), "ff_map": str(case["ff"] or "")}
    try:
        volume = read_volume(case["source"])
        ff_map = read_volume(case["ff"], validate=False) if case["ff"] else None
        result, readout = segment(volume, ff_map, str(case["source"]), cancel)
        folder.mkdir(parents=True, exist_ok=True)
        write_segmentation(folder / "segmentation.seg.nrrd", result)
        overlay_mosaic(volume, result.labels, result.classes, folder / "qa.png")
        (folder / "readout.json").write_text(json.dumps(readout, indent=2) + "\n")
        write_audit(folder / "audit.json", readout["audit"])
        ff = readout["fat_fraction"] or {}
        review = readout.get("review", {})
        row.update(
            status="done",
            quality=readout["quality"]["status"],
            quality_reasons="; ".join(readout["quality"]["reasons"]),
            liver_volume_ml=round(readout["volumes_ml"].get("liver", float("nan")), 2),
            ff_median=round(ff["median"], 2) if ff else "",
            ff_mean=round(ff["mean"], 2) if ff else "",
            steatosis=("yes" if ff["steatosis"] else "no") if ff else "",
            model=result.model["name"],
            model_version=result.model["version"],
            uncertain_voxels=review.get("uncertain_voxels_total", ""),
            slices_to_check=";".join(map(str, review.get("slices_to_check", []))),
            seconds=round(time.perf_counter() - t0, 2),
            input_sha256=readout["audit"]["input"]["sha256"],
            segmentation_sha256=readout["audit"]["segmentation_sha256"],
            weights_sha256=result.model["sha256"],
        )
        (folder / "row.json").write_text(json.dumps(row, indent=2) + "\n")  # written last: the case is done
    except CancelledError:
        row.update(status="cancelled (not finished; a re-run does it)", seconds=round(time.perf_counter() - t0, 2))
    except Exception as exc:  # one bad case must not stop a study; its row says why
        kind = "" if isinstance(exc, LiverSegError) else f"{type(exc).__name__}: "
        message = (str(exc).strip().splitlines() or [""])[0]
        row.update(status=f"failed: {kind}{message}", seconds=round(time.perf_counter() - t0, 2))
    return row


def needs_attention(row: dict) -> bool:
    """Flagged by the quality control, or failed."""
    return row.get("quality") == NEEDS_REVIEW or str(row.get("status", "")).startswith("failed")


def _write_table(path: Path, rows: list[dict]):
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda row: not needs_attention(row)))  # stable: study order within
    tmp.replace(path)
