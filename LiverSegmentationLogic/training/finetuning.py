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

import contextlib
import copy
import datetime
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from ..studies.case_queue import CaseQueue
from ..models.catalog import activate, new_version_folder, origin_version, study_tag
from ..io.datasets import CaseFiles, find_cases, select_cases
from ..io.locations import home_dir
from ..errors import LiverSegError
from ..inference.segmenter import resolve_device
from ..models.model_files import LoadedModel, load_model, save_model
from ..models.network import inference_network
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


def _queued_training_case(origin: LoadedModel, case: CaseFiles, cache: "_Cache") -> tuple[TrainingCase, float]:
    """A queued case on the model grid, its written labels turned into network classes; hidden
    classes come from the line's first model's own prediction where the correction says background.
    That prediction is cached (it depends on the case and that model only). Returns the case and
    the seconds its network pass took (0 when cached)."""
    config = origin.preprocess
    outputs = origin.output_labels
    written_labels = {label: label for label in outputs if label}
    prepared = load_case(case.images, case.label, config, written_labels, name=case.case_id)
    written = prepared.labels
    seconds = 0.0
    predicted = cache.hidden(origin, case.case_id)
    if predicted is None or predicted.shape != written.shape:
        t0 = time.perf_counter()
        network = inference_network(origin.network)
        with torch.inference_mode():
            predicted = np.concatenate([
                network(torch.from_numpy(neighbour_stack(prepared.image, idx, config.neighbours))).argmax(1).numpy()
                for idx in np.array_split(np.arange(written.shape[0]), max(1, written.shape[0] // 8))
            ]).astype(np.uint8)
        seconds = time.perf_counter() - t0
        cache.save_hidden(origin, case.case_id, predicted)
    target = np.zeros_like(written)
    for net_class, label in enumerate(outputs):
        if net_class and label == 0:  # hidden class: keep the base model's view of it
            target[(written == 0) & (predicted == net_class)] = net_class
    for net_class, label in reversed(list(enumerate(outputs))):
        if label:
            target[written == label] = net_class
    return TrainingCase(case.case_id, prepared.image, target), seconds


class _Cache:
    """What fine-tunes of a line keep computing again: each model's Dice on each queued case, the
    hidden classes the line's first model predicts in each queued case, and what the last gate on
    this machine took. Kept under
    ``<home>/cache/finetuning``, keyed by the model's weights hash and the case's id and hashes (a
    case replaced under the same id is another case). Losing it costs time, never correctness."""

    def __init__(self, keys: dict[str, str]):
        self.folder = home_dir() / "cache" / "finetuning"
        self.keys = keys  # queue case id -> "<id>-<image hash>-<label hash>"

    def _scores_path(self, model: LoadedModel) -> Path:
        return self.folder / "scores" / f"{model.card['sha256'][:24]}.json"

    def scores(self, model: LoadedModel) -> dict[str, dict]:
        """Queue case id -> Dice per class, for the cases of this queue already measured."""
        try:
            known = json.loads(self._scores_path(model).read_text())
        except (OSError, ValueError):
            return {}
        return {case_id: known[key] for case_id, key in self.keys.items() if isinstance(known.get(key), dict)}

    def save_scores(self, model: LoadedModel, scores: dict[str, dict]):
        path = self._scores_path(model)
        try:
            known = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            known = {}
        known.update({self.keys[case_id]: dice for case_id, dice in scores.items()})
        self._write(path, json.dumps(known).encode())

    def gate_pace(self) -> dict:
        """What the last gate on this machine took (whole pipeline): ``validation_s`` for its
        validation cases (``validation_cases``) and ``queued_seconds_per_voxel`` per model-grid
        voxel of the queued cases it measured. Two figures, as the two kinds of case differ: a
        queued CT on its 512 x 512 grid costs more per model voxel than an MR validation case."""
        try:
            pace = json.loads((self.folder / "gate_pace.json").read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(pace, dict):
            return {}
        valid = {k: pace[k] for k in ("validation_s", "queued_seconds_per_voxel")
                 if isinstance(pace.get(k), (int, float)) and pace[k] > 0}
        if "validation_s" in valid and isinstance(pace.get("validation_cases"), list):
            valid["validation_cases"] = pace["validation_cases"]
        else:
            valid.pop("validation_s", None)
        return valid

    def save_gate_pace(self, pace: dict):
        self._write(self.folder / "gate_pace.json", json.dumps(pace).encode())

    def _hidden_path(self, model: LoadedModel, case_id: str) -> Path:
        return self.folder / "hidden" / model.card["sha256"][:24] / f"{self.keys[case_id]}.npz"

    def hidden(self, model: LoadedModel, case_id: str) -> Optional[np.ndarray]:
        try:
            with np.load(self._hidden_path(model, case_id), allow_pickle=False) as data:
                return data["predicted"]
        except (OSError, ValueError, KeyError):
            return None

    def save_hidden(self, model: LoadedModel, case_id: str, predicted: np.ndarray):
        buffer = io.BytesIO()
        np.savez_compressed(buffer, predicted=predicted)
        self._write(self._hidden_path(model, case_id), buffer.getvalue())

    @staticmethod
    def _write(path: Path, data: bytes):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temporary.write_bytes(data)
            os.replace(temporary, path)
        except OSError:
            pass  # a cache that cannot be written only costs time


def _suggestion_scores(model: LoadedModel, cases: list[CaseFiles], records: list[dict]) -> dict[str, dict]:
    """Queue case id -> Dice per class of ``model``'s own suggestion against the correction, for the
    cases whose export says the suggestion came from ``model`` (the panel records its audit and
    Dice): what the gate would measure, measured already."""
    names = [c["name"] for c in model.classes]
    scores = {}
    for case, meta in zip(cases, records):
        made_by = ((meta.get("suggestion_audit") or {}).get("model") or {}).get("sha256")
        dice = meta.get("suggestion_dice")
        if made_by == model.card["sha256"] and isinstance(dice, dict) and all(
                isinstance(dice.get(n), (int, float)) for n in names):
            scores[case.case_id] = {n: float(dice[n]) for n in names}
    return scores


def _case_key(meta: dict) -> str:
    return f"{meta['case_id']}-{meta['image_sha256'][:12]}-{meta['label_sha256'][:12]}"


def _line_origin(model: LoadedModel) -> LoadedModel:
    """The first model of ``model``'s line; the model itself where that version is not to be found."""
    origin = origin_version(str(model.card["version"]))
    if origin == model.card["version"]:
        return model
    try:
        return load_model(f"{model.card['name']}@{origin}")
    except LiverSegError:
        return model


def _mean(scores: dict) -> float:
    return float(np.mean(list(scores.values()))) if scores else float("nan")


#: the share of a fine-tune's time budget always left to training, however many cases wait to be evaluated
MIN_TRAIN_SHARE = 0.4
#: seconds kept free at the end of the budget for writing the new version
SAVE_RESERVE_S = 5.0
#: the gate is planned this much longer than the last gate's pace says: a large case costs more
#: per voxel than the small one a pace may come from (its full-resolution probability maps; on
#: 2 CPU cores a 164-slice LiTS case took 16 % longer than the pace of two 27-slice ones said)
GATE_MARGIN = 1.25
#: a whole-pipeline evaluation costs about this much more than the network pass alone (reading,
#: probabilities back onto a CT's 512 x 512 grid, postprocessing): the gate's pace until one was measured
PIPELINE_OVERHEAD = 2.0
#: a staging folder a killed fine-tune left behind is removed by a later one once it is this old
#: (a younger one may belong to a fine-tune still running)
STALE_STAGING_S = 24 * 3600.0


def finetune(
    base: str,
    queue: Union[str, Path],
    replay: Optional[Union[str, Path]] = None,
    replay_cases: Optional[int] = None,
    epochs: int = 20,
    time_budget_s: float = 300.0,
    learning_rate: float = 5e-4,
    tolerance: float = 0.02,
    seed: int = 0,
    device: str = "auto",
    study: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> FinetuneResult:
    """Fine-tune ``base`` on the cases of ``queue`` and promote the result if it validates.

    The whole run (reading the cases, training, the validation gate) keeps to ``time_budget_s``,
    however long the queue grows: what a model scored on a queued case, and the hidden classes
    of each case, are cached; training gets what is left after reading the cases and the time
    the gate needs for the base validation set and the newest queued case (never less than
    :data:`MIN_TRAIN_SHARE` of the budget); the gate then measures the queued cases newest first
    while the budget lasts.

    Args:
        base: model reference (name, name@version or folder).
        queue: fine-tuning queue folder (:class:`studies.case_queue.CaseQueue`).
        replay: the base model's training dataset folder: replay cases come from its training
            cases, the regression check from its validation cases (named in the base card).
            Without it nothing guards the old domain, so the result is never activated.
        replay_cases: replay cases mixed in (default: as many as queued cases, at least 2).
        time_budget_s: seconds for the whole run.
        tolerance: largest allowed loss of Dice on any class of the base validation set.
        device: where the network trains (``"auto"``: CUDA if present).
        study: fine-tune that study's model line: start from the study's active version, train on
            the queued cases of that study only, write ``<base>+<study>-ft<n>`` and activate it for
            that study only (other studies and the global choice keep theirs).
    """
    t_start = time.perf_counter()
    resolve_device(device)  # an unusable device fails now, not after the cases are read
    model = load_model(base, study=study)
    card = model.card
    if card.get("cascade"):
        raise FinetuneError(f"{model.name_version} is a cascade; fine-tune its stages as separate models")
    queued = CaseQueue(queue)
    records = [m for m in queued.list() if study is None or study_tag(m.get("study")) == study_tag(study)]
    if not records:
        raise FinetuneError(f"The queue {queue} holds no cases" + (f" of study {study_tag(study)}" if study else ""))
    if model.preprocess.channels != 1:
        raise FinetuneError("The queue holds single-image cases; this model takes several channels")
    queued_cases = []
    for meta in records:
        paths = queued.paths(meta["case_id"])
        queued_cases.append(CaseFiles(f"queue/{meta['case_id']}", (paths["image"],), paths["label"]))
    cache = _Cache({c.case_id: _case_key(m) for c, m in zip(queued_cases, records)})
    origin = _line_origin(model)
    cases, network_seconds = [], 0.0
    for case_files in queued_cases:
        case, seconds = _queued_training_case(origin, case_files, cache)
        cases.append(case)
        network_seconds += seconds

    validation_cases: list[CaseFiles] = []  # empty without replay data
    replayed: list[CaseFiles] = []
    if replay is not None:
        label_map = {int(k): int(v) for k, v in card.get("training", {}).get("label_map", {}).items()}
        if not label_map:
            raise FinetuneError(f"{model.name_version}'s card has no training label map; cannot replay its data")
        validation = card.get("validation", {})
        # a cross-validated card lists every patient as a validation case: its regression cases
        # are the few the gate checks, so the rest can be replayed
        held = validation.get("regression_cases") or validation.get("validation_cases", [])
        available = find_cases(replay, model.preprocess.channels)
        validation_cases = select_cases(available, held)
        pool = [c for c in available if c not in validation_cases]
        n = max(2, len(queued_cases)) if replay_cases is None else replay_cases
        rng = np.random.default_rng(seed)
        replayed = [pool[i] for i in sorted(rng.choice(len(pool), min(n, len(pool)), replace=False))]
        cases += [load_case(c.images, c.label, model.preprocess, label_map, name=c.case_id) for c in replayed]
        if not validation_cases:
            log(f"warning: none of the base validation cases {held} is in {replay}")

    written = {c["name"]: [c["label"]] for c in card["classes"]}
    report = {"queued_cases": [c.case_id for c in queued_cases],
              "base_validation_cases": [c.case_id for c in validation_cases]}
    if validation_cases:
        reference = reference_values(card["classes"], model.output_labels, label_map)
        validation_before = validation_reference(card, report["base_validation_cases"])
        if validation_before is None:
            validation_before = evaluate_cases(model, validation_cases, reference)["mean_dice"]
        report["base_validation_before"] = validation_before
    # the gate's cost: as the last gate here measured it, else guessed from the network's pace
    last_gate = cache.gate_pace()
    guessed_pace = None
    if "queued_seconds_per_voxel" not in last_gate or "validation_s" not in last_gate:
        guessed_pace = PIPELINE_OVERHEAD * _network_seconds_per_voxel(model, cases[:len(queued_cases)],
                                                                      network_seconds)
    queued_pace = last_gate.get("queued_seconds_per_voxel", guessed_pace)
    if last_gate.get("validation_cases") == report["base_validation_cases"]:
        validation_cost = last_gate["validation_s"]
    else:  # one replay case stands for one validation case (same dataset)
        replay_voxels = [case.image.size for case in cases[len(queued_cases):]] or [0]
        validation_cost = guessed_pace * float(np.mean(replay_voxels)) * len(validation_cases)
    # the gate's 'before': the base model's own suggestions (the export records their Dice), else
    # what it scored in an earlier fine-tune; what is missing is measured in the gate
    known_before = {**_suggestion_scores(model, queued_cases, records), **cache.scores(model)}
    newest_voxels = cases[len(queued_cases) - 1].image.size * (1 if queued_cases[-1].case_id in known_before else 2)
    gate_cost = GATE_MARGIN * (validation_cost + queued_pace * newest_voxels)
    prepared_s = time.perf_counter() - t_start
    train_budget = max(time_budget_s - prepared_s - gate_cost - SAVE_RESERVE_S,
                       MIN_TRAIN_SHARE * time_budget_s)
    log(f"fine-tuning {model.name_version} on {len(queued_cases)} queued + {len(replayed)} replay case(s), "
        f"{train_budget:.0f}s of training")

    network = copy.deepcopy(model.network).train()
    train = TrainConfig(epochs=epochs, learning_rate=learning_rate, time_budget_s=train_budget, seed=seed,
                        background_fraction=0.3, device=device)
    losses = train_network(network, cases, model.preprocess, train, log=log)
    train_s = time.perf_counter() - t_start - prepared_s

    version, folder = new_version_folder(card["name"], origin_version(str(card["version"])), "ft", study=study)
    # built in a hidden staging folder and renamed at the end: a cancelled or failed run leaves no
    # version behind, and the registry never lists one without its validation
    with _staging_folder(folder) as staging:
        new_card = dict(card, version=version)
        save_model(staging, network, new_card)
        candidate = load_model(staging)

        t_gate = time.perf_counter()
        if validation_cases:
            report["base_validation_after"] = evaluate_cases(candidate, validation_cases, reference)["mean_dice"]
        t_queued = time.perf_counter()
        deadline = t_start + time_budget_s - SAVE_RESERVE_S
        before, after, measured_voxels = _measure_newest_first(model, candidate, list(zip(queued_cases, cases)),
                                                               known_before, written, deadline)
        cache.save_scores(model, before)
        cache.save_scores(candidate, after)
        cache.save_gate_pace({"validation_cases": report["base_validation_cases"], "validation_s": t_queued - t_gate,
                              "queued_seconds_per_voxel": (time.perf_counter() - t_queued) / max(measured_voxels, 1)})
        if len(after) < len(queued_cases):
            log(f"the gate measured the newest {len(after)} of {len(queued_cases)} queued cases (time budget)")
        names = [c["name"] for c in card["classes"]]
        report.update(
            evaluated_cases=list(after),  # newest first
            queue_before=_mean_per_class({c: before[c] for c in after}, names),
            queue_after=_mean_per_class(after, names),
            queue_before_per_case={c: before[c] for c in after},
            queue_after_per_case=after,
        )
        total_s = time.perf_counter() - t_start
        report["time_s"] = {"budget": time_budget_s, "total": round(total_s, 1), "preparation": round(prepared_s, 1),
                            "training": round(train_s, 1), "validation": round(time.perf_counter() - t_gate, 1)}
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
    log(f"{card['name']}@{version}: {'ACTIVATED' if promoted else 'kept, not activated'}: {reason} "
        f"({total_s:.0f}s of a {time_budget_s:.0f}s budget)")
    return FinetuneResult(load_model(folder), promoted, reason, report)


@contextlib.contextmanager
def _staging_folder(folder: Path):
    """A hidden folder beside ``folder`` to build a version in, removed if the run fails; staging
    folders that a killed run left behind go once they are :data:`STALE_STAGING_S` old."""
    now = time.time()
    for stale in folder.parent.glob(".*.partial"):
        try:
            if now - stale.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass  # removed by another run meanwhile
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _measure_newest_first(model: LoadedModel, candidate: LoadedModel, queued: list[tuple[CaseFiles, TrainingCase]],
                          known_before: dict, written: dict, deadline: float) -> tuple[dict, dict, int]:
    """Dice per class of the base model (where not known) and of the candidate on the queued
    cases, newest first, as long as the next case fits before ``deadline`` (at the pace of those
    measured so far; the newest case always). Returns (before, after) by case id, and the
    model-grid voxels segmented."""
    before = {c.case_id: known_before[c.case_id] for c, _ in queued if c.case_id in known_before}
    after: dict[str, dict] = {}
    seconds, voxels = 0.0, 0
    for case_files, case in reversed(queued):
        passes = 1 if case_files.case_id in before else 2
        if after and time.perf_counter() + seconds / voxels * case.image.size * passes > deadline:
            break
        t0 = time.perf_counter()
        if case_files.case_id not in before:
            before.update(evaluate_cases(model, [case_files], written)["per_case_dice"])
        after.update(evaluate_cases(candidate, [case_files], written)["per_case_dice"])
        seconds += time.perf_counter() - t0
        voxels += case.image.size * passes
    return before, after, voxels


def _network_seconds_per_voxel(model: LoadedModel, cases: list[TrainingCase], measured_s: float) -> float:
    """Seconds the network takes per model-grid voxel: from the passes just made, else timed on
    a few slices of the newest case."""
    voxels = sum(case.image.size for case in cases)
    if measured_s > 0.5:
        return measured_s / voxels
    case = cases[-1]
    idx = np.arange(min(8, case.image.shape[0]))
    network = inference_network(model.network)
    batch = torch.from_numpy(neighbour_stack(case.image, idx, model.preprocess.neighbours))
    with torch.inference_mode():
        network(batch[:2])  # the first call sets up kernels
        t0 = time.perf_counter()
        network(batch)
        return (time.perf_counter() - t0) / (len(idx) * case.image[0].size)


def _mean_per_class(per_case: dict[str, dict], names: list[str]) -> dict[str, float]:
    return {n: float(np.mean([scores[n] for scores in per_case.values()])) for n in names}


def validation_reference(card: dict, cases: list[str]) -> Optional[dict]:
    """The scores a fine-tuned model must stay within tolerance of: those of the first model of
    its line (carried in each fine-tuned card) when measured on the same cases; None where the
    base model is the first of its line or the cases differ (then the base model's own, measured).
    So fine-tune after fine-tune cannot drift from the original domain a little at a time."""
    lineage = card.get("promotion", {})
    if lineage.get("base_validation_cases") == cases and lineage.get("base_validation_before"):
        return lineage["base_validation_before"]
    return None


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
