"""Where models live, how they are named, and which one is active: the model registry.

Imports no torch, so the Slicer panel can list models before its dependencies are installed.

Two places hold models, each a folder with ``model_card.json`` + ``model.pt``:

- the **bundled** models shipped in ``Resources/Models/<name>`` (read-only);
- the **registry** of models trained or fine-tuned here: ``<home>/models/<name>/<version>``, with
  ``<home>/models/active.json`` naming the active version of each model name (task), globally and
  per study (a study's fine-tuned line, ``<base>+<study>-ft<n>``, serves that study only), with
  the history that :func:`rollback` undoes.

A model is referred to as ``name`` (the active version of that task, for a study if one is given,
else the bundled one), ``name@version``, or a folder / card path. ``<home>`` is ``LIVERSEG_HOME``
or ``~/.liverseg``.
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
        if card_path.parent.name.startswith("."):
            continue  # a fine-tune's staging folder: not a version until renamed
        card = _read_card(card_path.parent)
        if card:
            folder = card_path.parent
            entries.append(ModelEntry(folder.parent.name, folder.name, folder, False, card))
    return entries


def _active_file() -> Path:
    return registry_dir() / ACTIVE_NAME


def study_tag(study: Optional[str]) -> Optional[str]:
    """A study (or site) name as it appears in versions and the registry: letters, digits and '-'
    (``"TRIAL 7/site-3"`` -> ``"TRIAL-7-site-3"``); None for no study."""
    if study is None or not str(study).strip():
        return None
    tag = re.sub(r"[^A-Za-z0-9]+", "-", str(study)).strip("-")[:64]
    if not tag:
        raise ValueError(f"study {study!r} holds no letter or digit")
    return tag


def _read_active() -> dict:
    """``{"global": {name: version}, "studies": {tag: {name: version}}, "history": {key: {name: [...]}}}``
    (an older flat ``{name: version}`` file reads as the global choice)."""
    try:
        raw = json.loads(_active_file().read_text())
    except (OSError, json.JSONDecodeError):
        raw = {}
    if not isinstance(raw, dict):
        raw = {}
    if not ({"global", "studies", "history"} & set(raw)):
        raw = {"global": raw}
    return {"global": dict(raw.get("global") or {}), "studies": dict(raw.get("studies") or {}),
            "history": dict(raw.get("history") or {})}


def _write_active(state: dict) -> None:
    path = _active_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)  # atomic: readers see the old or the new choice, never half


def active_versions(study: Optional[str] = None) -> dict[str, str]:
    """Model name -> active registered version for ``study`` (its own choices over the global
    ones); names with no registered choice use their bundled model."""
    state = _read_active()
    tag = study_tag(study)
    return {**state["global"], **(state["studies"].get(tag, {}) if tag else {})}


def active_models(study: Optional[str] = None) -> dict[str, ModelEntry]:
    """Model name -> its active version for ``study`` (or globally): the registered one set
    active, else the bundled one (every card read once, for listings of many names)."""
    chosen = active_versions(study)
    active = {}
    for e in list_models():
        if (e.bundled and e.name not in active) or (not e.bundled and chosen.get(e.name) == e.version):
            active[e.name] = e
    return active


def active_model(name: str, study: Optional[str] = None) -> Optional[ModelEntry]:
    """The active version of a model name (see :func:`active_models`), None if it has none."""
    return active_models(study).get(name)


def activate(ref: str, study: Optional[str] = None) -> ModelEntry:
    """Make ``name@version`` active, for one study or (without one) globally. A bundled
    ``name`` clears the choice: the study falls back to the global one, the global one to the
    bundled model. Every change is recorded, so :func:`rollback` can undo it.

    Raises:
        ModelNotFoundError: no such model version.
    """
    entry = find_model(ref)
    state = _read_active()
    tag = study_tag(study)
    history = state["history"].setdefault(tag or "", {}).setdefault(entry.name, [])
    history.append(_choose(state, tag, entry.name, None if entry.bundled else entry.version))
    _write_active(state)
    return entry


def rollback(name: str, study: Optional[str] = None) -> ModelEntry:
    """Undo the last :func:`activate` of ``name`` (for that study, or globally); returns what is
    active now.

    Raises:
        ModelNotFoundError: nothing to roll back.
    """
    from ..errors import ModelNotFoundError

    state = _read_active()
    tag = study_tag(study)
    history = state["history"].get(tag or "", {}).get(name) or []
    if not history:
        where = f"study {tag}" if tag else "the global choice"
        raise ModelNotFoundError(f"Nothing to roll back for {name} in {where}")
    _choose(state, tag, name, history.pop())
    _write_active(state)
    return active_model(name, study)


def _choose(state: dict, tag: Optional[str], name: str, version: Optional[str]) -> Optional[str]:
    """Set (or, with None, clear) the version chosen for ``name`` in a study (or globally);
    returns the one chosen before."""
    chosen = state["studies"].setdefault(tag, {}) if tag else state["global"]
    before = chosen.pop(name, None)
    if version is not None:
        chosen[name] = version
    if tag and not chosen:
        state["studies"].pop(tag)
    return before


def find_model(ref: str, study: Optional[str] = None) -> ModelEntry:
    """``name`` (the active version, for ``study`` if given) or ``name@version`` -> registry entry.

    Raises:
        ModelNotFoundError: unknown name or version.
    """
    from ..errors import ModelNotFoundError

    name, _, version = str(ref).partition("@")
    if not version:
        entry = active_model(name, study)
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


def origin_version(version: str) -> str:
    """The bundled or trained version a fine-tuned version descends from: 2.0.0+TRIAL7-ft2 and
    2.0.0-ft1 -> 2.0.0; a version's own hyphen stays (2.0.0-rc1+TRIAL7-ft2 -> 2.0.0-rc1)."""
    return re.sub(r"(\+.*)?-ft\d+$", "", version)


def new_version_folder(name: str, base_version: str, tag: str, study: Optional[str] = None) -> tuple[str, Path]:
    """A fresh registry folder ``<name>/<base_version>-<tag><n>``, or for a study's model line
    ``<name>/<base_version>+<study>-<tag><n>`` (n counts up from 1)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"model name {name!r} may only hold letters, digits, '.', '_' and '-'")
    study = study_tag(study)
    stem = f"{base_version}+{study}-{tag}" if study else f"{base_version}-{tag}"
    n = 1
    while (registry_dir() / name / f"{stem}{n}").exists():
        n += 1
    version = f"{stem}{n}"
    return version, registry_dir() / name / version


def resolve_model_folder(model: Optional[Union[str, os.PathLike]] = None, study: Optional[str] = None) -> Path:
    """A model reference -> its folder: ``None`` (the active default model), ``name`` (its active
    version, for ``study`` if given), ``name@version``, a model folder or a card path.

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
        return find_model(str(model), study).folder
    except ModelNotFoundError:
        if (path / CARD_NAME).is_file():  # a bare relative folder name in the working directory
            return path
        raise ModelNotFoundError(
            f"No model found at {model!s} (not a model name, name@version, or folder with {CARD_NAME}). "
            f"Known models: {', '.join(model_names()) or 'none'}"
        ) from None
