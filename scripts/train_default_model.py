"""Reproduce the shipped default model: liver on CHAOS MR T2-SPIR, patient-wise split.

    python scripts/train_default_model.py --data ../shared/data/chaos-mr-t2 --out Resources/Models/liver-mr-t2

Trains on 11 patients, validates on 3 held-out patients with the full inference pipeline
(Dice on the input grid), and writes weights + model card.
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
from LiverSegmentationLogic.anatomy import class_entry
from LiverSegmentationLogic.models import LoadedModel, save_model
from LiverSegmentationLogic.network import UNet2D
from LiverSegmentationLogic.preprocessing import PreprocessConfig
from LiverSegmentationLogic.training import TrainConfig, evaluate_cases, load_case, train_network

PATIENTS = [1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32]
VALIDATION = [2, 21, 31]  # held out; patient 21 is also the bundled demo sample
LABEL_MAP = {1: 1}  # CHAOS: 1 liver (2, 3 kidneys and 4 spleen become background)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/chaos-mr-t2"))
    p.add_argument("--out", type=Path, default=Path("Resources/Models/liver-mr-t2"))
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--time-budget", type=float, default=float("inf"), help="seconds")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--version", default="1.0.0")
    args = p.parse_args()

    config = PreprocessConfig(spacing_xy=(2.0, 2.0), neighbours=1)
    classes = [class_entry(1, "liver", {"largest_component": True, "fill_holes": True})]
    train_ids = [n for n in PATIENTS if n not in VALIDATION]
    pair = lambda n: (args.data / f"image_{n}.nii.gz", args.data / f"label_{n}.nii.gz")  # noqa: E731

    t0 = time.perf_counter()
    cases = [load_case(*pair(n), config, LABEL_MAP, name=f"chaos-mr-t2/{n}") for n in train_ids]
    print(f"loaded {len(cases)} training cases in {time.perf_counter() - t0:.1f}s")
    network = UNet2D(in_channels=config.in_channels, n_classes=2, width=16, depth=4, dropout=0.1)
    train = TrainConfig(epochs=args.epochs, time_budget_s=args.time_budget)
    card = {
        "name": "liver-mr-t2",
        "version": args.version,
        "task": "liver",
        "modality": "MR",
        "description": "Liver segmentation on abdominal T2-weighted MR (trained on CHAOS T2-SPIR).",
        "classes": classes,
        "preprocessing": config.to_dict(),
        "readouts": ["volume", "fat_fraction"],
    }
    t0 = time.perf_counter()
    losses = train_network(network, cases, config, train, checkpoint=args.checkpoint)
    train_s = time.perf_counter() - t0

    model = LoadedModel(network, dict(card, sha256=""), args.out)
    validation = evaluate_cases(model, [tuple(map(str, pair(n))) for n in VALIDATION], LABEL_MAP)
    print(json.dumps(validation, indent=2))
    card.update(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        tool_version=__version__,
        training={
            "data": "CHAOS MR T2-SPIR (Kavur et al., Medical Image Analysis 69, 2021, "
            "doi:10.1016/j.media.2020.101950; CC BY-SA 4.0), preprocessed release of shenqq377/Q-Net",
            "split": "patient-wise",
            "train_patients": train_ids,
            "validation_patients": VALIDATION,
            "label_map": {str(k): v for k, v in LABEL_MAP.items()},
            "epochs_run": len(losses),
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
            **validation,
        },
    )
    save_model(args.out, network, card)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
