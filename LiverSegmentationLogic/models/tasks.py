"""Segmentation tasks as declarative JSON files: what to segment, from which images, and how.

A task file (``Resources/Tasks/<name>.json``, or ``<home>/tasks/<name>.json`` for tasks added by
users, see :func:`io.locations.home_dir`) holds::

    {
      "name": "liver-mr-t2",                    # also the name of its models in the registry
      "description": "...",
      "modality": "MR",
      "channels": ["T2"],                        # input images per case, in order (multi-channel: Dixon...)
      "preprocessing": {"spacing_xy": [2, 2], "neighbours": 2,
                        "intensity": {"method": "percentile", "lower": 0.5, "upper": 99.5}},
      "classes": [                               # network classes 1..n, in order
        {"name": "liver", "postprocessing": {"largest_component": true, "fill_holes": true}},
        {"name": "spleen", "show": false}        # learnt to tell it apart, not written out
      ],
      "label_map": {"1": 1, "4": 2},             # dataset label value -> network class
      "readouts": ["volume", "fat_fraction"],    # also "lesions"
      "network": {"width": 16, "depth": 4, "dropout": 0.1},
      "quality": {"contrast_check": true},       # also segment the image with its contrast bent (QC)
      "training": {"epochs": 60, "class_weights": "balanced", "validation_cases": ["2", "21"]},
      "cascade": {"roi_task": "liver-ct", "roi_class": "liver", "roi_labels": [1, 2], "margin_mm": 10}
    }

A class may give ``label`` (the value written out; default its network index), ``color``,
``postprocessing`` (``largest_component``, ``fill_holes``, and ``threshold``: the probability at
which the class wins over background; without it the most probable class wins) and
``terminology`` (defaults from :mod:`anatomy` for known structure names). ``cascade`` makes a second
stage: the ROI task's model segments first, this task's network then sees only the image inside
that class (``roi_labels``: the dataset values that make up the ROI when training).

Reading tasks needs no torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .anatomy import STRUCTURES, class_entry
from ..io.locations import home_dir, resources_dir
from ..errors import LiverSegError

KNOWN_READOUTS = {"volume", "fat_fraction", "lesions"}


class TaskError(LiverSegError):
    """A task file is missing or invalid."""


def task_dirs() -> list[Path]:
    """Where task files are looked up: the bundled ones, then the user's (which may override)."""
    return [resources_dir() / "Tasks", home_dir() / "tasks"]


@dataclass(frozen=True)
class Task:
    """A parsed task file."""

    spec: dict
    path: Optional[Path] = None

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def channels(self) -> list[str]:
        return list(self.spec.get("channels", ["image"]))

    @property
    def cascade(self) -> Optional[dict]:
        return self.spec.get("cascade")

    @property
    def label_map(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.spec["label_map"].items()}

    @property
    def n_classes(self) -> int:
        """Network outputs, background included."""
        return len(self.spec["classes"]) + 1

    def preprocess_config(self):
        from .preprocess_config import PreprocessConfig

        d = dict(self.spec["preprocessing"])
        d.setdefault("channels", len(self.channels))
        d.setdefault("intensity", {"method": "percentile", "lower": 0.5, "upper": 99.5})
        return PreprocessConfig.from_dict(d)

    def class_entries(self) -> list[dict]:
        """The written-out classes as model-card entries (label, name, color, terminology, postprocessing)."""
        out = []
        for index, c in enumerate(self.spec["classes"], start=1):
            if not c.get("show", True):
                continue
            label = int(c.get("label", index))
            if c["name"] in STRUCTURES:
                entry = class_entry(label, c["name"], c.get("postprocessing"))
            else:
                entry = {"label": label, "name": c["name"], "color": [0.5, 0.5, 0.5], "terminology": None,
                         "postprocessing": c.get("postprocessing", {})}
            for key in ("color", "terminology"):
                if key in c:
                    entry[key] = c[key]
            out.append(entry)
        return out

    def output_labels(self) -> list[int]:
        """Network output index -> written label (0 for background and hidden classes)."""
        return [0] + [int(c.get("label", i)) if c.get("show", True) else 0
                      for i, c in enumerate(self.spec["classes"], start=1)]

    def card(self) -> dict:
        """The task part of a model card (training adds weights, metrics and provenance)."""
        return {
            "name": self.name,
            "task": self.name,
            "modality": self.spec.get("modality", ""),
            "description": self.spec.get("description", ""),
            "channels": self.channels,
            "classes": self.class_entries(),
            "output_labels": self.output_labels(),
            "preprocessing": self.preprocess_config().to_dict(),
            "readouts": list(self.spec.get("readouts", ["volume"])),
            **({"cascade": dict(self.cascade)} if self.cascade else {}),
            **({"quality": dict(self.spec["quality"])} if self.spec.get("quality") else {}),
        }

    def reference_values(self) -> dict[str, list[int]]:
        """Written class name -> the dataset label values it is scored against."""
        out = reference_values(self.class_entries(), self.output_labels(), self.label_map)
        if self.cascade:  # the region class, minus what this stage writes over it
            own = {v for values in out.values() for v in values}
            out[self.cascade["roi_class"]] = [v for v in self.cascade.get("roi_labels", [1]) if v not in own]
        return out

    def training_option(self, key: str, default=None):
        return self.spec.get("training", {}).get(key, default)


def reference_values(classes: list[dict], output_labels: list[int], label_map: dict[int, int]) -> dict[str, list[int]]:
    """Class name -> the dataset label values it is scored against: those the label map sends to
    the network outputs that write the class's label."""
    out = {}
    for c in classes:
        outputs = {i for i, label in enumerate(output_labels) if label == c["label"]}
        out[c["name"]] = sorted(src for src, dst in label_map.items() if dst in outputs)
    return out


def valid_threshold(value) -> bool:
    """A class's probability threshold (postprocessing ``threshold``): a number strictly between 0 and 1."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1


def validate_task(spec: dict, where: str = "task") -> None:
    """Raise :class:`TaskError` naming the first problem of a task spec."""
    def fail(msg):
        raise TaskError(f"{where}: {msg}")

    for key in ("name", "classes", "label_map", "preprocessing"):
        if key not in spec:
            fail(f"missing field {key!r}")
    if not spec["classes"] or not all(isinstance(c, dict) and "name" in c for c in spec["classes"]):
        fail("'classes' must be a non-empty list of objects with a 'name'")
    n = len(spec["classes"])
    try:
        label_map = {int(k): int(v) for k, v in spec["label_map"].items()}
    except (AttributeError, TypeError, ValueError):
        fail("'label_map' must map label values to class numbers, e.g. {\"1\": 1}")
    if any(not 0 <= v <= n for v in label_map.values()):
        fail(f"'label_map' values must be class numbers 0..{n}")
    unknown = set(spec.get("readouts", [])) - KNOWN_READOUTS
    if unknown:
        fail(f"unknown readouts {sorted(unknown)}; known: {sorted(KNOWN_READOUTS)}")
    if not spec.get("channels", ["image"]):
        fail("'channels' must list at least one input image")
    for c in spec["classes"]:
        threshold = (c.get("postprocessing") or {}).get("threshold")
        if threshold is not None and not valid_threshold(threshold):
            fail(f"class {c['name']!r}: 'threshold' must be a number between 0 and 1, got {threshold!r}")
    quality = spec.get("quality", {})
    if not isinstance(quality, dict) or not set(quality) <= {"contrast_check"} or not all(
            isinstance(v, bool) for v in quality.values()):
        fail("'quality' must be an object like {\"contrast_check\": true}")
    cascade = spec.get("cascade")
    if cascade is not None and not {"roi_task", "roi_class"} <= set(cascade):
        fail("'cascade' needs 'roi_task' and 'roi_class'")
    try:
        Task(spec).preprocess_config()
    except (KeyError, TypeError, ValueError) as exc:
        fail(f"bad 'preprocessing': {exc}")


def load_task_file(path: Union[str, os.PathLike]) -> Task:
    path = Path(path)
    try:
        spec = json.loads(path.read_text())
    except OSError as exc:
        raise TaskError(f"Cannot read task file {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise TaskError(f"Task file {path} is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise TaskError(f"Task file {path} must hold a JSON object")
    validate_task(spec, str(path))
    return Task(spec, path)


def list_tasks() -> list[Task]:
    """All tasks by name (a user task file overrides a bundled one of the same name)."""
    found = {}
    for folder in task_dirs():
        for path in sorted(folder.glob("*.json")):
            task = load_task_file(path)
            found[task.name] = task
    return [found[n] for n in sorted(found)]


def load_task(name_or_path: Union[str, os.PathLike]) -> Task:
    """A task by name or by file path.

    Raises:
        TaskError: unknown name, unreadable or invalid file.
    """
    if str(name_or_path).endswith(".json") or os.sep in str(name_or_path):
        return load_task_file(name_or_path)
    for task in list_tasks():
        if task.name == name_or_path:
            return task
    raise TaskError(f"Unknown task {name_or_path!r}. Tasks: {', '.join(t.name for t in list_tasks()) or 'none'}")
