"""An operator's study from a new domain, one case at a time, with and without the adaptation loop.

    python benchmarks/bench_study.py [--every 2] [--budget 300] [--cases lits-ct/0 ... chaos-ct/1]
                                     [--model liver-mr-t2] [--study BENCH]
                                     [--learning-rate 5e-4] [--replay-cases N] [--compare FOLDER]

The MR liver model (``--model``) meets a study from a new domain one case at a time, in the given
order: by default the 8 LiTS CT patients, then the CHAOS CT case (raw Hounsfield units, another
scanner). Each suggestion is "corrected" to the reference liver: the effort is the number of
voxels changed and of axial slices touched. The corrected case goes into the study's queue, and
after every ``--every`` cases the study's model line is fine-tuned (``finetune --study``, MR replay
cases and the MR validation gate, ``--budget`` seconds for the whole fine-tune). Without the loop
every case gets the base model's suggestion. Prints the effort per case with and without the
loop, the cumulative effort, and the wall time of each fine-tune. Target (issue 18): from the
third case on, at most half of the no-loop effort; each fine-tune <= 5 min on 2 CPU cores. Runs in
a registry of its own (nothing active changes). Cases are ``lits-ct/N``, ``chaos-ct/1`` or
``chaos-mr-t2/N``. Fine-tunes replay only the base model's own training and validation patients
(from its card), never a patient of the study.

An MR order needs a base model that never saw those patients (``--model`` takes a model folder,
which then stands in for the bundled model of its name):

    python scripts/train_default_model.py --hold-out 15 5 10 13 20 --epochs 150 --device cpu \
        --version 2.0.0-study-base --models runs/mr-study-base --checkpoint runs/mr-study-base.ckpt
    python benchmarks/bench_study.py --model runs/mr-study-base/liver-mr-t2 \
        --cases chaos-mr-t2/15 chaos-mr-t2/5 chaos-mr-t2/10 chaos-mr-t2/13 chaos-mr-t2/20

``--compare FOLDER`` adds another model's effort on each case, e.g. a cross-validation fold model
trained in full on more patients of the domain: what retraining, rather than a 5-minute
fine-tune, would give. Cases that model trained on are marked and left out of its ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def effort(spent: dict) -> tuple[int, int]:
    """(voxels the operator changes, axial slices they touch) from a correction's effort record
    (``audit.correction_effort``, also part of every review record)."""
    return spent["changed_voxels"], len(spent["slices_touched"])


def stand_in_for_bundled(folder: Path, bundled: Path) -> str:
    """Make a model folder the bundled model of its name (``LIVERSEG_MODELS_DIR``), so that study
    lines branch from it; returns that name."""
    name = json.loads((folder / "model_card.json").read_text())["name"]
    bundled.mkdir(parents=True)
    (bundled / name).symlink_to(folder.resolve(), target_is_directory=True)
    os.environ["LIVERSEG_MODELS_DIR"] = str(bundled)
    return name


def own_patients(card: dict, dataset: Path, replay: Path) -> Path:
    """A dataset folder holding only the patients the model trained or was validated on (links):
    a fine-tune must not replay a patient of the study it adapts to."""
    own = {case.split("/")[-1] for case in card["training"]["train_cases"]}
    own |= {case.split("/")[-1] for case in card.get("validation", {}).get("validation_cases", [])}
    replay.mkdir(parents=True)
    for patient in sorted(own):
        for kind in ("image", "label"):
            (replay / f"{kind}_{patient}.nii.gz").symlink_to((dataset / f"{kind}_{patient}.nii.gz").resolve())
    return replay


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cases", nargs="+", default=[f"lits-ct/{i}" for i in range(8)] + ["chaos-ct/1"],
                        help="dataset/patient, in order")
    parser.add_argument("--model", default="liver-mr-t2", help="the model the study starts from (name or folder)")
    parser.add_argument("--every", type=int, default=2, help="fine-tune after every k cases")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds per fine-tune, all steps included")
    parser.add_argument("--study", default="BENCH")
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="the fine-tunes' learning rate")
    parser.add_argument("--replay-cases", type=int, default=None,
                        help="replay cases per fine-tune (default: finetune's, as many as queued, at least 2)")
    parser.add_argument("--compare", type=Path, help="a model folder whose effort is shown beside (not in the loop)")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="liverseg-bench-study-"))
    os.environ["LIVERSEG_HOME"] = str(home)  # a registry of its own
    if (Path(args.model) / "model_card.json").is_file():  # a folder: the bundled model of its name
        args.model = stand_in_for_bundled(Path(args.model), home / "bundled")

    from LiverSegmentationLogic.inference.segmenter import Segmenter
    from LiverSegmentationLogic.io.datasets import convert_chaos_ct
    from LiverSegmentationLogic.io.volumes import read_volume
    from LiverSegmentationLogic.models.model_files import load_model
    from LiverSegmentationLogic.readouts.audit import correction_effort, review_record
    from LiverSegmentationLogic.studies.case_queue import CaseQueue
    from LiverSegmentationLogic.training.finetuning import finetune

    def case_paths(case: str) -> tuple[Path, Path]:
        dataset, patient = case.split("/")
        if dataset == "chaos-ct":  # a DICOM series + PNG ground truth: converted once
            converted = convert_chaos_ct(args.data / "chaos-ct-1", home / "chaos-ct", patient)
            return converted.images[0], converted.label
        return args.data / dataset / f"image_{patient}.nii.gz", args.data / dataset / f"label_{patient}.nii.gz"

    base = Segmenter(load_model(args.model), device="cpu")
    other = Segmenter(load_model(args.compare), device="cpu") if args.compare else None
    other_seen = set(other.model.card["training"]["train_cases"]) if other else set()
    compared = []  # that model's effort per case; None where it trained on the case
    replay = own_patients(base.model.card, args.data / "chaos-mr-t2", home / "replay" / "chaos-mr-t2")
    modality = base.model.card.get("modality", "")
    queue = CaseQueue(home / "queue", labels={"liver": 1}, modality="CT" if "ct" in args.cases[0] else modality)
    rows, tunes = [], []
    for index, case in enumerate(args.cases):
        image_path, label_path = case_paths(case)
        image = read_volume(image_path)
        values = np.rint(read_volume(label_path, validate=False).array)
        # LiTS: 1 liver, 2 lesion, and the liver includes its lesions; CHAOS: 1 liver (MR: then other organs)
        reference = (values >= 1 if case.startswith("lits-ct") else values == 1).astype(np.uint8)
        current = Segmenter(load_model(args.model, study=args.study), device="cpu")
        suggestion = current.segment(image)
        loop = (suggestion.labels == 1).astype(np.uint8)
        plain = (base.segment(image).labels == 1).astype(np.uint8)
        # queued as the panel exports it: with the suggestion's audit, its Dice against the correction
        # and the correction's effort
        review = review_record(loop, reference, image.geometry, [{"name": "liver", "label": 1}])
        rows.append((case, current.model.card["version"], effort(correction_effort(plain, reference)), effort(review)))
        print(f"case {case}: model {rows[-1][1]}; effort without loop {rows[-1][2]}, with loop {rows[-1][3]}",
              flush=True)
        if other is not None:
            seen = case in other_seen
            compared.append(None if seen else effort(correction_effort(
                (other.segment(image).labels == 1).astype(np.uint8), reference)))
            print(f"case {case}: {args.compare}: " + ("trained on it" if seen else f"effort {compared[-1]}"),
                  flush=True)
        queue.add(image, reference, {"study": args.study, "source": case,
                                     "suggestion_audit": {"model": suggestion.model}, **review})
        if (index + 1) % args.every == 0 and index + 1 < len(args.cases):
            t0 = time.perf_counter()
            result = finetune(args.model, queue.folder, replay=replay, replay_cases=args.replay_cases,
                              learning_rate=args.learning_rate, study=args.study, time_budget_s=args.budget,
                              device="cpu", log=lambda line: None)
            times = result.report["time_s"]
            tunes.append((index + 1, time.perf_counter() - t0, times["training"], len(result.report["evaluated_cases"]),
                          result.promoted, result.reason))
            print(f"fine-tune after {index + 1} cases: {tunes[-1][1]:.0f}s ({times['preparation']:.0f}s preparation, "
                  f"{times['training']:.0f}s training, {times['validation']:.0f}s gate, "
                  f"{tunes[-1][1] - times['total']:.0f}s writing), "
                  f"{'promoted' if result.promoted else 'not promoted'}: {result.reason}", flush=True)

    print("\n| case | model used | voxels changed, no loop | with loop | slices touched, no loop | with loop | "
          "cumulative voxels, no loop | with loop |\n|---|---|---|---|---|---|---|---|")
    total_plain = total_loop = 0
    for case, version, (pv, ps), (lv, ls) in rows:
        total_plain, total_loop = total_plain + pv, total_loop + lv
        print(f"| {case} | {version} | {pv:,} | {lv:,} | {ps} | {ls} | {total_plain:,} | {total_loop:,} |")
    later = rows[2:]
    if later:
        ratio = sum(r[3][0] for r in later) / max(1, sum(r[2][0] for r in later))
        print(f"\nfrom the third case on: {100 * ratio:.0f} % of the no-loop effort in voxels (target <= 50 %)")
    if other is not None:
        print(f"\n| case | voxels changed, no loop | with {args.compare} | slices touched, no loop | with it |\n"
              "|---|---|---|---|---|")
        for (case, _, (pv, ps), _), spent in zip(rows, compared):
            cells = "trained on it | | " if spent is None else f"{spent[0]:,} | {ps} | {spent[1]}"
            print(f"| {case} | {pv:,} | {cells} |")
        kept = [(r[2][0], c[0]) for r, c in zip(rows[2:], compared[2:]) if c is not None]
        if kept:
            print(f"from the third case on, over the {len(kept)} it never saw: "
                  f"{100 * sum(o for _, o in kept) / max(1, sum(p for p, _ in kept)):.0f} % of the no-loop effort")
    print("\n| fine-tune after | wall time | of it training | queued cases the gate measured | promoted |\n"
          "|---|---|---|---|---|")
    for after, seconds, training, measured, promoted, reason in tunes:
        print(f"| {after} cases | {seconds / 60:.1f} min | {training:.0f} s | {measured} of {after} | "
              f"{'yes' if promoted else 'no'}: {reason} |")


if __name__ == "__main__":
    main()
