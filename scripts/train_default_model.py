"""Reproduce the shipped default models, trained on CHAOS MR T2-SPIR with a patient-wise split.

    python scripts/train_default_model.py --data ../shared/data/chaos-mr-t2 --models Resources/Models

One network learns liver, right kidney, left kidney and spleen (telling the liver from its
neighbours is what it has to learn). It is written twice:
- ``liver-mr-t2`` (the default): outputs the liver only;
- ``abdomen-mr-t2``: outputs all four organs.
Trains on 11 patients, validates on 3 held-out patients with the full inference pipeline (Dice on
the input grid) and writes weights + model cards.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from LiverSegmentationLogic import __version__
from LiverSegmentationLogic.datasets import find_cases, select_cases
from LiverSegmentationLogic.models import LoadedModel, load_model, save_model
from LiverSegmentationLogic.network import UNet2D
from LiverSegmentationLogic.preprocessing import PreprocessConfig
from LiverSegmentationLogic.tasks import load_task
from LiverSegmentationLogic.training import TrainConfig, evaluate_cases, load_case, train_network

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
    p.add_argument("--init", type=Path, default=None, help="start from this model folder's weights")
    p.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate)
    args = p.parse_args()

    tasks = {name: load_task(name) for name in ("liver-mr-t2", "abdomen-mr-t2")}  # one network, two views
    config = tasks["liver-mr-t2"].preprocess_config()
    if args.spacing != config.spacing_xy[0]:
        config = PreprocessConfig.from_dict(dict(config.to_dict(), spacing_xy=[args.spacing, args.spacing]))
    cases = find_cases(args.data)
    train_cases = [c for c in cases if c not in select_cases(cases, [str(n) for n in VALIDATION])]
    validation_cases = select_cases(cases, [str(n) for n in VALIDATION])
    t0 = time.perf_counter()
    loaded = [load_case(c.images, c.label, config, LABEL_MAP, name=c.case_id) for c in train_cases]
    print(f"loaded {len(loaded)} training cases in {time.perf_counter() - t0:.1f}s")
    network = UNet2D(in_channels=config.in_channels, n_classes=5, width=16, depth=4, dropout=0.1)
    init = None
    if args.init is not None:  # continue training a shipped model (warm restart of the schedule)
        init = load_model(args.init)
        network.load_state_dict(init.network.state_dict())
    train = TrainConfig(epochs=args.epochs, time_budget_s=args.time_budget, learning_rate=args.learning_rate)
    cards = {name: dict(task.card(), version=args.version, preprocessing=config.to_dict())
             for name, task in tasks.items()}
    for card in cards.values():
        card["initialised_from"] = init and init.name_version
    t0 = time.perf_counter()
    losses = train_network(network, loaded, config, train, checkpoint=args.checkpoint)
    train_s = time.perf_counter() - t0

    for name, card in cards.items():
        model = LoadedModel(network, dict(card, sha256=""), args.models / name)
        validation = evaluate_cases(model, validation_cases, tasks[name].reference_values())
        print(name, json.dumps(validation, indent=2))
        _finish_card(card, validation, train_cases, validation_cases, train, losses, train_s)
        save_model(args.models / name, network, card)
        print(f"wrote {args.models / name}")


def _finish_card(card, validation, train_cases, validation_cases, train, losses, train_s):
    card.update(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        tool_version=__version__,
        training={
            "data": "CHAOS MR T2-SPIR (Kavur et al., Medical Image Analysis 69, 2021, "
            "doi:10.1016/j.media.2020.101950; CC BY-SA 4.0), preprocessed release of shenqq377/Q-Net",
            "split": "patient-wise",
            "train_cases": [c.case_id for c in train_cases],
            "label_map": {str(k): v for k, v in LABEL_MAP.items()},
            "epochs_run": len(losses),
            "initialised_from": card.pop("initialised_from", None),
            "final_loss": losses[-1],
            "loss": "Dice + cross-entropy (MONAI DiceCELoss)",
            "optimiser": f"AdamW lr {train.learning_rate}, cosine schedule, batch {train.batch_size}",
            "augmentation": "rotation +-10 deg, scale 0.9-1.1, shift, elastic, gamma, contrast, noise",
            "seed": train.seed,
            "wall_time_s": round(train_s, 1),
            "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads",
        },
        validation={
            "metric": "Dice on the input grid after the full pipeline (postprocessing included)",
            "validation_cases": [c.case_id for c in validation_cases],
            **validation,
        },
    )


if __name__ == "__main__":
    main()
