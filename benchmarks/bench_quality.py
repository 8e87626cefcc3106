"""How well the quality control separates bad segmentations from good ones, on real patients.

    python benchmarks/bench_quality.py [--data ../shared/data] [--json out.json]

Runs the shipped models as a user does (abdomen-mr-t2 on the 14 CHAOS MR patients, liver-ct on the
8 LiTS patients), scores every structure against the reference (Dice) and prints, per case and
structure, the Dice, the QC measures and the reasons a case is flagged. Summary: how many
structures with Dice < 0.85 are flagged (target: all) and how many cases whose structures all reach
Dice >= 0.93 are flagged (target: at most 10 %). Patients a model was trained on are marked
"train": their predictions are better than a new patient's, so the flag rates there are optimistic;
the summary is given for the patients each model never saw as well. The LiTS images carry no real
voxel size, so the volume checks are left out for them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from LiverSegmentationLogic.inference.pipeline import segment_case
from LiverSegmentationLogic.inference.segmenter import Segmenter
from LiverSegmentationLogic.io.volumes import read_volume
from LiverSegmentationLogic.models.model_files import load_model
from LiverSegmentationLogic.models.tasks import load_task
from LiverSegmentationLogic.readouts.metrics import dice
from LiverSegmentationLogic.readouts.quality import quality_check

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RUNS = [("abdomen-mr-t2", "chaos-mr-t2", [1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32]),
        ("liver-ct", "lits-ct", list(range(8)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path, help="write every measure here")
    args = parser.parse_args()
    rows = []
    for model_name, folder, cases in RUNS:
        model = load_model(model_name)
        segmenter = Segmenter(model, device="cpu")
        reference_values = load_task(model.card["task"]).reference_values()
        validation = {str(c).split("/")[-1] for c in model.card.get("validation", {}).get("validation_cases", [])}
        trained = {str(c).split("/")[-1] for c in model.card.get("training", {}).get("train_cases", [])}
        for case in cases:
            image_path = args.data / folder / f"image_{case}.nii.gz"
            if not image_path.exists():
                print(f"skipped {image_path} (not found)")
                continue
            reference = np.rint(read_volume(args.data / folder / f"label_{case}.nii.gz", validate=False).array)
            result, readout = segment_case(segmenter, read_volume(image_path))
            quality = quality_check(result.labels, result.geometry, result.classes, result.uncertain_by_label,
                                    check_volumes=folder != "lits-ct")
            scores = {c["name"]: dice(result.labels == c["label"], np.isin(reference, reference_values[c["name"]]))
                      for c in result.classes}
            rows.append({"model": model_name, "case": f"{folder}/{case}",
                         "split": "validation" if str(case) in validation else "train" if str(case) in trained
                         else "unseen",
                         "dice": scores, "quality": quality})
            flagged = "NEEDS REVIEW" if quality["status"] != "ok" else "ok"
            dices = " ".join(f"{n[:6]} {d:.3f}" for n, d in scores.items())
            print(f"{model_name:<14} {folder}/{case:<4} {rows[-1]['split']:<10} {dices}  {flagged} "
                  + "; ".join(quality["reasons"]))
    for title, subset in (("all patients", rows), ("patients the model never trained on",
                                                     [r for r in rows if r["split"] != "train"])):
        bad = [(r, n) for r in subset for n, d in r["dice"].items() if d < 0.85]
        bad_flagged = [(r, n) for r, n in bad if r["quality"]["status"] != "ok"]
        good = [r for r in subset if min(r["dice"].values()) >= 0.93]
        good_flagged = [r for r in good if r["quality"]["status"] != "ok"]
        share = len(good_flagged) / len(good) if good else 0.0
        print(f"\n{title} ({len(subset)} cases): structures with Dice < 0.85: {len(bad)}, flagged "
              f"{len(bad_flagged)}; cases with every structure >= 0.93: {len(good)}, flagged {len(good_flagged)} "
              f"({100 * share:.0f} %)")
        for r, n in bad:
            print(f"  {r['case']} {n} Dice {r['dice'][n]:.3f} -> {r['quality']['status']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
