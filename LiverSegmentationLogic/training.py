"""Training a 2.5D U-Net from labelled volumes: augmentation, Dice + cross-entropy, validation."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from .imageio import read_volume
from .metrics import dice
from .models import LoadedModel
from .network import UNet2D
from .preprocessing import PreprocessConfig, neighbour_stack, prepare_labels, prepare_volume


@dataclass
class TrainingCase:
    """One labelled case on the model grid."""

    name: str
    image: np.ndarray  # (Z, H, W) float32
    labels: np.ndarray  # (Z, H, W) uint8, model classes


def load_case(image_path, label_path, config: PreprocessConfig, label_map: dict[int, int], name=None) -> TrainingCase:
    """Read an image + label pair and put both on the model grid.

    Args:
        label_map: source label value -> model class (values not listed become background).
    """
    image = read_volume(image_path)
    labels = read_volume(label_path, validate=False)
    if labels.array.shape != image.array.shape:
        raise ValueError(f"{label_path}: shape {labels.array.shape} differs from image {image.array.shape}")
    mapped = np.zeros(labels.array.shape, dtype=np.uint8)
    for src, dst in label_map.items():
        mapped[np.rint(labels.array).astype(np.int64) == int(src)] = dst
    prepared = prepare_volume(image.array, image.geometry, config)
    return TrainingCase(name or Path(image_path).name, prepared.image, prepare_labels(mapped, prepared))


def augment_batch(
    images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, strength: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotation (+-10 deg), scale (0.9-1.1), shift, elastic deformation and intensity changes.

    Args:
        images: (B, C, H, W) float in 0-1.
        labels: (B, H, W) long.
    """
    b, _, h, w = images.shape

    def rand(*shape, lo=-1.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=generator)

    angle = rand(b) * math.radians(10) * strength
    scale = 1.0 + rand(b) * 0.1 * strength
    shift = rand(b, 2) * 0.05 * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, (b, 1, h, w), align_corners=False)
    # elastic: a coarse random displacement field, smoothly upsampled
    coarse = rand(b, 2, 5, 5, lo=-1, hi=1) * 0.03 * strength
    grid = grid + F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    # intensity: gamma, contrast/brightness, noise
    gamma = torch.exp(rand(b, 1, 1, 1) * 0.3 * strength)
    images = images.clamp(0, 1) ** gamma
    images = images * (1 + rand(b, 1, 1, 1) * 0.1 * strength) + rand(b, 1, 1, 1) * 0.05 * strength
    images = images + torch.randn(images.shape, generator=generator) * 0.01 * strength
    return images, labels[:, 0].long()


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    background_fraction: float = 0.3  # slices without foreground per foreground slice
    time_budget_s: float = float("inf")
    seed: int = 0


def sample_slices(cases: Sequence[TrainingCase], rng: np.random.Generator, background_fraction: float):
    """(case index, slice index) pairs: every foreground slice plus a share of empty ones."""
    fg, bg = [], []
    for ci, case in enumerate(cases):
        has = case.labels.reshape(case.labels.shape[0], -1).any(1)
        fg += [(ci, z) for z in np.flatnonzero(has)]
        bg += [(ci, z) for z in np.flatnonzero(~has)]
    n_bg = min(len(bg), int(round(len(fg) * background_fraction)))
    chosen = fg + [bg[i] for i in rng.choice(len(bg), n_bg, replace=False)] if bg else fg
    rng.shuffle(chosen)
    return chosen


def train_network(
    network: UNet2D,
    cases: Sequence[TrainingCase],
    config: PreprocessConfig,
    train: TrainConfig,
    on_epoch: Optional[Callable[[int, float, UNet2D], None]] = None,
    checkpoint: Optional[Path] = None,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Train in place; returns the mean loss of each epoch.

    A checkpoint (network, optimiser, epoch, RNG states) is written after each epoch when
    ``checkpoint`` is given, and training resumes from it if it exists.
    """
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)
    generator = torch.Generator().manual_seed(train.seed)
    optimiser = torch.optim.AdamW(network.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda e: 0.5 * (1 + math.cos(math.pi * min(e, train.epochs) / train.epochs))
    )
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    start_epoch, losses = 0, []
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)  # our own file
        network.load_state_dict(state["network"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, losses = state["epoch"], state["losses"]
        rng.bit_generator.state = state["numpy_rng"]
        generator.set_state(state["torch_rng"])
        log(f"resumed from {checkpoint} at epoch {start_epoch}")
    k = config.neighbours
    t_start = time.perf_counter()
    for epoch in range(start_epoch, train.epochs):
        network.train()
        pairs = sample_slices(cases, rng, train.background_fraction)
        total, count = 0.0, 0
        for s in range(0, len(pairs), train.batch_size):
            chunk = pairs[s : s + train.batch_size]
            if len(chunk) < 2:  # BatchNorm needs more than one sample
                continue
            x = torch.from_numpy(np.stack([neighbour_stack(cases[c].image, [z], k)[0] for c, z in chunk]))
            y = torch.from_numpy(np.stack([cases[c].labels[z] for c, z in chunk]).astype(np.int64))
            x, y = augment_batch(x, y, generator)
            loss = loss_fn(network(x), y[:, None])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(chunk)
            count += len(chunk)
        schedule.step()
        losses.append(total / max(count, 1))
        elapsed = time.perf_counter() - t_start
        log(f"epoch {epoch + 1}/{train.epochs} loss {losses[-1]:.4f} lr {schedule.get_last_lr()[0]:.2e} {elapsed:.0f}s")
        if checkpoint is not None:
            torch.save(
                {
                    "network": network.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "schedule": schedule.state_dict(),
                    "epoch": epoch + 1,
                    "losses": losses,
                    "numpy_rng": rng.bit_generator.state,
                    "torch_rng": generator.get_state(),
                },
                checkpoint,
            )
        if on_epoch is not None:
            on_epoch(epoch + 1, losses[-1], network)
        if elapsed > train.time_budget_s:
            log(f"time budget of {train.time_budget_s:.0f}s reached after epoch {epoch + 1}")
            break
    network.eval()
    return losses


def evaluate_cases(model: LoadedModel, pairs: Sequence[tuple[str, str]], label_map: dict[int, int]) -> dict:
    """Segment each image with the full pipeline and compute Dice per class on the input grid."""
    from .inference import Segmenter

    segmenter = Segmenter(model, device="cpu")
    per_case = {}
    for image_path, label_path in pairs:
        image = read_volume(image_path)
        ref = np.rint(read_volume(label_path, validate=False).array).astype(np.int64)
        pred = segmenter.segment(image).labels
        scores = {}
        for cls in model.classes:
            src = [s for s, d in label_map.items() if d == cls["label"]]
            scores[cls["name"]] = dice(pred == cls["label"], np.isin(ref, src))
        per_case[Path(image_path).name] = scores
    names = [c["name"] for c in model.classes]
    mean = {n: float(np.mean([s[n] for s in per_case.values()])) for n in names}
    return {"per_case_dice": per_case, "mean_dice": mean}
