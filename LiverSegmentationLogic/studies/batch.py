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
import time
from pathlib import Path
from typing import Callable, Optional

from ..readouts.audit import write_audit
from ..readouts.quality import NEEDS_REVIEW
from ..errors import LiverSegError
from ..inference.guidance import slices_to_check
from ..io.volumes import IMAGE_SUFFIXES, read_volume, split_image_suffix
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


def run_batch(study: Path, out: Path, segmenter, on_case: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Segment every case; returns the table rows (also written to ``out/results.csv``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in find_cases(study):
        folder = out / case["case"]
        done = folder / "row.json"
        if done.exists():
            row = dict(json.loads(done.read_text()), status="done (skipped, already finished)")
        else:
            row = _run_case(case, folder, segmenter)
        rows.append(row)
        _write_table(out / "results.csv", rows)  # kept current, so an interrupted batch keeps its table
        if on_case:
            on_case(row)
    return rows


def _run_case(case: dict, folder: Path, segmenter) -> dict:
    t0 = time.perf_counter()
    row = {"case": case["case"], "source": str(case["source"]), "ff_map": str(case["ff"] or "")}
    try:
        volume = read_volume(case["source"])
        ff_map = read_volume(case["ff"], validate=False) if case["ff"] else None
        result, readout = segment_case(segmenter, volume, ff_map, source=str(case["source"]))
        folder.mkdir(parents=True, exist_ok=True)
        write_segmentation(folder / "segmentation.seg.nrrd", result)
        overlay_mosaic(volume, result.labels, result.classes, folder / "qa.png")
        (folder / "readout.json").write_text(json.dumps(readout, indent=2) + "\n")
        write_audit(folder / "audit.json", readout["audit"])
        ff = readout["fat_fraction"] or {}
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
            uncertain_voxels=int(result.slice_uncertainty.sum()),
            slices_to_check=";".join(map(str, slices_to_check(result.slice_uncertainty))),
            seconds=round(time.perf_counter() - t0, 2),
            input_sha256=readout["audit"]["input"]["sha256"],
            segmentation_sha256=readout["audit"]["segmentation_sha256"],
            weights_sha256=result.model["sha256"],
        )
        (folder / "row.json").write_text(json.dumps(row, indent=2) + "\n")  # written last: the case is done
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
