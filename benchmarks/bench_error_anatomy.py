"""Where a model's errors lie, on patients it never saw: thin outlines, organ ends, or whole regions.

    python benchmarks/bench_error_anatomy.py --work cv/mr [--classes liver spleen]

For each fold model of a cross-validation work folder (``scripts/cross_validate.py``) and each
patient it held out, per class: the Dice; how the wrong voxels (false positives and false
negatives) divide between the organ's end slices (the first and last slice of the reference and
the slice beyond each), the middle slices within 1 voxel of the reference's outline in-plane,
within 2 voxels, and farther (and how much of that farther share is false positive: extra organ,
not missed organ); the Dice that would result if errors within 2 voxels of the outline were
forgiven; the Dice without the reference slices that repeat the slice before them (labels
resampled by nearest neighbour from thicker slices, as in 12 of the 14 CHAOS MR references); and
the ceiling the model grid itself sets: the reference taken to the task's grid (area average of its
one-hot map) and back (bilinear, argmax), scored against itself.

An error that is mostly within a voxel or two of the outline asks for a finer grid or sharper
features; one mostly farther away is a region the network called wrongly, which asks for more or
more varied training data. The summary gives the mean and the lowest value of each column.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from LiverSegmentationLogic.inference.preprocessing import model_grid_size
from LiverSegmentationLogic.inference.segmenter import Segmenter
from LiverSegmentationLogic.io.datasets import find_all_cases
from LiverSegmentationLogic.io.volumes import read_volume
from LiverSegmentationLogic.models.model_files import load_model
from LiverSegmentationLogic.models.tasks import load_task
from LiverSegmentationLogic.readouts.metrics import dice

FORGIVEN_VOXELS = 2
COLUMNS = ["Dice", "end slices", "<= 1 voxel", "2 voxels", "farther", "farther, extra", "Dice forgiving 2 voxels",
           "Dice without repeated slices", "grid ceiling"]


def outline_distance(truth: np.ndarray) -> np.ndarray:
    """Per slice, each voxel's in-plane distance (voxels) from the reference outline; inf on slices
    without the class."""
    distance = np.full(truth.shape, np.inf)
    for z in np.flatnonzero(truth.reshape(len(truth), -1).any(1)):
        inside = truth[z]
        distance[z] = np.where(inside, ndimage.distance_transform_edt(inside), ndimage.distance_transform_edt(~inside))
    return distance


def repeated_slices(reference: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Slices holding the class whose whole reference labelmap equals the slice before."""
    repeated = np.zeros(len(reference), bool)
    for z in range(1, len(reference)):
        repeated[z] = truth[z].any() and np.array_equal(reference[z], reference[z - 1])
    return repeated


def grid_ceiling(truth: np.ndarray, spacing_zyx, config) -> float:
    """Dice of the reference with itself after a round trip through the model grid."""
    size = model_grid_size(truth.shape, spacing_zyx, config)
    mask = torch.from_numpy(truth.astype(np.float32))[:, None]
    soft = torch.cat([1 - mask, mask], 1)
    down = F.interpolate(soft, size=size, mode="bilinear", antialias=True, align_corners=False)
    back = F.interpolate(down, size=truth.shape[1:], mode="bilinear", align_corners=False).argmax(1).numpy()
    return dice(back.astype(bool), truth)


def error_anatomy(predicted: np.ndarray, truth: np.ndarray, reference: np.ndarray, spacing_zyx, config) -> list:
    """One row of :data:`COLUMNS` (shares in percent of the wrong voxels)."""
    wrong = predicted ^ truth
    slices = np.flatnonzero(truth.reshape(len(truth), -1).any(1))
    ends = np.zeros(len(truth), bool)
    ends[[max(slices[0] - 1, 0), slices[0], slices[-1], min(slices[-1] + 1, len(truth) - 1)]] = True
    distance = outline_distance(truth)
    middle = wrong & ~ends[:, None, None]
    near, second = middle & (distance <= 1.5), middle & (distance > 1.5) & (distance <= 2.5)
    far = middle & (distance > 2.5)
    total = max(int(wrong.sum()), 1)
    both = 2 * int((predicted & truth).sum())
    forgiven = both / max(both + int((wrong & (distance > FORGIVEN_VOXELS + 0.5)).sum()), 1)
    kept = ~repeated_slices(reference, truth)
    return [dice(predicted, truth), *(100 * int(m.sum()) / total for m in (wrong & ends[:, None, None], near, second,
                                                                              far, far & predicted)),
            forgiven, dice(predicted[kept], truth[kept]), grid_ceiling(truth, spacing_zyx, config)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="a cross-validation work folder")
    parser.add_argument("--classes", nargs="*", help="class names (default: all of the task's)")
    args = parser.parse_args()
    plan = json.loads((args.work / "plan.json").read_text())
    task = load_task(plan["task"])
    reference_values = task.reference_values()
    cases = {c.case_id: c for c in find_all_cases([Path(d) for d in plan["data"]], len(task.channels))}
    rows = {}
    print("patient | class | " + " | ".join(COLUMNS))
    for fold, held_out in enumerate(plan["folds"]):
        folder = args.work / f"fold{fold}"
        if not (folder / "model.pt").exists():
            print(f"skipped {folder} (no model)")
            continue
        model = load_model(folder)
        segmenter = Segmenter(model, device="cpu", contrast_check=False)
        for case_id in held_out:
            case = cases[case_id]
            images = [read_volume(p) for p in case.images]
            reference = np.rint(read_volume(case.label, validate=False).array)
            result = segmenter.segment(images)
            spacing_zyx = images[0].geometry.spacing[::-1]
            for c in result.classes:
                if args.classes and c["name"] not in args.classes:
                    continue
                truth = np.isin(reference, list(reference_values[c["name"]]))
                if not truth.any():
                    continue
                row = error_anatomy(result.labels == c["label"], truth, reference, spacing_zyx, model.preprocess)
                rows.setdefault(c["name"], []).append(row)
                print(f"{case_id} | {c['name']} | " + " | ".join(_cell(i, v) for i, v in enumerate(row)), flush=True)
    print()
    for name, values in rows.items():
        table = np.array(values)
        print(f"{name}, {len(table)} patients: mean | " + " | ".join(_cell(i, v) for i, v in enumerate(table.mean(0))))
        print(f"{name}, {len(table)} patients: lowest | " + " | ".join(_cell(i, v) for i, v in enumerate(table.min(0))))


def _cell(column: int, value: float) -> str:
    return f"{value:.0f} %" if 1 <= column <= 5 else f"{value:.3f}"


if __name__ == "__main__":
    main()
