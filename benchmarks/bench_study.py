"""An operator's study from a new domain, one case at a time, with and without the adaptation loop.

    python benchmarks/bench_study.py [--every 2] [--budget 300] [--cases 0 1 2 3 4 5 6 7] [--study BENCH]

The MR liver model (liver-mr-t2) meets the LiTS CT patients in the given order. Each suggestion is
"corrected" to the reference liver: the effort is the number of voxels changed and of axial slices
touched. The corrected case goes into the study's queue, and after every ``--every`` cases the
study's model line is fine-tuned (``finetune --study``, MR replay cases and the MR validation gate,
``--budget`` seconds of training). Without the loop every case gets the base model's suggestion.
Prints the effort per case with and without the loop, the cumulative effort, and the wall time of
each fine-tune. Target (issue 18): from the third case on, at most half of the no-loop effort;
each fine-tune <= 5 min on 2 CPU cores. Runs in a registry of its own (nothing active changes).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def effort(suggestion: np.ndarray, reference: np.ndarray) -> tuple[int, int]:
    """(voxels the operator changes, axial slices they touch) to turn the suggestion into the reference."""
    changed = suggestion != reference
    return int(changed.sum()), int(np.any(changed, axis=(1, 2)).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cases", nargs="+", default=[str(i) for i in range(8)], help="LiTS patients, in order")
    parser.add_argument("--every", type=int, default=2, help="fine-tune after every k cases")
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds per fine-tune")
    parser.add_argument("--study", default="BENCH")
    args = parser.parse_args()
    os.environ["LIVERSEG_HOME"] = tempfile.mkdtemp(prefix="liverseg-bench-study-")  # a registry of its own

    from LiverSegmentationLogic.inference.segmenter import Segmenter
    from LiverSegmentationLogic.io.volumes import read_volume
    from LiverSegmentationLogic.models.model_files import load_model
    from LiverSegmentationLogic.studies.case_queue import CaseQueue
    from LiverSegmentationLogic.training.finetuning import finetune

    queue = CaseQueue(Path(os.environ["LIVERSEG_HOME"]) / "queue", labels={"liver": 1}, modality="CT")
    base = Segmenter(load_model("liver-mr-t2"), device="cpu")
    rows, tunes = [], []
    for index, case in enumerate(args.cases):
        image = read_volume(args.data / "lits-ct" / f"image_{case}.nii.gz")
        reference = (np.rint(read_volume(args.data / "lits-ct" / f"label_{case}.nii.gz", validate=False).array)
                     >= 1).astype(np.uint8)  # the liver, lesions included
        current = Segmenter(load_model("liver-mr-t2", study=args.study), device="cpu")
        loop = (current.segment(image).labels == 1).astype(np.uint8)
        plain = (base.segment(image).labels == 1).astype(np.uint8)
        rows.append((case, current.model.card["version"], effort(plain, reference), effort(loop, reference)))
        print(f"case lits-ct/{case}: model {rows[-1][1]}; effort without loop {rows[-1][2]}, with loop {rows[-1][3]}",
              flush=True)
        queue.add(image, reference, {"study": args.study, "source": f"lits-ct/{case}"})
        if (index + 1) % args.every == 0 and index + 1 < len(args.cases):
            t0 = time.perf_counter()
            result = finetune("liver-mr-t2", queue.folder, replay=args.data / "chaos-mr-t2", study=args.study,
                              time_budget_s=args.budget, device="cpu", log=lambda line: None)
            tunes.append((index + 1, time.perf_counter() - t0, result.promoted, result.reason))
            print(f"fine-tune after {index + 1} cases: {tunes[-1][1]:.0f}s, "
                  f"{'promoted' if result.promoted else 'not promoted'}: {result.reason}", flush=True)

    print("\n| case | model used | voxels changed, no loop | with loop | slices touched, no loop | with loop | "
          "cumulative voxels, no loop | with loop |\n|---|---|---|---|---|---|---|---|")
    total_plain = total_loop = 0
    for case, version, (pv, ps), (lv, ls) in rows:
        total_plain, total_loop = total_plain + pv, total_loop + lv
        print(f"| lits-ct/{case} | {version} | {pv} | {lv} | {ps} | {ls} | {total_plain} | {total_loop} |")
    later = rows[2:]
    if later:
        ratio = sum(r[3][0] for r in later) / max(1, sum(r[2][0] for r in later))
        print(f"\nfrom the third case on: {100 * ratio:.0f} % of the no-loop effort in voxels (target <= 50 %)")
    for after, seconds, promoted, reason in tunes:
        print(f"fine-tune after {after} cases: {seconds / 60:.1f} min, "
              f"{'promoted' if promoted else 'not promoted'} ({reason})")


if __name__ == "__main__":
    main()
