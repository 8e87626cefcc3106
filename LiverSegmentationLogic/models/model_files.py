"""Model files: weights + model card (JSON) in one folder, loaded safely and checked."""

from __future__ import annotations

from typing import Optional, Union

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .catalog import CARD_NAME, WEIGHTS_NAME, resolve_model_folder
from ..errors import ModelLoadError, ModelNotFoundError
from .network import build_network
from .preprocess_config import PreprocessConfig

CARD_SCHEMA_VERSION = 1


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class LoadedModel:
    """A ready network with its card."""

    network: nn.Module  # UNet2D or UNetEnsemble
    card: dict
    folder: Path

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.card["preprocessing"])

    @property
    def classes(self) -> list[dict]:
        """Foreground classes: dicts with label, name, color (0-1 RGB), terminology."""
        return self.card["classes"]

    @property
    def output_labels(self) -> list[int]:
        """Network output index -> written label (0 hides a class the network learnt only to tell
        it apart); every output writes its own index where the card does not say."""
        return list(self.card.get("output_labels") or range(self.network.config["n_classes"]))

    @property
    def name_version(self) -> str:
        return f"{self.card['name']} {self.card['version']}"


def load_model(
    model: Optional[Union[str, os.PathLike]] = None, device: Union[str, torch.device] = "cpu",
    study: Optional[str] = None,
) -> LoadedModel:
    """Load a model folder: read the card, check the weights' sha256, build the network.
    A model name resolves to its active version for ``study`` (see :mod:`catalog`).

    The weights are read with ``torch.load(weights_only=True)``: tensors only, no code.

    Raises:
        ModelNotFoundError: no card or no weights file.
        ModelLoadError: unreadable card, checksum mismatch, or weights that do not fit the network.
    """
    folder = resolve_model_folder(model, study)
    try:
        card = json.loads((folder / CARD_NAME).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"Model card {folder / CARD_NAME} is not valid JSON: {exc}") from exc
    for key in ("name", "version", "classes", "preprocessing", "network", "sha256"):
        if key not in card:
            raise ModelLoadError(f"Model card {folder / CARD_NAME} lacks the field {key!r}")
    weights = folder / card.get("weights", WEIGHTS_NAME)
    if not weights.is_file():
        raise ModelNotFoundError(f"Model weights missing: {weights}")
    actual = sha256_of(weights)
    if actual != card["sha256"]:
        raise ModelLoadError(
            f"Model weights {weights} are corrupt or were changed: sha256 {actual[:12]}... "
            f"does not match the card's {card['sha256'][:12]}..."
        )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        network = build_network(card["network"])
        network.load_state_dict({k: v.float() for k, v in state.items()})
    except Exception as exc:  # torch raises many types for bad files; all mean "corrupt"
        raise ModelLoadError(f"Cannot load model weights {weights}: {exc}") from exc
    network.eval().to(device)
    return LoadedModel(network, card, folder)


def save_model(folder: Union[str, os.PathLike], network: nn.Module, card: dict) -> Path:
    """Write weights (float16, to keep the file small) and the card with their sha256.

    Writes to temporary names and renames, so a crash leaves no half model.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in network.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    weights = folder / WEIGHTS_NAME
    tmp = weights.with_suffix(".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, weights)
    card = dict(card)
    card.update(
        schema_version=CARD_SCHEMA_VERSION,
        network=network.config,
        weights=WEIGHTS_NAME,
        sha256=sha256_of(weights),
    )
    tmp_card = folder / (CARD_NAME + ".tmp")
    tmp_card.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp_card, folder / CARD_NAME)
    return folder
