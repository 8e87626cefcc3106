r"""Reproduce the shipped default models, trained on CHAOS MR T2-SPIR with a patient-wise split.

    python scripts/train_default_model.py --data ../shared/data/chaos-mr-t2 --models Resources/Models

One network learns liver, right kidney, left kidney and spleen (telling the liver from its
neighbours is what it has to learn). It is written twice:
- ``liver-mr-t2`` (the default): outputs the liver only;
- ``abdomen-mr-t2``: outputs all four organs.
Trains on 11 patients, validates on 3 held-out patients with the full inference pipeline (Dice on
the input grid) and writes weights + model cards.

Version 2.0.0 was made with this script: an ensemble of two networks trained apart (seeds 3 and 4)
on a GPU machine that had neither the data nor SimpleITK, in three steps (3.0.0 and later come from
``scripts/cross_validate.py``, which also trains on the 3 patients held out here; their cards have
the commands):

    python scripts/train_default_model.py --cache cases.npz --cache-only             # here
    python scripts/train_default_model.py --cache cases.npz --device cuda --seed 3 \
        --epochs 258 --skip-validation --models members/3                           # there (and seed 4)
    python scripts/train_default_model.py --validate members/3/liver-mr-t2 \
        members/4/liver-mr-t2 --version 2.0.0                                        # here

``--validate`` with several trained models ships their ensemble (mean of the probabilities).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path


from LiverSegmentationLogic import __version__
from LiverSegmentationLogic.io.datasets import find_cases, select_cases
from LiverSegmentationLogic.models.model_files import LoadedModel, load_model, save_model
from LiverSegmentationLogic.models.network import UNet2D, UNetEnsemble
from LiverSegmentationLogic.models.preprocess_config import PreprocessConfig
from LiverSegmentationLogic.models.tasks import load_task
from LiverSegmentationLogic.training.trainer import (
    TrainConfig,
    evaluate_cases,
    hardware_description,
    load_case,
    read_prepared_cases,
    train_network,
    write_prepared_cases,
)

VALIDATION = [2, 21, 31]  # held out; patient 21 is also the bundled demo sample
LABEL_MAP = {1: 1, 2: 2, 3: 3, 4: 4}  # CHAOS: 1 liver, 2 right kidney, 3 left kidney, 4 spleen


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/chaos-mr-t2"))
    p.add_argument("--models", type=Path, default=Path("Resources/Models"))
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--time-budget", type=float, default=float("inf"), help="seconds")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--spacing", type=float, default=2.0, help="in-plane model grid, mm")
    p.add_argument("--width", type=int, default=16, help="channels of the first U-Net level")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--hold-out", nargs="+", default=[], metavar="PATIENT",
                   help="patients kept out of training besides the validation ones (e.g. a study that "
                        "benchmarks/bench_study.py replays with a model that never saw it)")
    p.add_argument("--init", type=Path, default=None, help="start from this model folder's weights")
    p.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate)
    p.add_argument("--note", default=None, help="written into the cards as 'notes' (e.g. how members were chosen)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")
    p.add_argument("--cache", type=Path, default=None,
                   help="prepared training cases (.npz): written if absent, read instead of the data if present")
    p.add_argument("--cache-only", action="store_true", help="write --cache and stop")
    p.add_argument("--skip-validation", action="store_true",
                   help="write the models without validating them (no data here); see --validate")
    p.add_argument("--validate", type=Path, nargs="+", default=None, metavar="MODEL",
                   help="do not train: validate this model (several: their ensemble) and write both cards")
    args = p.parse_args()

    tasks = {name: load_task(name) for name in ("liver-mr-t2", "abdomen-mr-t2")}  # one network, two views
    config = tasks["liver-mr-t2"].preprocess_config()
    if args.spacing != config.spacing_xy[0]:
        config = PreprocessConfig.from_dict(dict(config.to_dict(), spacing_xy=[args.spacing, args.spacing]))
    if args.validate:
        trained = [load_model(folder) for folder in args.validate]
        network, card = trained[0].network, dict(trained[0].card, version=args.version)
        training = trained[0].card["training"]
        if len(trained) > 1:
            network, training = UNetEnsemble([m.network for m in trained]), _ensemble_record(trained)
        for name, task in tasks.items():
            _validate_and_save(args, name, task, network, card, training)
        return
    if args.cache is not None and args.cache.exists():
        loaded = read_prepared_cases(args.cache)
        print(f"read {len(loaded)} prepared training cases from {args.cache}")
    else:
        t0 = time.perf_counter()
        loaded = [load_case(c.images, c.label, config, LABEL_MAP, name=c.case_id)
                  for c in _train_cases(args.data, args.hold_out)]
        print(f"loaded {len(loaded)} training cases in {time.perf_counter() - t0:.1f}s")
        if args.cache is not None:
            write_prepared_cases(args.cache, loaded)
            print(f"wrote {args.cache}")
    if args.cache_only:
        return
    network = UNet2D(in_channels=config.in_channels, n_classes=5, width=args.width, depth=4, dropout=0.1)
    init = None
    if args.init is not None:  # continue training a shipped model (warm restart of the schedule)
        init = load_model(args.init)
        network.load_state_dict(init.network.state_dict())
    train = TrainConfig(epochs=args.epochs, time_budget_s=args.time_budget, learning_rate=args.learning_rate,
                        seed=args.seed, device=args.device)
    t0 = time.perf_counter()
    losses = train_network(network, loaded, config, train, checkpoint=args.checkpoint)
    training = _training_record([c.name for c in loaded], train, losses, time.perf_counter() - t0,
                                init and init.name_version)
    for name, task in tasks.items():
        card = dict(task.card(), version=args.version, preprocessing=config.to_dict())
        if args.skip_validation:
            card.update(training=training, validation={"pending": "run --validate on this model"})
            save_model(args.models / name, network, _dated(card))
            print(f"wrote {args.models / name} (not validated)")
        else:
            _validate_and_save(args, name, task, network, card, training)


def _ensemble_record(members) -> dict:
    """One training record for networks trained apart on the same cases: what they share once,
    what differs (seed, epochs, loss, hardware) per member."""
    shared = ("data", "split", "train_cases", "label_map", "loss", "optimiser", "augmentation")
    records = [m.card["training"] for m in members]
    if any(r["train_cases"] != records[0]["train_cases"] for r in records):
        raise SystemExit("ensemble members were trained on different cases")
    return {
        **{k: records[0][k] for k in shared if k in records[0]},
        "ensemble": f"mean probability of {len(records)} networks trained apart (other seeds)",
        "members": [{k: v for k, v in r.items() if k not in shared} for r in records],
    }


def _train_cases(data: Path, hold_out=()):
    cases = find_cases(data)
    missing = [n for n in hold_out if not select_cases(cases, [str(n)])]
    if missing:
        raise SystemExit(f"--hold-out: no patient {', '.join(map(str, missing))} in {data}")
    return [c for c in cases if c not in select_cases(cases, [str(n) for n in [*VALIDATION, *hold_out]])]


def _validate_and_save(args, name, task, network, card, training):
    """Validate on the held-out patients with the full pipeline and write weights + card."""
    cases = find_cases(args.data)
    validation_cases = select_cases(cases, [str(n) for n in VALIDATION])
    card = dict(card, **{k: v for k, v in task.card().items() if k not in ("version", "preprocessing")})
    model = LoadedModel(network, dict(card, sha256=""), args.models / name)
    validation = evaluate_cases(model, validation_cases, task.reference_values())
    print(name, json.dumps(validation, indent=2))
    if args.note:
        card["notes"] = args.note
    card.update(
        training=training,
        validation={
            "metric": "Dice on the input grid after the full pipeline (postprocessing included)",
            "validation_cases": [c.case_id for c in validation_cases],
            **validation,
        },
    )
    save_model(args.models / name, network, _dated(card))
    print(f"wrote {args.models / name}")


def _dated(card: dict) -> dict:
    return dict(card, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                tool_version=__version__)


def _training_record(train_cases, train, losses, train_s, initialised_from) -> dict:
    return {
        "data": "CHAOS MR T2-SPIR (Kavur et al., Medical Image Analysis 69, 2021, "
        "doi:10.1016/j.media.2020.101950; CC BY-SA 4.0), preprocessed release of shenqq377/Q-Net",
        "split": "patient-wise",
        "train_cases": list(train_cases),
        "label_map": {str(k): v for k, v in LABEL_MAP.items()},
        "epochs_run": len(losses),
        "initialised_from": initialised_from,
        "final_loss": losses[-1],
        "loss": train.describe_loss(),
        "optimiser": train.describe_optimiser(),
        "augmentation": train.augmentation.describe(),
        "seed": train.seed,
        "wall_time_s": round(train_s, 1),
        "hardware": hardware_description(train.device),
    }


if __name__ == "__main__":
    main()
