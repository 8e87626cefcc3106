"""Reproduce the shipped lesion models: the liver-lesion-ct cascade and the one-step
liver-lesion-ct-3class, and print how cascade and one-step compare on the held-out patient.

    python scripts/train_ct_models.py --data ../shared/data --models Resources/Models

The cascade's first stage is the shipped liver-ct model in ``--models`` (since 2.0.0 it comes
from ``scripts/cross_validate.py``: its card has the command). The lesion models 1.0.0 were
trained when lits-ct held patients 0-2 (0 and 2 trained, 1 held out, as the task files name it);
lits-ct now holds 0-7, so a re-run trains on more. Runs in a temporary registry so that the
cascade picks up the liver-ct model in ``--models``, not an active one of the user's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--models", type=Path, default=Path("Resources/Models"))
    p.add_argument("--epochs", type=int, default=None, help="default: each task's")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="liverseg-ct-"))
    os.environ["LIVERSEG_HOME"] = str(work / "home")
    os.environ["LIVERSEG_MODELS_DIR"] = str(args.models.resolve())  # the cascade's first stage comes from here

    from LiverSegmentationLogic.training.task_training import train_task
    from LiverSegmentationLogic.models.tasks import load_task

    lits = args.data / "lits-ct"
    results = {}
    for task, datasets in [("liver-lesion-ct", [lits]), ("liver-lesion-ct-3class", [lits])]:
        model = train_task(load_task(task), datasets, output=args.models / task, epochs=args.epochs)
        results[task] = (model.card["validation"], model.card["training"]["wall_time_s"])
    print("\n| model | held-out | liver Dice | lesion Dice | training time |")
    print("|---|---|---|---|---|")
    for task, (v, wall) in results.items():
        dice = v["mean_dice"]
        print(f"| {task} | {', '.join(v['validation_cases'])} | {dice.get('liver', float('nan')):.3f} | "
              f"{dice.get('lesion', float('nan')):.3f} | {wall / 60:.1f} min |")


if __name__ == "__main__":
    main()
