"""Signals that might flag a confidently wrong structure, measured on patients a model never saw.

    python benchmarks/bench_qc_signals.py [--model abdomen-mr-t2 ...] [--data ../shared/data]

For each model (name or folder) and each CHAOS MR patient outside its training set, per structure:
Dice against the reference, the share of its voxels the network was unsure of (what the quality
control checks), that count per voxel of the structure's surface (the share grows for small
organs; uncertain voxels lie along the surface), for an ensemble the Dice between its members'
own segmentations (members that disagree would point at an error), and the Dice between the
segmentation and those of the same image under a gamma of 0.7 and of 1.4 (the lower: an answer
that moves when the contrast does would point at an error; two more passes of the network; the
quality control's contrast check, ``inference/contrast_check.py``).
Cross-validation folds are models too: ``--model cv/mr/fold0 cv/mr/fold1 ...`` scores each fold
model on the patients it never saw. The summary gives each
signal's range over the structures with 0.5 <= Dice < 0.85 (wrong but whole: what the quality
control should flag and its volume and shape checks miss) and over those with Dice >= 0.90: a
signal that separates them has ranges that do not overlap.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
from scipy import ndimage

from LiverSegmentationLogic.inference.segmenter import Segmenter
from LiverSegmentationLogic.io.volumes import read_volume
from LiverSegmentationLogic.models.model_files import load_model
from LiverSegmentationLogic.models.tasks import load_task
from LiverSegmentationLogic.readouts.metrics import dice

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PATIENTS = [1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32]
LOST, BAD, GOOD = 0.5, 0.85, 0.90


def surface_voxels(mask: np.ndarray) -> int:
    return int(mask.sum() - ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1)).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["abdomen-mr-t2"], help="model names or folders")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    rows = []
    print("model | patient | structure | Dice | uncertain share | uncertain per surface voxel | members' Dice | "
          "Dice with itself under gamma")
    for ref in args.model:
        model = load_model(ref)
        segmenter = Segmenter(model, device="cpu", contrast_check=True)
        members = []
        for member in getattr(model.network, "members", []):
            alone = copy.copy(model)
            alone.network = member
            members.append(Segmenter(alone, device="cpu", contrast_check=False))
        reference_values = load_task(model.card["task"]).reference_values()
        trained = {c.split("/")[-1] for c in model.card["training"]["train_cases"]}
        for patient in [p for p in PATIENTS if str(p) not in trained]:
            image_path = args.data / "chaos-mr-t2" / f"image_{patient}.nii.gz"
            if not image_path.exists():
                print(f"skipped {image_path} (not found)")
                continue
            image = read_volume(image_path)
            truth = np.rint(read_volume(args.data / "chaos-mr-t2" / f"label_{patient}.nii.gz", validate=False).array)
            result = segmenter.segment(image)
            member_labels = [m.segment(image).labels for m in members]
            for c in result.classes:
                mask = result.labels == c["label"]
                uncertain = int(result.uncertain_by_label[c["label"]])
                row = {"model": model.name_version, "patient": patient, "name": c["name"],
                       "dice": dice(mask, np.isin(truth, list(reference_values[c["name"]]))),
                       "share": uncertain / max(int(mask.sum()), 1),
                       "per_surface": uncertain / max(surface_voxels(mask), 1),
                       "members": dice(member_labels[0] == c["label"], member_labels[1] == c["label"])
                       if len(member_labels) == 2 else None,
                       "gamma": result.contrast_agreement.get(c["label"], 1.0)}
                rows.append(row)
                agree = f"{row['members']:.3f}" if row["members"] is not None else "-"
                print(f"{row['model']} | {patient} | {row['name']} | {row['dice']:.3f} | {row['share']:.3f} | "
                      f"{row['per_surface']:.2f} | {agree} | {row['gamma']:.3f}", flush=True)
    print()
    for signal in ("share", "per_surface", "members", "gamma"):
        for title, chosen in ((f"Dice {LOST}-{BAD}", [r for r in rows if LOST <= r["dice"] < BAD]),
                              (f"Dice >= {GOOD}", [r for r in rows if r["dice"] >= GOOD])):
            values = [r[signal] for r in chosen if r[signal] is not None]
            span = f"{min(values):.3f}-{max(values):.3f}" if values else "-"
            print(f"{signal:<12} {title:<12} {len(values):>3} structures: {span}")


if __name__ == "__main__":
    main()
