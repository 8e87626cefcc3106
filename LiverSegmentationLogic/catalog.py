"""Where models live and how they are named. Imports no torch, so the Slicer panel can list
models before its dependencies are installed."""

from __future__ import annotations

import os
from pathlib import Path

CARD_NAME = "model_card.json"
WEIGHTS_NAME = "model.pt"
DEFAULT_MODEL = "liver-mr-t2"


def resources_dir() -> Path:
    """The extension's ``Resources`` folder (next to the package in the repository)."""
    return Path(__file__).resolve().parent.parent / "Resources"


def models_dir() -> Path:
    """Where named models live; ``LIVERSEG_MODELS_DIR`` overrides the bundled folder."""
    return Path(os.environ.get("LIVERSEG_MODELS_DIR", resources_dir() / "Models"))


def model_names() -> list[str]:
    """Names of the models in :func:`models_dir`, the default first."""
    names = sorted(p.parent.name for p in models_dir().glob(f"*/{CARD_NAME}"))
    return sorted(names, key=lambda n: n != DEFAULT_MODEL)


def resolve_model_folder(model: str | os.PathLike | None = None) -> Path:
    """A model name (folder under :func:`models_dir`), a model folder or a card path -> folder.

    Raises:
        ModelNotFoundError: nothing with a model card at that name or path.
    """
    from .errors import ModelNotFoundError

    model = DEFAULT_MODEL if model is None else model
    candidates = [Path(model)]
    if not Path(model).is_absolute() and os.sep not in str(model) and "/" not in str(model):
        candidates.insert(0, models_dir() / str(model))
    for c in candidates:
        if c.is_file() and c.name == CARD_NAME:
            return c.parent
        if (c / CARD_NAME).is_file():
            return c
    raise ModelNotFoundError(
        f"No model found at {model!s} (looked for {CARD_NAME} in {', '.join(str(c) for c in candidates)}). "
        f"Known models: {', '.join(model_names()) or 'none'}"
    )
