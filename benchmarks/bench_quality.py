"""How well the quality control separates bad segmentations from good ones, on real patients.

    python benchmarks/bench_quality.py [--data ../shared/data] [--json out.json] [--model NAME=FOLDER]

Runs the shipped models as a user does (abdomen-mr-t2 on the 14 CHAOS MR patients, liver-ct on the
8 LiTS patients), scores every structure against the reference (Dice) and prints, per case and
structure, the Dice, the QC measures and the reasons a case is flagged. Summary: how many
structures with Dice < 0.85 are flagged (target: all) and how many cases whose structures all reach
Dice >= 0.93 are flagged (target: at most 10 %). Patients a model was trained on are marked
"train": their predictions are better than a new patient's, so the flag rates there are optimistic;
the summary is given for the patients each model never saw as well. The LiTS images carry no real
voxel size, so the volume checks are left out for them. ``--model abdomen-mr-t2=FOLDER`` runs the
model in FOLDER in place of the shipped one (e.g. a base trained with patients held out, which
gives more unseen patients).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from LiverSegmentationLogic.inference.scoring import BAD_DICE, GOOD_DICE, flag_rates, has_real_spacing, score_case
from LiverSegmentationLogic.inference.segmenter import Segmenter
from LiverSegmentationLogic.io.datasets import CaseFiles
from LiverSegmentationLogic.models.model_files import load_model
from LiverSegmentationLogic.models.tasks import load_task

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RUNS = [("abdomen-mr-t2", "chaos-mr-t2", [1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32]),
        ("liver-ct", "lits-ct", list(range(8)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path, help="write every measure here")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER",
                        help="run the model in FOLDER in place of the shipped NAME (repeatable)")
    args = parser.parse_args()
    stand_ins = dict(item.split("=", 1) for item in args.model)
    unknown = set(stand_ins) - {name for name, _, _ in RUNS}
    if unknown:
        parser.error(f"--model: no run uses {', '.join(sorted(unknown))}")
    rows = []
    for model_name, folder, cases in RUNS:
        model = load_model(stand_ins.get(model_name, model_name))
        segmenter = Segmenter(model, device="cpu")
        reference_values = load_task(model.card["task"]).reference_values()
        validation = {str(c).split("/")[-1] for c in model.card.get("validation", {}).get("validation_cases", [])}
        trained = {str(c).split("/")[-1] for c in model.card.get("training", {}).get("train_cases", [])}
        for case in cases:
            image_path = args.data / folder / f"image_{case}.nii.gz"
            if not image_path.exists():
                print(f"skipped {image_path} (not found)")
                continue
            case_files = CaseFiles(f"{folder}/{case}", (image_path,), args.data / folder / f"label_{case}.nii.gz")
            row = score_case(segmenter, case_files, reference_values,
                             check_volumes=has_real_spacing(case_files.case_id))
            row.update(model=model_name, split="validation" if str(case) in validation else
                       "train" if str(case) in trained else "unseen")
            rows.append(row)
            quality = row["quality"]
            dices = " ".join(f"{n[:6]} {d:.3f}" for n, d in row["dice"].items())
            print(f"{model_name:<14} {row['case']:<16} {row['split']:<10} {dices}  "
                  f"{'NEEDS REVIEW' if quality['status'] != 'ok' else 'ok'} " + "; ".join(quality["reasons"]))
    for title, subset in (("all patients", rows), ("patients the model never trained on",
                                                     [r for r in rows if r["split"] != "train"])):
        rates = flag_rates(subset)
        good = rates[f"cases_all_at_least_{GOOD_DICE}"]
        good_flagged = rates[f"cases_all_at_least_{GOOD_DICE}_flagged"]
        print(f"\n{title} ({len(subset)} cases): structures with Dice < {BAD_DICE}: "
              f"{rates[f'structures_below_{BAD_DICE}']}, flagged {rates[f'structures_below_{BAD_DICE}_flagged']}; "
              f"cases with every structure >= {GOOD_DICE}: {good}, flagged {good_flagged} "
              f"({100 * good_flagged / max(good, 1):.0f} %)")
        for missed in rates["missed"]:
            print(f"  not flagged: {missed}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
