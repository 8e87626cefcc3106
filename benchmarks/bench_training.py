"""Training speed per task, fp32 against bf16 autocast: seconds per training slice.

Runs the real training loop (:func:`training.trainer.train_network`: sampling, augmentation,
forward, loss, backward, optimiser) for each bundled task's network, batch and patch size, on
synthetic cases of the task's slice size (the speed does not depend on what the images show).
The first epoch warms up and is not counted.

    python benchmarks/bench_training.py                          # every task with a shipped model
    python benchmarks/bench_training.py --tasks abdomen-mr-t2 --epochs 4
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from LiverSegmentationLogic.inference.segmenter import native_bf16
from LiverSegmentationLogic.models.tasks import load_task
from LiverSegmentationLogic.training.task_training import new_network, train_config
from LiverSegmentationLogic.training.trainer import TrainingCase, train_network

# slice size on the model grid of each task's data here (MR 2 mm: about 160 x 160; CT 2 mm: 256 x 256;
# the lesion stage's 1 mm liver crops: about 200 x 200)
SLICE = {"abdomen-mr-t2": 160, "liver-mr-t2": 160, "liver-ct": 256, "liver-lesion-ct": 200}


def synthetic_cases(task, size: int, n_cases=4, n_slices=24) -> list[TrainingCase]:
    """Cases whose every slice holds every class (so each one is sampled in every epoch)."""
    rng = np.random.default_rng(0)
    channels = task.preprocess_config().in_channels // (2 * task.preprocess_config().neighbours + 1)
    cases = []
    for i in range(n_cases):
        image = rng.random((channels, n_slices, size, size), dtype=np.float32)
        labels = np.zeros((n_slices, size, size), np.uint8)
        for c in range(1, task.n_classes):
            y, x = 20 + 30 * (c - 1) % (size - 40), size // 2
            labels[:, y : y + 20, x - 10 : x + 10] = c
        cases.append(TrainingCase(f"synthetic/{i}", image[0] if channels == 1 else image, labels))
    return cases


def seconds_per_slice(task_name: str, precision: str, epochs: int) -> tuple[float, str]:
    task = load_task(task_name)
    cases = synthetic_cases(task, SLICE[task_name])
    config = train_config(task, cases, epochs=epochs, seed=0, device="cpu", precision=precision)
    stamps = []
    train_network(new_network(task), cases, task.preprocess_config(), config,
                  on_epoch=lambda *_: stamps.append(time.perf_counter()), log=lambda m: None)
    slices = sum(c.labels.shape[0] for c in cases)
    shape = f"batch {config.batch_size} x {config.patch_size or SLICE[task_name]}^2"
    return float(np.median(np.diff(stamps))) / slices, shape


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["abdomen-mr-t2", "liver-ct", "liver-lesion-ct"])
    p.add_argument("--epochs", type=int, default=4, help="epochs per measurement (the first is not counted)")
    args = p.parse_args(argv)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, native bf16: {native_bf16()}")
    print("| task | network | input | fp32 ms/slice | bf16 ms/slice | bf16 speed-up |")
    print("|---|---|---|---|---|---|")
    for name in args.tasks:
        fp32, shape = seconds_per_slice(name, "fp32", args.epochs)
        bf16, _ = seconds_per_slice(name, "bf16", args.epochs)
        network = load_task(name).spec.get("network", {})
        print(f"| {name} | width {network.get('width', 16)} | {shape} | {1000 * fp32:.1f} | {1000 * bf16:.1f} "
              f"| {fp32 / bf16:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
