"""Training a 2.5D U-Net from labelled volumes: augmentation, Dice + cross-entropy, validation."""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.transforms import RandHistogramShift

from ..io.volumes import channel_array, crop_volume, read_volume
from ..inference.segmenter import native_bf16, resolve_device
from ..models.model_files import LoadedModel
from ..models.network import UNet2D
from ..inference.preprocessing import (
    PreprocessConfig,
    grow_region,
    neighbour_stack,
    prepare_labels,
    prepare_volume,
)


@dataclass
class TrainingCase:
    """One labelled case on the model grid."""

    name: str
    image: np.ndarray  # (Z, H, W) float32; (C, Z, H, W) with several input channels
    labels: np.ndarray  # (Z, H, W) uint8, model classes


def write_prepared_cases(path: Union[str, os.PathLike], cases: Sequence[TrainingCase]) -> None:
    """Cases on the model grid in one compressed file (images as float16), so that a machine
    without the data or SimpleITK (a GPU machine) can train on them: see
    :func:`read_prepared_cases`."""
    np.savez_compressed(path, **{f"{c.name}/image": c.image.astype(np.float16) for c in cases},
                        **{f"{c.name}/labels": c.labels for c in cases})


def read_prepared_cases(path: Union[str, os.PathLike]) -> list[TrainingCase]:
    """The cases :func:`write_prepared_cases` wrote, sorted by name."""
    with np.load(path) as archive:
        names = sorted({key.rsplit("/", 1)[0] for key in archive.files})
        return [TrainingCase(n, archive[f"{n}/image"].astype(np.float32), archive[f"{n}/labels"]) for n in names]


def load_case(
    image_paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    label_path: Union[str, os.PathLike],
    config: PreprocessConfig,
    label_map: dict[int, int],
    name: Optional[str] = None,
    roi: Optional[tuple[Sequence[int], float]] = None,
) -> TrainingCase:
    """Read an image (or one image per channel) + label pair and put both on the model grid.

    Args:
        label_map: source label value -> model class (values not listed become background).
        roi: for the second stage of a cascade, ``(label values of the region, margin mm)``: the
            case is cropped to the region grown by the margin and the image kept inside it only,
            exactly as :class:`inference.segmenter.Segmenter` does with the first stage's output.
    """
    paths = [image_paths] if isinstance(image_paths, (str, os.PathLike)) else list(image_paths)
    images = [read_volume(p) for p in paths]
    labels = read_volume(label_path, validate=False)
    for path, image in zip(paths, images):
        if image.array.shape != labels.array.shape:
            raise ValueError(f"{label_path}: shape {labels.array.shape} differs from image {path} {image.array.shape}")
    values = np.rint(labels.array).astype(np.int64)
    mapped = np.zeros(values.shape, dtype=np.uint8)
    for src, dst in label_map.items():
        mapped[values == int(src)] = dst
    mask = None
    if roi is not None:
        region = np.isin(values, list(roi[0]))
        if not region.any():
            raise ValueError(f"{label_path}: no voxel of the region labels {list(roi[0])}")
        mask, box = grow_region(region, images[0].geometry.spacing[::-1], roi[1])
        images, mapped, mask = [crop_volume(v, box) for v in images], mapped[box], mask[box]
    prepared = prepare_volume(channel_array(images), images[0].geometry, config, roi_mask=mask)
    return TrainingCase(name or Path(paths[0]).name, prepared.image, prepare_labels(mapped, prepared))


HISTOGRAM_SHIFT_POINTS = (5, 10)  # fewer points, larger shifts (MONAI's default: 10)


@dataclass(frozen=True)
class Augmentation:
    """What :func:`augment_batch` does to each training batch.

    The defaults are this project's set since 1.0.0 (always on: rotation, scale, shift, elastic,
    gamma, contrast, noise). The options add the rest of nnU-Net's set (Isensee et al., Nature
    Methods 18, 2021): mirroring of both in-plane axes, Gaussian blur, simulated low resolution.
    A task turns them on with ``training.augmentation`` (e.g. ``{"mirror": true}``).
    """

    rotation_deg: float = 10.0
    scale: float = 0.1  # zoom in 1 +- scale
    mirror: bool = False  # flip each in-plane axis with probability 0.5
    blur_probability: float = 0.0  # Gaussian blur, sigma 0.5-1.0 pixel (nnU-Net: 0.2)
    low_resolution_probability: float = 0.0  # down 1-2x, back up (nnU-Net: 0.25)
    # MONAI's RandHistogramShift: a random monotonic intensity curve, for scanners, protocols and
    # diseases (e.g. iron overload) that change the organs' contrast beyond what gamma covers
    histogram_shift_probability: float = 0.0

    @classmethod
    def from_options(cls, options: Optional[dict]) -> "Augmentation":
        """From a task's ``training.augmentation`` object; unknown keys are an error."""
        options = dict(options or {})
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown augmentation option(s): {', '.join(sorted(unknown))}")
        return cls(**options)

    def describe(self) -> str:
        """For the model card."""
        parts = [f"rotation +-{self.rotation_deg:g} deg", f"scale {1 - self.scale:g}-{1 + self.scale:g}",
                 "shift", "elastic", "gamma", "contrast", "noise"]
        if self.mirror:
            parts.append("mirroring (both in-plane axes)")
        if self.blur_probability:
            parts.append(f"Gaussian blur (p {self.blur_probability:g})")
        if self.low_resolution_probability:
            parts.append(f"simulated low resolution (p {self.low_resolution_probability:g})")
        if self.histogram_shift_probability:
            parts.append(f"histogram shift, {HISTOGRAM_SHIFT_POINTS[0]}-{HISTOGRAM_SHIFT_POINTS[1]} control points "
                         f"(p {self.histogram_shift_probability:g})")
        return ", ".join(parts)


def augment_batch(
    images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, strength: float = 1.0,
    augmentation: Augmentation = Augmentation(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random spatial and intensity changes (see :class:`Augmentation`), the same spatial ones to
    images and labels. Options left off draw no random numbers, so a recipe without them trains
    exactly as before they existed.

    Args:
        images: (B, C, H, W) float in 0-1.
        labels: (B, H, W) long.
    """
    b, _, h, w = images.shape

    def rand(*shape, lo=-1.0, hi=1.0):  # drawn on the CPU generator, used where the images are
        return (lo + (hi - lo) * torch.rand(*shape, generator=generator)).to(images.device)

    angle = rand(b) * math.radians(augmentation.rotation_deg) * strength
    scale = 1.0 + rand(b) * augmentation.scale * strength
    shift = rand(b, 2) * 0.05 * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    if augmentation.mirror:  # negating an output axis's column of theta mirrors that axis
        flips = torch.where(rand(b, 2) < 0, -1.0, 1.0)
        theta = theta * torch.cat([flips, torch.ones_like(flips[:, :1])], 1)[:, None, :]
    grid = F.affine_grid(theta, (b, 1, h, w), align_corners=False)
    # elastic: a coarse random displacement field, smoothly upsampled
    coarse = rand(b, 2, 5, 5, lo=-1, hi=1) * 0.03 * strength
    grid = grid + F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if augmentation.low_resolution_probability:
        images = _simulate_low_resolution(images, rand(b, lo=0, hi=1) < augmentation.low_resolution_probability,
                                          rand(b, lo=1, hi=2))
    if augmentation.blur_probability:
        images = _blur(images, rand(b, lo=0, hi=1) < augmentation.blur_probability, rand(b, lo=0.5, hi=1.0))
    if augmentation.histogram_shift_probability:
        images = _shift_histograms(images, rand(b, lo=0, hi=1) < augmentation.histogram_shift_probability,
                                   int(torch.randint(2**31 - 1, (1,), generator=generator)))
    # intensity: gamma, contrast/brightness, noise
    gamma = torch.exp(rand(b, 1, 1, 1) * 0.3 * strength)
    images = images.clamp(0, 1) ** gamma
    images = images * (1 + rand(b, 1, 1, 1) * 0.1 * strength) + rand(b, 1, 1, 1) * 0.05 * strength
    images = images + torch.randn(images.shape, generator=generator).to(images.device) * 0.01 * strength
    return images, labels[:, 0].long()


def _simulate_low_resolution(images: torch.Tensor, chosen: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """nnU-Net's SimulateLowResolution: the chosen images down by ``factor`` (nearest), back up (bilinear)."""
    out = images.clone()
    h, w = images.shape[-2:]
    for i in chosen.nonzero().flatten().tolist():
        small = F.interpolate(images[i : i + 1], size=(max(1, int(h / factor[i])), max(1, int(w / factor[i]))),
                              mode="nearest")
        out[i : i + 1] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return out


def _shift_histograms(images: torch.Tensor, chosen: torch.Tensor, seed: int) -> torch.Tensor:
    """MONAI's RandHistogramShift on the chosen images, one curve for all of an image's channels
    (its neighbour slices), drawn from ``seed`` so that training stays reproducible."""
    shift = RandHistogramShift(num_control_points=HISTOGRAM_SHIFT_POINTS, prob=1.0)
    shift.set_random_state(seed=seed)
    out = images.clone()
    for i in chosen.nonzero().flatten().tolist():
        out[i] = torch.as_tensor(shift(images[i]))
    return out


def _blur(images: torch.Tensor, chosen: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A separable Gaussian blur of the chosen images (every channel), ``sigma`` pixels each."""
    out = images.clone()
    c = images.shape[1]
    offsets = torch.arange(-2, 3, dtype=images.dtype, device=images.device)
    for i in chosen.nonzero().flatten().tolist():
        kernel = torch.exp(-0.5 * (offsets / sigma[i]) ** 2)
        kernel = (kernel / kernel.sum()).to(images.dtype)
        x = images[i : i + 1]
        x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), kernel.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
        x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), kernel.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)
        out[i : i + 1] = x
    return out


TRAINING_PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    background_fraction: float = 0.3  # slices without foreground per foreground slice
    time_budget_s: float = float("inf")
    seed: int = 0
    #: cross-entropy weight per class (background first); None: all 1
    class_weights: Optional[Sequence[float]] = None
    #: "auto" (CUDA if present), "cpu", "cuda"...: where the network trains (the data stays on
    #: the CPU until each batch)
    device: str = "auto"
    #: train on random square patches of this size (pixels on the model grid) instead of whole
    #: slices; a third of them centred on foreground (nnU-Net's sampling). None: whole slices
    patch_size: Optional[int] = None
    augmentation: Augmentation = field(default_factory=Augmentation)
    #: "fp32", or "bf16": the network's forward pass under bf16 autocast (the loss, gradients and
    #: weights stay fp32); pays on CPUs with bf16 in hardware and on recent GPUs
    precision: str = "fp32"

    def __post_init__(self):
        if self.precision not in TRAINING_PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {', '.join(TRAINING_PRECISIONS)}")

    def describe_loss(self) -> str:
        """For the model card."""
        weights = self.class_weights
        return "Dice + cross-entropy (MONAI DiceCELoss)" + (
            f", cross-entropy class weights {[round(w, 2) for w in weights]}" if weights else "")

    def describe_optimiser(self) -> str:
        """For the model card."""
        patches = f" of {self.patch_size} x {self.patch_size} patches" if self.patch_size else ""
        return f"AdamW lr {self.learning_rate}, cosine schedule, batch {self.batch_size}{patches}"

    def describe_precision(self) -> str:
        """For the model card."""
        return "bf16 autocast (forward pass), fp32 weights and loss" if self.precision == "bf16" else "fp32"


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


def random_patch(image: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator,
                 foreground_share: float = 1 / 3) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` x ``size`` patch of one slice (image (C, H, W), labels (H, W)), zero-padded where
    the slice is smaller; with probability ``foreground_share`` centred on a random foreground pixel."""
    h, w = labels.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        pads = [(ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)]
        image, labels = np.pad(image, [(0, 0)] + pads), np.pad(labels, pads)
        h, w = labels.shape
    foreground = np.flatnonzero(labels)
    if foreground.size and rng.random() < foreground_share:
        cy, cx = np.unravel_index(foreground[rng.integers(foreground.size)], labels.shape)
        y0, x0 = int(np.clip(cy - size // 2, 0, h - size)), int(np.clip(cx - size // 2, 0, w - size))
    else:
        y0, x0 = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
    return image[:, y0 : y0 + size, x0 : x0 + size], labels[y0 : y0 + size, x0 : x0 + size]


def _batch(images: list[np.ndarray], labels: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack slices of possibly different in-plane sizes (cases from different scanners), each
    zero-padded, centred, to the largest size in the batch."""
    h = max(i.shape[-2] for i in images)
    w = max(i.shape[-1] for i in images)

    def pad(a):
        dh, dw = h - a.shape[-2], w - a.shape[-1]
        return np.pad(a, [(0, 0)] * (a.ndim - 2) + [(dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)])

    x = torch.from_numpy(np.stack([pad(i) for i in images]))
    y = torch.from_numpy(np.stack([pad(label) for label in labels]).astype(np.int64))
    return x, y


def _dropout_rng_state(device: torch.device) -> torch.Tensor:
    """The state of the generator dropout draws from (the device's default one), so that a resumed
    training drops the same units as one that ran through."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_dropout_rng_state(state: torch.Tensor, device: torch.device):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


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
    ``checkpoint`` is given, and training resumes from it if it exists. The network is returned
    on the CPU whatever ``train.device`` was.
    """
    device = resolve_device(train.device)
    # channels-last: a training step 17 % faster on the CPU (measured on this project's U-Net)
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    network.to(device, memory_format=memory_format)
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)
    generator = torch.Generator().manual_seed(train.seed)
    optimiser = torch.optim.AdamW(network.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda e: 0.5 * (1 + math.cos(math.pi * min(e, train.epochs) / train.epochs))
    )
    weight = None if train.class_weights is None else torch.tensor(train.class_weights, device=device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, weight=weight)
    start_epoch, losses = 0, []
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)  # our own file
        if state.get("precision", "fp32") != train.precision:  # one model, one arithmetic, as its card says
            raise ValueError(f"{checkpoint} was trained in {state.get('precision', 'fp32')}; "
                             f"resume it in that precision, not {train.precision}")
        network.load_state_dict(state["network"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, losses = state["epoch"], state["losses"]
        rng.bit_generator.state = state["numpy_rng"]
        generator.set_state(state["torch_rng"].cpu())
        if "dropout_rng" in state:  # checkpoints from before 2026-12-04 lack it
            _set_dropout_rng_state(state["dropout_rng"].cpu(), device)
        log(f"resumed from {checkpoint} at epoch {start_epoch}")
    k = config.neighbours
    t_start = time.perf_counter()
    for epoch in range(start_epoch, train.epochs):
        network.train()
        pairs = sample_slices(cases, rng, train.background_fraction)
        total, count = 0.0, 0
        for s in range(0, len(pairs), train.batch_size):
            if time.perf_counter() - t_start > train.time_budget_s:
                break
            chunk = pairs[s : s + train.batch_size]
            if len(chunk) < 2:  # BatchNorm needs more than one sample
                continue
            slices = [(neighbour_stack(cases[c].image, [z], k)[0], cases[c].labels[z]) for c, z in chunk]
            if train.patch_size:
                slices = [random_patch(i, label, train.patch_size, rng) for i, label in slices]
            x, y = _batch(*map(list, zip(*slices)))
            x, y = augment_batch(x.to(device), y.to(device), generator, augmentation=train.augmentation)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=train.precision == "bf16"):
                logits = network(x.contiguous(memory_format=memory_format))
            loss = loss_fn(logits.float(), y[:, None])
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
                    "dropout_rng": _dropout_rng_state(device),
                    "precision": train.precision,
                },
                checkpoint,
            )
        if on_epoch is not None:
            on_epoch(epoch + 1, losses[-1], network)
        if elapsed > train.time_budget_s:
            log(f"time budget of {train.time_budget_s:.0f}s reached after epoch {epoch + 1}")
            break
    network.to("cpu", memory_format=torch.contiguous_format).eval()
    return losses


def hardware_description(device: Union[str, torch.device] = "auto") -> str:
    """What a training ran on, for the model card."""
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    bf16 = ", bf16 in hardware" if native_bf16() else ""  # what makes a bf16 training fast, or slow
    return f"{_cpu_name()}, {torch.get_num_threads()} CPU threads{bf16}"


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what Python knows (often just "x86_64")."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def balanced_class_weights(cases: Sequence[TrainingCase], n_classes: int, cap: float = 50.0) -> list[float]:
    """Cross-entropy weights ~ 1 / sqrt(class frequency), background 1, capped: small classes
    (lesions) weigh more without drowning the rest."""
    counts = np.zeros(n_classes, dtype=np.float64)
    for case in cases:
        counts += np.bincount(case.labels.ravel(), minlength=n_classes)[:n_classes]
    counts = np.maximum(counts, 1.0)
    weights = np.sqrt(counts[0] / counts)
    return [float(w) for w in np.minimum(weights, cap)]


def evaluate_cases(model: LoadedModel, cases: Sequence, reference: dict[str, Sequence[int]]) -> dict:
    """Segment each case with the full pipeline (cascade included) and compute Dice per class
    on the input grid.

    Args:
        cases: :class:`io.datasets.CaseFiles`.
        reference: class name -> the label values of the reference that make up that class.
    """
    from ..inference.scoring import score_case
    from ..inference.segmenter import Segmenter

    segmenter = Segmenter(model, device="cpu", contrast_check=False)  # Dice only: no quality control
    per_case = {case.case_id: score_case(segmenter, case, reference, quality=False)["dice"] for case in cases}
    names = [c["name"] for c in model.classes]
    mean = {n: float(np.mean([s[n] for s in per_case.values()])) for n in names}
    return {"per_case_dice": per_case, "mean_dice": mean}
