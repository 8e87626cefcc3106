"""Training a task's model from labelled datasets, validating it patient-wise, and writing it
(weights + card) into the registry or a folder. What ``liverseg train`` runs."""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from .. import __version__
from ..models.catalog import activate as set_active
from ..models.catalog import active_model, new_version_folder, resolve_model_folder
from ..io.datasets import CaseFiles, find_all_cases, k_folds, split_cases
from ..inference.scoring import has_real_spacing, score_case, summarise, validation_record
from ..inference.segmenter import Segmenter, resolve_device
from ..models.model_files import LoadedModel, load_model, save_model
from ..models.network import UNet2D
from ..models.tasks import Task
from .trainer import (
    Augmentation,
    TrainConfig,
    TrainingCase,
    balanced_class_weights,
    evaluate_cases,
    hardware_description,
    load_case,
    train_network,
)

DATA_NOTE = {
    "chaos-mr-t2": "CHAOS MR T2-SPIR (Kavur et al., Medical Image Analysis 69, 2021; CC BY-SA 4.0)",
    "chaos-ct": "CHAOS CT (Kavur et al., Medical Image Analysis 69, 2021; CC BY-SA 4.0)",
    "lits-ct": "LiTS-derived liver/lesion CT slices (MahlerTom/UnetLiverSegmentation; no real spacing)",
}


def load_task_cases(task: Task, cases: Sequence[CaseFiles]) -> list[TrainingCase]:
    """Read cases onto the task's model grid (cropped to the region for a cascade's second stage)."""
    config = task.preprocess_config()
    roi = None
    if task.cascade:
        roi = (task.cascade.get("roi_labels", [1]), float(task.cascade.get("margin_mm", 10.0)))
    return [load_case(c.images, c.label, config, task.label_map, name=c.case_id, roi=roi) for c in cases]


def new_network(task: Task, seed: int = 0) -> UNet2D:
    """The task's untrained network, its initial weights drawn from ``seed`` (torch seeds each new
    process at random, so a network built without one could not be trained again the same)."""
    options = {"width": 16, "depth": 4, "dropout": 0.1, **task.spec.get("network", {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2D(in_channels=task.preprocess_config().in_channels, n_classes=task.n_classes, **options)


def train_config(task: Task, cases: Sequence[TrainingCase], epochs=None, time_budget_s=None, seed=0,
                 device="auto", precision="fp32") -> TrainConfig:
    weights = task.training_option("class_weights")
    if weights == "balanced":
        weights = balanced_class_weights(cases, task.n_classes)
    defaults = TrainConfig()
    return TrainConfig(
        epochs=int(epochs or task.training_option("epochs", defaults.epochs)),
        batch_size=int(task.training_option("batch_size", defaults.batch_size)),
        learning_rate=float(task.training_option("learning_rate", defaults.learning_rate)),
        background_fraction=float(task.training_option("background_fraction", defaults.background_fraction)),
        patch_size=int(task.training_option("patch_size", 0)) or None,
        time_budget_s=float("inf") if time_budget_s is None else float(time_budget_s),
        seed=seed,
        class_weights=weights,
        device=device,
        precision=precision,
        augmentation=Augmentation.from_options(task.training_option("augmentation")),
    )


def first_stage_folder(task: Task) -> Path:
    """A cascade's first-stage model (the task's ``roi_task``) as the registry resolves it."""
    return resolve_model_folder(task.cascade.get("roi_model") or task.cascade["roi_task"])


def write_model(folder: Path, task: Task, network: UNet2D, card: dict,
                first_stage: Optional[Path] = None) -> LoadedModel:
    """Save weights + card; a cascade also gets a copy of its first-stage model in ``roi/``
    (``first_stage``, by default the task's ``roi_task`` as the registry resolves it), and the card
    lists that stage's classes too. Writing again over a folder that has one replaces it."""
    if task.cascade:
        roi_folder = first_stage or first_stage_folder(task)
        roi = load_model(roi_folder)
        if (folder / "roi").exists():
            shutil.rmtree(folder / "roi")
        shutil.copytree(roi_folder, folder / "roi")
        cascade = dict(task.cascade, roi_model="roi", roi_version=roi.name_version)
        card = dict(card, cascade=cascade, classes=roi.classes + task.card()["classes"])
    save_model(folder, network, card)
    return load_model(folder)


def train_task(
    task: Task,
    datasets: Sequence[Union[str, os.PathLike]],
    output: Optional[Path] = None,
    version: str = "1.0.0",
    epochs: Optional[int] = None,
    time_budget_s: Optional[float] = None,
    validation: Optional[Sequence[str]] = None,
    folds: int = 0,
    seed: int = 0,
    checkpoint: Optional[Path] = None,
    activate: Optional[bool] = None,
    device: str = "auto",
    log: Callable[[str], None] = print,
    precision: str = "fp32",
) -> LoadedModel:
    """Train, validate and write a model for ``task``.

    Args:
        datasets: dataset folders (see :mod:`io.datasets`).
        output: model folder; by default a new version in the registry (``<name>/<version>-train<n>``).
        validation: case names to hold out; default: the task's ``training.validation_cases``, else
            a random fifth of the cases.
        folds: k > 1 runs k-fold cross-validation (k trainings) for the card's metrics, then trains
            the shipped model on every case.
        checkpoint: written after every epoch and resumed from; with ``folds``, each fold model
            has its own beside it (``<name>-fold<f><suffix>``).
        activate: make the new registry version active; default: only if the task has no active
            model yet.
        device: where the network trains: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda"``.
        precision: ``"fp32"``, or ``"bf16"`` (the forward pass under bf16 autocast; see
            :class:`trainer.TrainConfig`).
    """
    resolve_device(device)  # an unusable device or precision fails now, not after the cases are read
    TrainConfig(precision=precision)
    cases = find_all_cases(datasets, len(task.channels))
    reference = task.reference_values()
    t0 = time.perf_counter()
    if folds and folds > 1:
        rows = []
        for f, held in enumerate(k_folds(cases, folds, seed)):
            log(f"fold {f + 1}/{folds}: validating on {', '.join(c.case_id for c in held)}")
            train_cases = [c for c in cases if c not in held]
            # each fold resumes from a checkpoint of its own beside the final model's
            fold_checkpoint = (checkpoint.with_name(f"{checkpoint.stem}-fold{f}{checkpoint.suffix}")
                               if checkpoint else None)
            model = _fit(task, train_cases, epochs, time_budget_s, seed, device, fold_checkpoint, log,
                         Path(tempfile.mkdtemp()), precision=precision)
            segmenter = Segmenter(model, device="cpu")
            rows += [dict(score_case(segmenter, c, reference, check_volumes=has_real_spacing(c.case_id)), fold=f)
                     for c in held]
            shutil.rmtree(model.folder, ignore_errors=True)
        record = validation_record(
            rows, summarise(rows), list(reference),
            f"{folds}-fold patient-wise cross-validation: each case segmented by the fold model that never saw it "
            "(the shipped model is then trained on every case)")
        train_cases, held = cases, []
    else:
        train_cases, held = split_cases(cases, validation or task.training_option("validation_cases"), seed=seed)
        record = None

    registry_version = output is None
    if registry_version:
        version, output = new_version_folder(task.name, version, "train")
    log(f"training {task.name} {version} on {len(train_cases)} case(s)"
        + (f", validating on {', '.join(c.case_id for c in held)}" if held else ""))
    model = _fit(task, train_cases, epochs, time_budget_s, seed, device, checkpoint, log, Path(output), version,
                 datasets, precision)
    if record is None:
        record = {"metric": "Dice on the input grid after the full pipeline (postprocessing included)",
                  "method": "patient-wise hold-out", "validation_cases": [c.case_id for c in held],
                  **evaluate_cases(model, held, reference)}
    card = dict(model.card, validation=record)
    card["training"]["total_wall_time_s"] = round(time.perf_counter() - t0, 1)
    save_model(model.folder, model.network, card)
    log(f"validation mean Dice: {', '.join(f'{k} {v:.3f}' for k, v in record['mean_dice'].items())}")
    if registry_version and (activate or (activate is None and active_model(task.name) is None)):
        set_active(f"{task.name}@{version}")
        log(f"activated {task.name}@{version}")
    log(f"wrote {model.folder}")
    return load_model(model.folder)


def _fit(task, cases, epochs, time_budget_s, seed, device, checkpoint, log, folder: Path, version="cv",
         datasets=(), precision="fp32") -> LoadedModel:
    loaded = load_task_cases(task, cases)
    train = train_config(task, loaded, epochs, time_budget_s, seed, device, precision)
    network = new_network(task, seed)
    t0 = time.perf_counter()
    losses = train_network(network, loaded, task.preprocess_config(), train, checkpoint=checkpoint, log=log)
    card = dict(task.card(), version=str(version))
    card.update(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        tool_version=__version__,
        training={
            "data": sorted({DATA_NOTE.get(Path(d).name, str(Path(d).name)) for d in datasets}),
            "split": "patient-wise",
            "train_cases": [c.case_id for c in cases],
            "label_map": {str(k): v for k, v in task.label_map.items()},
            "epochs_run": len(losses),
            "losses": [round(v, 5) for v in losses],
            "loss": train.describe_loss(),
            "optimiser": train.describe_optimiser(),
            "augmentation": train.augmentation.describe(),
            "seed": seed,
            "wall_time_s": round(time.perf_counter() - t0, 1),
            "hardware": hardware_description(device),
            "precision": train.describe_precision(),
        },
    )
    return write_model(folder, task, network, card)
