"""Adaptation to a new domain through the fine-tuning queue (MR model -> CT), like the seed
report's Table 2.

    python benchmarks/bench_adaptation.py [--data ../shared/data] [--time-budget 300]

The shipped liver model (trained on CHAOS MR T2) is scored on four CT cases (lits-ct 0, 1, 2 and
the CHAOS CT case). Then CT cases go into a queue one at a time, as an operator would export
corrected cases, and ``finetune`` runs on the active model each time (MR replay cases mixed in,
promotion checked on the MR validation patients). Dice is measured on the CT cases not in the
queue. Uses a temporary registry: the user's is not touched.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--order", nargs="+", default=["lits-ct/2", "chaos-ct/1"], help="CT cases queued, in order")
    p.add_argument("--time-budget", type=float, default=300.0, help="fine-tuning seconds per step")
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args()
    for sub in ("lits-ct", "chaos-ct-1", "chaos-mr-t2"):
        if not (args.data / sub).exists():
            sys.exit(f"data not found: {args.data / sub} (give --data)")
    work = Path(tempfile.mkdtemp(prefix="liverseg-adapt-"))
    os.environ["LIVERSEG_HOME"] = str(work / "home")  # before the registry is first read

    from LiverSegmentationLogic.studies.case_queue import CaseQueue
    from LiverSegmentationLogic.models.catalog import find_model
    from LiverSegmentationLogic.io.datasets import convert_chaos_ct, find_cases
    from LiverSegmentationLogic.training.finetuning import finetune
    from LiverSegmentationLogic.io.volumes import read_volume
    from LiverSegmentationLogic.models.model_files import load_model
    from LiverSegmentationLogic.training.trainer import evaluate_cases

    ct = find_cases(args.data / "lits-ct") + [convert_chaos_ct(args.data / "chaos-ct-1", work / "chaos-ct")]
    by_id = {c.case_id: c for c in ct}
    reference = {"liver": [1, 2]}  # lits: 1 liver, 2 lesion (part of the liver); CHAOS: 1 liver
    queue = CaseQueue(work / "queue", modality="CT")

    def scores(model, cases):
        return evaluate_cases(model, cases, reference)["per_case_dice"]

    rows = []
    base = load_model("liver-mr-t2")
    base_scores = scores(base, ct)
    rows.append(("MR model, no CT case", "-", base_scores, None, ""))
    for step, case_id in enumerate(args.order, start=1):
        case = by_id[case_id]
        label = (np.rint(read_volume(case.label, validate=False).array) > 0).astype(np.uint8)
        queue.add(read_volume(case.images[0]), label, {"study": "ct", "source": case_id})
        t0 = time.perf_counter()
        result = finetune("liver-mr-t2", work / "queue", replay=args.data / "chaos-mr-t2",
                          epochs=args.epochs, time_budget_s=args.time_budget, log=lambda m: None)
        wall = time.perf_counter() - t0
        queued = set(args.order[:step])
        rows.append((f"+ {step} CT case(s) ({', '.join(args.order[:step])})", f"{wall / 60:.1f} min",
                     scores(result.model, [c for c in ct if c.case_id not in queued]), result.promoted,
                     result.reason))
        print(f"step {step}: {result.model.name_version} {'promoted' if result.promoted else 'refused'}: "
              f"{result.reason}", flush=True)
    active = find_model("liver-mr-t2")
    mr = active.card.get("validation", {}).get("mean_dice", {}).get("liver")

    ids = [c.case_id for c in ct]
    print("\n| model | fine-tuning wall time | " + " | ".join(ids) + " | mean Dice on CT cases not queued | promoted |")
    print("|---|---|" + "---|" * len(ids) + "---|---|")
    for name, wall, per_case, promoted, _ in rows:
        cells = [f"{per_case[i]['liver']:.3f}" if i in per_case else "(queued)" for i in ids]
        mean = np.mean([v["liver"] for v in per_case.values()])
        flag = "-" if promoted is None else ("yes" if promoted else "no")
        print(f"| {name} | {wall} | " + " | ".join(cells) + f" | {mean:.3f} | {flag} |")
    base_mr = base.card.get("validation", {}).get("mean_dice", {}).get("liver")
    print(f"\nactive model at the end: {active.ref}; its liver Dice on the MR validation patients: "
          f"{mr if mr is None else round(mr, 3)} (base {base.name_version}: "
          f"{base_mr if base_mr is None else round(base_mr, 3)})")
    print(f"fine-tuning: {args.epochs} epochs at most, {args.time_budget:.0f} s budget per step, "
          f"queued cases + MR replay cases; work folder {work}")


if __name__ == "__main__":
    main()
