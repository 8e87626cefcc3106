"""Where models live, how they are named, and which one is active: the model registry.

Imports no torch, so the Slicer panel can list models before its dependencies are installed.

Two places hold models, each a folder with ``model_card.json`` + ``model.pt``:

- the **bundled** models shipped in ``Resources/Models/<name>`` (read-only);
- the **registry** of models trained or fine-tuned here: ``<home>/models/<name>/<version>``, with
  ``<home>/models/active.json`` naming the active version of each model name (task).

A model is referred to as ``name`` (the active version of that task, else the bundled one),
``name@version``, or a folder / card path. ``<home>`` is ``LIVERSEG_HOME`` or ``~/.liverseg``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..io.locations import home_dir, resources_dir

CARD_NAME = "model_card.json"
WEIGHTS_NAME = "model.pt"
DEFAULT_MODEL = "liver-mr-t2"
ACTIVE_NAME = "active.json"


def models_dir() -> Path:
    """The bundled models; ``LIVERSEG_MODELS_DIR`` overrides the folder shipped in ``Resources``."""
    return Path(os.environ.get("LIVERSEG_MODELS_DIR", resources_dir() / "Models"))


def registry_dir() -> Path:
    return home_dir() / "models"


@dataclass(frozen=True)
class ModelEntry:
    """One model version known to the registry."""

    name: str
    version: str
    folder: Path
    bundled: bool
    card: dict

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def _read_card(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / CARD_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def list_models() -> list[ModelEntry]:
    """Every bundled and registered model version (unreadable cards are skipped)."""
    entries = []
    for card_path in sorted(models_dir().glob(f"*/{CARD_NAME}")):
        card = _read_card(card_path.parent)
        if card:
            entries.append(ModelEntry(card.get("name", card_path.parent.name), str(card.get("version", "?")),
                                      card_path.parent, True, card))
    for card_path in sorted(registry_dir().glob(f"*/*/{CARD_NAME}")):
        card = _read_card(card_path.parent)
        if card:
            folder = card_path.parent
            entries.append(ModelEntry(folder.parent.name, folder.name, folder, False, card))
    return entries


def _active_file() -> Path:
    return registry_dir() / ACTIVE_NAME


def active_versions() -> dict[str, str]:
    """Model name -> active registered version (bundled models are active where none is set)."""
    try:
        return json.loads(_active_file().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def active_models() -> dict[str, ModelEntry]:
    """Model name -> its active version: the registered one set active, else the bundled one
    (every card read once, for listings of many names)."""
    chosen = active_versions()
    active = {}
    for e in list_models():
        if (e.bundled and e.name not in active) or (not e.bundled and chosen.get(e.name) == e.version):
            active[e.name] = e
    return active


def active_model(name: str) -> Optional[ModelEntry]:
    """The active version of a model name (see :func:`active_models`), None if it has none."""
    return active_models().get(name)


def activate(ref: str) -> ModelEntry:
    """Make ``name@version`` (or a bundled ``name``, which clears the registry choice) active.

    Raises:
        ModelNotFoundError: no such model version.
    """
    entry = find_model(ref)
    active = active_versions()
    if entry.bundled:
        active.pop(entry.name, None)
    else:
        active[entry.name] = entry.version
    path = _active_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(active, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)  # atomic: readers see the old or the new choice, never half
    return entry


def find_model(ref: str) -> ModelEntry:
    """``name`` (active version) or ``name@version`` -> registry entry.

    Raises:
        ModelNotFoundError: unknown name or version.
    """
    from ..errors import ModelNotFoundError

    name, _, version = str(ref).partition("@")
    if not version:
        entry = active_model(name)
        if entry is None:
            raise ModelNotFoundError(f"No model named {name!r}. Known models: {', '.join(model_names()) or 'none'}")
        return entry
    same_name = [e for e in list_models() if e.name == name]
    for e in same_name:
        if e.version == version:
            return e
    versions = [e.version for e in same_name]
    raise ModelNotFoundError(
        f"No version {version!r} of model {name!r}" + (f"; versions: {', '.join(versions)}" if versions else "")
    )


def model_names() -> list[str]:
    """Distinct model names (tasks with a model), the default first."""
    names = sorted({e.name for e in list_models()})
    return sorted(names, key=lambda n: n != DEFAULT_MODEL)


def new_version_folder(name: str, base_version: str, tag: str) -> tuple[str, Path]:
    """A fresh registry folder ``<name>/<base_version>-<tag><n>`` (n counts up from 1)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"model name {name!r} may only hold letters, digits, '.', '_' and '-'")
    n = 1
    while (registry_dir() / name / f"{base_version}-{tag}{n}").exists():
        n += 1
    version = f"{base_version}-{tag}{n}"
    return version, registry_dir() / name / version


def resolve_model_folder(model: Optional[Union[str, os.PathLike]] = None) -> Path:
    """A model reference -> its folder: ``None`` (the active default model), ``name``,
    ``name@version``, a model folder or a card path.

    Raises:
        ModelNotFoundError: nothing with a model card at that name or path.
    """
    from ..errors import ModelNotFoundError

    model = DEFAULT_MODEL if model is None else model
    path = Path(model)
    if path.is_file() and path.name == CARD_NAME:
        return path.parent
    if (path / CARD_NAME).is_file() and (path.is_absolute() or os.sep in str(model) or "/" in str(model)):
        return path
    try:
        return find_model(str(model)).folder
    except ModelNotFoundError:
        if (path / CARD_NAME).is_file():  # a bare relative folder name in the working directory
            return path
        raise ModelNotFoundError(
            f"No model found at {model!s} (not a model name, name@version, or folder with {CARD_NAME}). "
            f"Known models: {', '.join(model_names()) or 'none'}"
        ) from None
