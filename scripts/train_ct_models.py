"""Reproduce the shipped one-step liver + lesion model, liver-lesion-ct-3class, and print its
score on the held-out patient.

    python scripts/train_ct_models.py --data ../shared/data --models Resources/Models

``liver-ct`` and the ``liver-lesion-ct`` cascade come from ``scripts/cross_validate.py``
(since their 2.0.0): their cards have the commands. liver-lesion-ct-3class 1.0.0 was
trained when lits-ct held patients 0-2 (0 and 2 trained, 1 held out, as the task file names it);
lits-ct now holds 0-7, so a re-run trains on more. Runs in a temporary registry, so that nothing
of the user's is activated.
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
    p.add_argument("--epochs", type=int, default=None, help="default: the task's")
    args = p.parse_args()
    os.environ["LIVERSEG_HOME"] = tempfile.mkdtemp(prefix="liverseg-ct-")

    from LiverSegmentationLogic.training.task_training import train_task
    from LiverSegmentationLogic.models.tasks import load_task

    task = "liver-lesion-ct-3class"
    model = train_task(load_task(task), [args.data / "lits-ct"], output=args.models / task, epochs=args.epochs)
    v, wall = model.card["validation"], model.card["training"]["wall_time_s"]
    print("\n| model | held-out | liver Dice | lesion Dice | training time |")
    print("|---|---|---|---|---|")
    print(f"| {task} | {', '.join(v['validation_cases'])} | {v['mean_dice']['liver']:.3f} | "
          f"{v['mean_dice']['lesion']:.3f} | {wall / 60:.1f} min |")


if __name__ == "__main__":
    main()
