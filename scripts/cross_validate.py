r"""Patient-wise k-fold cross-validation of a task's recipe, and the shipped model from it.

Four steps, so that the training can run on a machine that has neither the data nor SimpleITK
(a GPU machine), and resume there after an interruption:

    # here: the folds and the prepared cases (model grid, float16) in one file
    python scripts/cross_validate.py prepare --task abdomen-mr-t2 --data ../shared/data/chaos-mr-t2 \
        --folds 5 --work cv/mr
    # (CT: --task liver-ct --data ../shared/data/lits-ct ../shared/data/chaos-ct-1; the CHAOS CT
    # DICOM case is converted into the work folder)
    # anywhere (carry cv/mr): each fold's model, and the members trained on every case; folds
    # run in parallel processes (--jobs), each checkpointed after every epoch (re-run to resume)
    python scripts/cross_validate.py train --work cv/mr --folds-to-train all --members 2 \
        --epochs 250 --device cuda --jobs 7
    # here: every patient segmented by the fold model that never saw it (full pipeline, input
    # grid): Dice per class, volumes, Bland-Altman, the quality control's flags (while folds are
    # still training: an interim estimate over the folds that have a model, which ship refuses;
    # a fold whose model and first stage are unchanged since the last evaluation is not segmented
    # again; --again after a change to the pipeline, scoring or quality control code)
    python scripts/cross_validate.py evaluate --work cv/mr
    # (optional) two recipes' models averaged, e.g. the same task trained 40 and 60 epochs in two
    # work folders of the same folds: each fold's models as one ensemble, and all the members
    python scripts/cross_validate.py combine --works cv/lesion-40 cv/lesion-60 --work cv/lesion-both
    # here: the members trained on every case, as one ensemble, with the cross-validated record
    python scripts/cross_validate.py ship --work cv/mr --version 3.0.0 --models Resources/Models \
        --views liver-mr-t2

The cross-validated figures describe the recipe (the same training on k - 1 folds); the shipped
members are trained the same way on every patient, so no labelled patient is wasted (nnU-Net's
"all" fold). ``evaluate`` prints the issue-17 targets next to what was reached.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from LiverSegmentationLogic import __version__
from LiverSegmentationLogic.io.datasets import find_all_cases, k_folds
from LiverSegmentationLogic.models.model_files import LoadedModel, load_model
from LiverSegmentationLogic.models.tasks import load_task
from LiverSegmentationLogic.training.trainer import (
    TRAINING_PRECISIONS,
    hardware_description,
    read_prepared_cases,
    write_prepared_cases,
)

ALL = "all"  # the members trained on every case


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    s = sub.add_parser("prepare", help="assign folds and write the prepared cases")
    s.add_argument("--task", required=True)
    s.add_argument("--data", type=Path, nargs="+", required=True, help="dataset folders")
    s.add_argument("--folds", type=int, default=5)
    s.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    s.add_argument("--work", type=Path, required=True)
    s = sub.add_parser("train", help="train fold models (and the members for shipping); resumable")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--folds-to-train", nargs="+", default=[ALL],
                   help="fold numbers (0-based), 'members', or 'all': every fold and the members (default)")
    s.add_argument("--members", type=int, default=2, help="members trained on every case (seeds 0..n-1)")
    s.add_argument("--epochs", type=int, default=250)
    s.add_argument("--time-budget", type=float, default=float("inf"), help="seconds per model")
    s.add_argument("--device", default="auto")
    s.add_argument("--precision", choices=TRAINING_PRECISIONS, default="fp32",
                   help="bf16: the forward pass under bf16 autocast, faster on CPUs with bf16 in hardware "
                        "(see benchmarks/bench_training.py); a model resumes only in the precision it started in")
    s.add_argument("--jobs", type=int, default=1, help="models trained at once, each in its own process")
    s.add_argument("--fold-seed", type=int, default=0,
                   help="training seed of the fold models: the same recipe trained again with another seed "
                        "(in another work folder) measures how much a seed alone moves the estimate")
    s.add_argument("--one", help=argparse.SUPPRESS)  # internal: train this one model ('fold3', 'member1')
    s = sub.add_parser("evaluate", help="segment every patient with the fold model that never saw it")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--device", default="cpu")
    s.add_argument("--first-stage", type=Path,
                   help="a cascade's: the work folder of its first stage's cross-validation over the same folds, "
                        "so that neither stage saw the patient it segments (default: the registry's model)")
    s.add_argument("--contrast-check", choices=["task", "on", "off"], default="task",
                   help="the quality control's contrast check (two more passes a case): as the task says, or "
                        "on/off to measure it on a task that leaves it off/on")
    s.add_argument("--again", action="store_true",
                   help="segment every patient again, also those whose fold model (and first stage) are unchanged "
                        "since the last evaluation: after a change to the pipeline, the scoring or the quality "
                        "control, which the reuse cannot see")
    s = sub.add_parser("combine", help="average the fold models and gather the members of several work folders")
    s.add_argument("--works", type=Path, nargs="+", required=True,
                   help="trained work folders of the same task, data and folds")
    s.add_argument("--work", type=Path, required=True, help="the new work folder (evaluate and ship it)")
    s = sub.add_parser("ship", help="write the members' ensemble with the cross-validated record")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--version", required=True)
    s.add_argument("--models", type=Path, default=Path("Resources/Models"))
    s.add_argument("--views", nargs="*", default=[],
                   help="other tasks served by the same network (e.g. liver-mr-t2 for abdomen-mr-t2)")
    args = p.parse_args(argv)
    {"prepare": prepare, "train": train, "combine": combine, "evaluate": evaluate, "ship": ship}[args.step](args)


# ----------------------------------------------------------------------------- prepare
def prepare(args):
    from LiverSegmentationLogic.training.task_training import load_task_cases

    task = load_task(args.task)
    args.work.mkdir(parents=True, exist_ok=True)
    data = dataset_folders(args.data, args.work)
    cases = find_all_cases(data, len(task.channels))
    folds = k_folds(cases, args.folds, args.seed)
    t0 = time.perf_counter()
    loaded = load_task_cases(task, cases)
    write_prepared_cases(args.work / "cases.npz", loaded)
    plan = {"task": task.name, "data": [str(Path(d).resolve()) for d in data], "seed": args.seed,
            "folds": [[c.case_id for c in fold] for fold in folds],
            "sources": [str(d) for d in args.data]}  # as given, for the shipped card's command
    (args.work / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")
    print(f"{len(cases)} cases in {len(folds)} folds, prepared in {time.perf_counter() - t0:.0f}s: {args.work}")


def dataset_folders(data: list[Path], work: Path) -> list[Path]:
    """The dataset folders as ``find_cases`` reads them: a CHAOS CT case as published (a DICOM
    series ``DICOM_anon`` and the liver PNGs ``Ground``) is converted into ``work/chaos-ct`` first,
    where ``evaluate`` later finds it (case ``chaos-ct/1``)."""
    from LiverSegmentationLogic.io.datasets import convert_chaos_ct

    folders = []
    for folder in map(Path, data):
        if (folder / "DICOM_anon").is_dir() and (folder / "Ground").is_dir():
            folder = convert_chaos_ct(folder, work / "chaos-ct").images[0].parent
        folders.append(folder)
    return folders


def _plan(work: Path) -> dict:
    return json.loads((work / "plan.json").read_text())


# ----------------------------------------------------------------------------- train
def train(args):
    plan = _plan(args.work)
    if plan.get("combined_from"):  # its members are copies, numbered apart from their seeds
        raise SystemExit(f"{args.work} was combined from {', '.join(c['work'] for c in plan['combined_from'])}: "
                         "train those, then combine them again")
    if args.one:
        return _train_one(args, plan, args.one)
    folds, members = [f"fold{f}" for f in range(len(plan["folds"]))], [f"member{m}" for m in range(args.members)]
    names = []
    for token in args.folds_to_train:
        names += {ALL: folds + members, "members": members}.get(token) or [f"fold{int(token)}"]
    names = [n for n in names if not _finished(args.work / n, args.epochs)]
    jobs = max(1, min(args.jobs, len(names)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    running: list[tuple[str, subprocess.Popen]] = []
    failed = []
    while names or running:
        while names and len(running) < jobs:
            name = names.pop(0)
            command = [sys.executable, __file__, "train", "--work", str(args.work), "--one", name,
                       "--epochs", str(args.epochs), "--time-budget", str(args.time_budget),
                       "--device", args.device, "--members", str(args.members), "--precision", args.precision,
                       "--fold-seed", str(args.fold_seed)]
            log = open(args.work / f"{name}.log", "a")
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")  # the log shows each epoch
            running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)))
            print(f"training {name} (log: {args.work / (name + '.log')})", flush=True)
        time.sleep(1.0)
        for name, process in list(running):
            if process.poll() is not None:
                running.remove((name, process))
                if process.returncode:
                    failed.append(name)
                print(f"{name}: {'failed' if process.returncode else 'done'}", flush=True)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (see their logs; a re-run resumes them)")


def _training_record(folder: Path) -> dict:
    """The ``training`` record of a model folder's card; empty where there is no readable card yet."""
    try:
        return dict(json.loads((folder / "model_card.json").read_text())["training"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _finished(folder: Path, epochs: int) -> bool:
    """Trained for every epoch before (a model cut short by --time-budget resumes)."""
    record = _training_record(folder)
    return "epochs_run" in record and record["epochs_run"] >= epochs


def _fold_seed(work: Path) -> int:
    """The training seed a work folder's fold models were trained with (``train --fold-seed``)."""
    return int(_training_record(work / "fold0").get("seed", 0))


def _train_one(args, plan: dict, name: str):
    """One model: ``fold<f>`` on every case outside fold f (seed ``--fold-seed``), ``member<m>`` on
    every case (seed m)."""
    from LiverSegmentationLogic.training.task_training import new_network, train_config, write_model
    from LiverSegmentationLogic.training.trainer import train_network

    task = load_task(plan["task"])
    cases = read_prepared_cases(args.work / "cases.npz")
    if name.startswith("fold"):
        held, seed = set(plan["folds"][int(name[4:])]), args.fold_seed
    else:
        held, seed = set(), int(name[6:])
    chosen = [c for c in cases if c.name not in held]
    folder = args.work / name
    folder.mkdir(exist_ok=True)
    config = train_config(task, chosen, args.epochs, args.time_budget, seed, args.device, args.precision)
    network = new_network(task, seed)
    t0 = time.perf_counter()
    losses = train_network(network, chosen, task.preprocess_config(), config, checkpoint=folder / "checkpoint.pt")
    card = dict(task.card(), version=f"cv-{name}", created=_now(), tool_version=__version__, training={
        "train_cases": [c.name for c in chosen], "epochs_run": len(losses), "final_loss": losses[-1],
        "seed": seed, "wall_time_s_last_run": round(time.perf_counter() - t0, 1),
        "hardware": hardware_description(args.device), "precision": config.describe_precision(),
        "optimiser": config.describe_optimiser(), "loss": config.describe_loss(),
        "augmentation": config.augmentation.describe(),
    })
    write_model(folder, task, network, card)


def _fold_model(folder: Path, task, first_stage: Optional[Path]) -> LoadedModel:
    """A fold model; a cascade's second stage is given its first stage anew (``first_stage``, or
    the registry's ``roi_task`` model), so that what is evaluated is what was asked for, also for a
    model that came without one (the weights and card a GPU call brings back)."""
    from LiverSegmentationLogic.training.task_training import write_model

    model = load_model(folder)
    if task.cascade:
        model = write_model(folder, task, model.network, model.card, first_stage)
    return model


def _first_stages(args, plan: dict, task) -> tuple[list, dict]:
    """Per fold, the first stage a cascade is evaluated behind (None: the registry's), and what
    the record says about it."""
    if not task.cascade:
        return [None] * len(plan["folds"]), {}
    if args.first_stage is None:
        from LiverSegmentationLogic.training.task_training import first_stage_folder

        roi = load_model(first_stage_folder(task))
        return [None] * len(plan["folds"]), {"first_stage": (
            f"first stage: {roi.name_version}, the same for every fold (trained on these patients too; its "
            "own cross-validated figures are in its card)")}
    other = _plan(args.first_stage)
    if [sorted(f) for f in other["folds"]] != [sorted(f) for f in plan["folds"]]:
        raise SystemExit(f"{args.first_stage} holds other folds than {args.work}: prepare both with the same "
                         "datasets, --folds and --seed")
    return ([args.first_stage / f"fold{f}" for f in range(len(plan["folds"]))],
            {"first_stage": f"first stage: the {other['task']} fold model that never saw the patient either",
             "first_stage_task": other["task"]})


# ----------------------------------------------------------------------------- combine
def combine(args):
    """A recipe that averages others: each fold's models (one per work folder, all trained without
    that fold's patients) as one ensemble, and every work folder's members as the members to ship."""
    import shutil

    from LiverSegmentationLogic.models.network import UNetEnsemble
    from LiverSegmentationLogic.training.task_training import write_model

    if len(args.works) < 2:
        raise SystemExit("combine needs at least two work folders")
    plans = [_plan(w) for w in args.works]
    for w, plan in zip(args.works[1:], plans[1:]):
        if (plan["task"], plan["data"], plan["folds"]) != (plans[0]["task"], plans[0]["data"], plans[0]["folds"]):
            raise SystemExit(f"{w} holds another task, data or folds than {args.works[0]}: prepare both the same way")
    task = load_task(plans[0]["task"])
    members = {w: sorted(w.glob("member*/model_card.json")) for w in args.works}
    sources = []
    for w in args.works:
        folds = [w / f"fold{f}" for f in range(len(plans[0]["folds"]))]
        if not members[w] or not all((f / "model_card.json").is_file() for f in folds):
            raise SystemExit(f"{w}: train every fold and at least one member first")
        epochs = max(json.loads(card.read_text())["training"]["epochs_run"] for card in members[w])
        sources.append({"work": str(w), "members": len(members[w]), "epochs": epochs, "fold_seed": _fold_seed(w)})
    args.work.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.works[0] / "cases.npz", args.work / "cases.npz")
    (args.work / "plan.json").write_text(json.dumps(dict(plans[0], combined_from=sources), indent=1) + "\n")
    for f in range(len(plans[0]["folds"])):
        models = [load_model(w / f"fold{f}") for w in args.works]
        networks = [n for m in models for n in (m.network.members if isinstance(m.network, UNetEnsemble)
                                                 else [m.network])]
        training = dict(models[0].card["training"], epochs_run=[m.card["training"]["epochs_run"] for m in models],
                        combined_from=[str(m.folder) for m in models])
        roi = models[0].folder / "roi"
        write_model(args.work / f"fold{f}", task, UNetEnsemble(networks), dict(models[0].card, training=training),
                    roi if task.cascade and roi.is_dir() else None)
    gathered = [card.parent for w in args.works for card in members[w]]
    for n, member in enumerate(gathered):
        target = args.work / f"member{n}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(member, target, ignore=shutil.ignore_patterns("checkpoint.pt"))
    print(f"{args.work}: {len(plans[0]['folds'])} folds of {len(args.works)} models each, {len(gathered)} members")


# ----------------------------------------------------------------------------- evaluate
def evaluate(args):
    """Every patient through the full pipeline by the fold model that never saw it."""
    from LiverSegmentationLogic.inference.scoring import has_real_spacing, score_case, summarise
    from LiverSegmentationLogic.inference.contrast_check import contrast_check_enabled
    from LiverSegmentationLogic.inference.segmenter import Segmenter

    plan = _plan(args.work)
    task = load_task(plan["task"])
    contrast_check = {"on": True, "off": False}.get(args.contrast_check, contrast_check_enabled(task.card()))
    reference_values = task.reference_values()
    files = {c.case_id: c for c in find_all_cases(plan["data"], len(task.channels))}
    # an interim estimate while folds are still training (they take hours each on a CPU): the
    # folds with a model only, and the results say so (ship refuses them)
    trained = [f for f in range(len(plan["folds"])) if (args.work / f"fold{f}" / "model_card.json").is_file()]
    if not trained:
        raise SystemExit(f"no fold model in {args.work} yet: run train first")
    missing = sorted(set(range(len(plan["folds"]))) - set(trained))
    if missing:
        print(f"INTERIM: fold(s) {', '.join(map(str, missing))} not trained yet; evaluating folds "
              f"{', '.join(map(str, trained))} only")
    first_stages, first_stage_record = _first_stages(args, plan, task)
    previous = [] if args.again else _previous_rows(args.work)
    rows, epochs = [], {}
    for f in trained:
        held = plan["folds"][f]
        model = _fold_model(args.work / f"fold{f}", task, first_stages[f])
        epochs[f] = model.card["training"]["epochs_run"]
        key = _model_key(model.folder) + ("+contrast-check" if contrast_check else "")
        reused = [r for r in previous if r.get("fold") == f and r.get("model_key") == key]
        if sorted(r["case"] for r in reused) == sorted(held):
            rows += reused
            print(f"fold {f}: model unchanged since the last evaluation, its patients' rows reused "
                  "(--again after a change to the code)", flush=True)
            continue
        segmenter = Segmenter(model, device=args.device, contrast_check=contrast_check)
        for case_id in held:
            row = score_case(segmenter, files[case_id], reference_values, check_volumes=has_real_spacing(case_id))
            rows.append(dict(row, fold=f, model_key=key))
            print(f"{case_id:<16} fold {f}  " + "  ".join(f"{n[:7]} {d:.3f}" for n, d in row["dice"].items())
                  + f"  {row['quality']['status']}", flush=True)
    summary = summarise(rows)
    summary.update(folds_evaluated=trained, folds_missing=missing, epochs_run=epochs, **first_stage_record)
    (args.work / "cv_results.json").write_text(json.dumps({"cases": rows, "summary": summary}, indent=1) + "\n")
    _print_summary(summary)


def _model_key(folder: Path) -> str:
    """What a row was segmented by: the model's card (which holds its weights' sha256 and every
    setting) and, for a cascade, its first stage's."""
    import hashlib

    cards = [folder / "model_card.json", folder / "roi" / "model_card.json"]
    return hashlib.sha256(b"".join(c.read_bytes() for c in cards if c.is_file())).hexdigest()


def _previous_rows(work: Path) -> list[dict]:
    """The last evaluation's rows (a fold CPU-trained for hours is evaluated once, not after
    every other fold); none where there is no readable one."""
    try:
        return json.loads((work / "cv_results.json").read_text())["cases"]
    except (OSError, ValueError, KeyError):
        return []


def _print_summary(summary: dict):
    for name, record in summary["per_class"].items():
        line = f"{name:<14} Dice mean {record['mean_dice']:.3f}, min {record['min_dice']:.3f}"
        if record.get("mean_dice_over_1ml") is not None:
            line += (f" (over the {record['patients_over_1ml']} patients with more than 1 mL: mean "
                     f"{record['mean_dice_over_1ml']:.3f}, min {record['min_dice_over_1ml']:.3f})")
        if "bland_altman_percent" in record:
            ba = record["bland_altman_percent"]
            worst = max(record["volume_error_percent"], key=abs)
            line += (f"; volume bias {ba['bias']:+.1f} % (95 % limits {ba['loa_lower']:+.1f} to "
                     f"{ba['loa_upper']:+.1f}), worst patient {worst:+.1f} %")
        print(line)
    q = summary["quality"]
    print(f"quality control: {q['structures_below_0.85_flagged']} of {q['structures_below_0.85']} structures with "
          f"Dice < 0.85 flagged (target: all); {q['cases_all_at_least_0.93_flagged']} of "
          f"{q['cases_all_at_least_0.93']} cases with every structure >= 0.93 flagged (target: <= 10 %)")
    for missed in q["missed"]:
        print(f"  not flagged: {missed}")
    print("epochs run per fold: " + ", ".join(f"{f}: {n}" for f, n in summary["epochs_run"].items()))
    if "first_stage" in summary:
        print(summary["first_stage"])
    if summary["folds_missing"]:
        print(f"INTERIM estimate: fold(s) {summary['folds_missing']} not evaluated")


# ----------------------------------------------------------------------------- ship
def ship(args):
    from LiverSegmentationLogic.inference.scoring import validation_record
    from LiverSegmentationLogic.models.network import UNetEnsemble
    from LiverSegmentationLogic.training.task_training import DATA_NOTE, write_model

    plan = _plan(args.work)
    results = json.loads((args.work / "cv_results.json").read_text())
    if results["summary"].get("folds_missing"):
        raise SystemExit(f"cv_results.json is interim (fold(s) {results['summary']['folds_missing']} were not "
                         "evaluated): train every fold, then evaluate again")
    members = sorted(args.work.glob("member*/model_card.json"))
    if not members:
        raise SystemExit(f"no members in {args.work}: run train first")
    models = [load_model(card.parent) for card in members]
    network = models[0].network if len(models) == 1 else UNetEnsemble([m.network for m in models])
    first = models[0].card["training"]
    trainings = [m.card["training"] for m in models]
    combined = plan.get("combined_from")  # a recipe that averages others' (combine): each has its own steps
    # (plans combined before --fold-seed existed have no "fold_seed": their folds were trained with 0)
    recipes = ([(f"WORK_{i + 1}", c["members"], c["epochs"], c.get("fold_seed", 0)) for i, c in enumerate(combined)]
               if combined else [("WORK", len(models), first["epochs_run"], _fold_seed(args.work))])
    if len(models) == 1:
        ensemble = f"one network trained on every case (seed {first['seed']})"
    else:
        each = ("; ".join(f"seed {t['seed']}, {t['epochs_run']} epochs" for t in trainings) if combined
                else "seeds " + ", ".join(str(t["seed"]) for t in trainings))
        ensemble = f"mean probability of {len(models)} networks trained on every case ({each})"
    sources = " ".join(plan.get("sources", plan["data"]))
    bf16 = all(t.get("precision", "fp32").startswith("bf16") for t in trainings)
    precision = " --precision bf16" if bf16 else ""
    first_stage_task = results["summary"].get("first_stage_task")  # its own card has its commands
    training = {
        "data": sorted({DATA_NOTE.get(Path(d).name, Path(d).name) for d in plan["data"]}), "split": "patient-wise",
        "train_cases": sorted({c for m in models for c in m.card["training"]["train_cases"]}),
        "ensemble": ensemble,
        "members": [{k: t[k] for k in ("seed", "epochs_run", "final_loss", "hardware", "precision",
                                       "wall_time_s_last_run") if k in t} for t in trainings],
        "optimiser": first["optimiser"],
        "loss": first.get("loss", "Dice + cross-entropy (MONAI DiceCELoss)"),  # older member cards lack it
        **({"augmentation": first["augmentation"]} if "augmentation" in first else {}),
        "reproduce": [
            *(f"python scripts/cross_validate.py prepare --task {plan['task']} --data {sources} "
              f"--folds {len(plan['folds'])} --seed {plan['seed']} --work {work}" for work, *_ in recipes),
            *(f"python scripts/cross_validate.py train --work {work} --members {n} --epochs {epochs}{precision}"
              + (f" --fold-seed {fold_seed}" if fold_seed else "") for work, n, epochs, fold_seed in recipes),
            *([f"python scripts/cross_validate.py combine --works {' '.join(w for w, *_ in recipes)} --work WORK"]
              if combined else []),
            "python scripts/cross_validate.py evaluate --work WORK"
            + (f" --first-stage {first_stage_task.upper().replace('-', '_')}_WORK" if first_stage_task else ""),
            f"python scripts/cross_validate.py ship --work WORK --version {args.version}"
            + (f" --views {' '.join(args.views)}" if args.views else ""),
        ],
    }
    for name in [plan["task"], *args.views]:
        task = load_task(name)
        names = list(task.reference_values())  # a cascade's first-stage class included
        validation = validation_record(
            results["cases"], results["summary"], names,
            f"{len(plan['folds'])}-fold patient-wise cross-validation of the same recipe: each patient segmented "
            "by the fold model that never saw it; the shipped members are trained on every patient"
            + (f"; {results['summary']['first_stage']}" if "first_stage" in results["summary"] else ""))
        validation["regression_cases"] = regression_cases(task, [r["case"] for r in results["cases"]])
        trained = {k: v for k, v in models[0].card.items() if k != "quality"}  # a view's task decides its own
        card = {**trained, **task.card(), "version": args.version, "created": _now(),
                "tool_version": __version__, "training": dict(training, label_map=task.spec["label_map"]),
                "validation": validation}
        write_model(args.models / name, task, network, card)
        print(f"wrote {args.models / name}")


def regression_cases(task, cases: list[str]) -> list[str]:
    """The cases fine-tuning checks a new version on for a regression (the base model's data
    replayed); the rest of that data is the pool it replays from. Every patient was a validation
    case of the cross-validation, so the task's named validation patients stand for them."""
    from LiverSegmentationLogic.io.datasets import CaseFiles, select_cases

    named = [str(v) for v in task.training_option("validation_cases", [])]
    return [c.case_id for c in select_cases([CaseFiles(c, (), Path()) for c in cases], named)]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


if __name__ == "__main__":
    main()
