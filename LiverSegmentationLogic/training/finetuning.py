"""Fine-tuning a model on the corrected cases of the queue, validated before promotion.

What ``liverseg finetune`` runs:

1. start from the base model's weights;
2. train on the queued cases mixed with a replay sample of the base model's own training data
   (so the old domain is not forgotten), within a time budget;
3. compare new and base model on the queued cases, and the new model with the first model of its
   line (the one fine-tuning started from) on that model's validation cases;
4. write the new version into the registry, and make it active only if it is better on the
   queued cases and loses no more than ``tolerance`` Dice on any class of the base validation
   set. Otherwise it is kept, not activated, and the card says why.

The queued labels hold the classes the model writes out. A model that also learnt classes it does
not show (the liver model's kidneys and spleen) keeps them as the base model predicted them, so
fine-tuning on liver-only corrections does not teach it that the kidneys are background.
"""

from __future__ import annotations

import copy
import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from ..studies.case_queue import CaseQueue
from ..models.catalog import activate, new_version_folder, study_tag
from ..io.datasets import CaseFiles, find_cases, select_cases
from ..errors import LiverSegError
from ..inference.segmenter import resolve_device
from ..models.model_files import LoadedModel, load_model, save_model
from ..inference.preprocessing import neighbour_stack
from ..models.tasks import reference_values
from .trainer import TrainConfig, TrainingCase, evaluate_cases, load_case, train_network


class FinetuneError(LiverSegError):
    """Fine-tuning cannot start (empty queue, unsuitable model, missing data)."""


@dataclass
class FinetuneResult:
    model: LoadedModel
    promoted: bool
    reason: str
    report: dict


def _queued_training_case(model: LoadedModel, case: CaseFiles) -> TrainingCase:
    """A queued case on the model grid, its written labels turned into network classes; hidden
    classes come from the base model's own prediction where the correction says background."""
    config = model.preprocess
    outputs = model.output_labels
    written_labels = {label: label for label in outputs if label}
    prepared = load_case(case.images, case.label, config, written_labels, name=case.case_id)
    written = prepared.labels
    with torch.inference_mode():
        predicted = np.concatenate([
            model.network(torch.from_numpy(neighbour_stack(prepared.image, idx, config.neighbours))).argmax(1).numpy()
            for idx in np.array_split(np.arange(written.shape[0]), max(1, written.shape[0] // 8))
        ]).astype(np.uint8)
    target = np.zeros_like(written)
    for net_class, label in enumerate(outputs):
        if net_class and label == 0:  # hidden class: keep the base model's view of it
            target[(written == 0) & (predicted == net_class)] = net_class
    for net_class, label in reversed(list(enumerate(outputs))):
        if label:
            target[written == label] = net_class
    return TrainingCase(case.case_id, prepared.image, target)


def _mean(scores: dict) -> float:
    return float(np.mean(list(scores.values()))) if scores else float("nan")


def finetune(
    base: str,
    queue: Union[str, Path],
    replay: Optional[Union[str, Path]] = None,
    replay_cases: Optional[int] = None,
    epochs: int = 20,
    time_budget_s: float = 480.0,
    learning_rate: float = 5e-4,
    tolerance: float = 0.02,
    seed: int = 0,
    device: str = "auto",
    study: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> FinetuneResult:
    """Fine-tune ``base`` on the cases of ``queue`` and promote the result if it validates.

    Args:
        base: model reference (name, name@version or folder).
        queue: fine-tuning queue folder (:class:`studies.case_queue.CaseQueue`).
        replay: the base model's training dataset folder: replay cases come from its training
            cases, the regression check from its validation cases (named in the base card).
            Without it nothing guards the old domain, so the result is never activated.
        replay_cases: replay cases mixed in (default: as many as queued cases, at least 2).
        tolerance: largest allowed loss of Dice on any class of the base validation set.
        device: where the network trains (``"auto"``: CUDA if present).
        study: fine-tune that study's model line: start from the study's active version, train on
            the queued cases of that study only, write ``<base>+<study>-ft<n>`` and activate it for
            that study only (other studies and the global choice keep theirs).
    """
    resolve_device(device)  # an unusable device fails now, not after the cases are read
    model = load_model(base, study=study)
    card = model.card
    if card.get("cascade"):
        raise FinetuneError(f"{model.name_version} is a cascade; fine-tune its stages as separate models")
    queued = CaseQueue(queue)
    queued_paths = [(m["case_id"], queued.paths(m["case_id"])) for m in queued.list()
                    if study is None or study_tag(m.get("study")) == study_tag(study)]
    queued_cases = [CaseFiles(f"queue/{case_id}", (paths["image"],), paths["label"]) for case_id, paths in queued_paths]
    if not queued_cases:
        raise FinetuneError(f"The queue {queue} holds no cases" + (f" of study {study_tag(study)}" if study else ""))
    if model.preprocess.channels != 1:
        raise FinetuneError("The queue holds single-image cases; this model takes several channels")
    t0 = time.perf_counter()
    cases = [_queued_training_case(model, c) for c in queued_cases]

    validation_cases: list[CaseFiles] = []  # empty without replay data
    replayed: list[CaseFiles] = []
    if replay is not None:
        label_map = {int(k): int(v) for k, v in card.get("training", {}).get("label_map", {}).items()}
        if not label_map:
            raise FinetuneError(f"{model.name_version}'s card has no training label map; cannot replay its data")
        held = card.get("validation", {}).get("validation_cases", [])
        available = find_cases(replay, model.preprocess.channels)
        validation_cases = select_cases(available, held)
        pool = [c for c in available if c not in validation_cases]
        n = max(2, len(queued_cases)) if replay_cases is None else replay_cases
        rng = np.random.default_rng(seed)
        replayed = [pool[i] for i in sorted(rng.choice(len(pool), min(n, len(pool)), replace=False))]
        cases += [load_case(c.images, c.label, model.preprocess, label_map, name=c.case_id) for c in replayed]
        if not validation_cases:
            log(f"warning: none of the base validation cases {held} is in {replay}")
    log(f"fine-tuning {model.name_version} on {len(queued_cases)} queued + {len(replayed)} replay case(s)")

    network = copy.deepcopy(model.network).train()
    train = TrainConfig(epochs=epochs, learning_rate=learning_rate, time_budget_s=time_budget_s, seed=seed,
                        background_fraction=0.3, device=device)
    losses = train_network(network, cases, model.preprocess, train, log=log)
    train_s = time.perf_counter() - t0

    base_version = str(card["version"]).split("+")[0].split("-")[0]  # the bundled/trained version it descends from
    version, folder = new_version_folder(card["name"], base_version, "ft", study=study)
    # built in a hidden staging folder and renamed at the end: a cancelled or failed run leaves no
    # version behind, and the registry never lists one without its validation
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    new_card = dict(card, version=version)
    save_model(staging, network, new_card)
    candidate = load_model(staging)

    written = {c["name"]: [c["label"]] for c in card["classes"]}
    report = {
        "queued_cases": [c.case_id for c in queued_cases],
        "queue_before": evaluate_cases(model, queued_cases, written)["mean_dice"],
        "queue_after": evaluate_cases(candidate, queued_cases, written)["mean_dice"],
        "base_validation_cases": [c.case_id for c in validation_cases],
    }
    if validation_cases:
        reference = reference_values(card["classes"], model.output_labels, label_map)
        measured = evaluate_cases(model, validation_cases, reference)["mean_dice"]
        report["base_validation_before"] = validation_reference(card, report["base_validation_cases"], measured)
        report["base_validation_after"] = evaluate_cases(candidate, validation_cases, reference)["mean_dice"]
    promoted, reason = _promotion_decision(report, tolerance)
    new_card.pop("validation", None)  # the base model's; replaced by this model's own where measured
    if validation_cases:
        new_card["validation"] = {
            "metric": "Dice on the input grid after the full pipeline (postprocessing included)",
            "validation_cases": report["base_validation_cases"],
            "mean_dice": report["base_validation_after"],
        }
    new_card.update(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        finetuning={
            "base": model.name_version,
            "study": study_tag(study),
            "base_sha256": card["sha256"],
            "queue": str(Path(queue).resolve()),
            "replay_cases": [c.case_id for c in replayed],
            "epochs_run": len(losses),
            "losses": [round(v, 5) for v in losses],
            "learning_rate": learning_rate,
            "wall_time_s": round(train_s, 1),
        },
        promotion={"promoted": promoted, "reason": reason, "tolerance": tolerance, **report},
    )
    save_model(staging, network, new_card)
    os.replace(staging, folder)  # the version appears whole, or not at all
    if promoted:
        activate(f"{card['name']}@{version}", study=study)
    log(f"{card['name']}@{version}: {'ACTIVATED' if promoted else 'kept, not activated'}: {reason}")
    return FinetuneResult(load_model(folder), promoted, reason, report)


def validation_reference(card: dict, cases: list[str], measured: dict) -> dict:
    """The scores a fine-tuned model must stay within tolerance of: those of the first model of
    its line (carried in each fine-tuned card) when measured on the same cases, else the base
    model's own. So fine-tune after fine-tune cannot drift from the original domain a little at
    a time."""
    lineage = card.get("promotion", {})
    if lineage.get("base_validation_cases") == cases and lineage.get("base_validation_before"):
        return lineage["base_validation_before"]
    return measured


def _promotion_decision(report: dict, tolerance: float) -> tuple[bool, str]:
    before, after = _mean(report["queue_before"]), _mean(report["queue_after"])
    if not after > before:
        return False, f"not better on the queued cases (Dice {before:.3f} -> {after:.3f})"
    if "base_validation_before" not in report:
        return False, ("no base validation data (give --replay with the base model's dataset), "
                       "so a regression on the original domain could not be ruled out")
    drops = {n: report["base_validation_before"][n] - report["base_validation_after"][n]
             for n in report["base_validation_before"]}
    worst = max(drops, key=drops.get)
    if drops[worst] > tolerance:
        return False, (f"regresses on the base validation set: {worst} Dice "
                       f"{report['base_validation_before'][worst]:.3f} -> {report['base_validation_after'][worst]:.3f} "
                       f"(tolerance {tolerance})")
    return True, (f"queued cases Dice {before:.3f} -> {after:.3f}; base validation within tolerance "
                  f"(largest drop {max(drops[worst], 0.0):.3f} in {worst})")
