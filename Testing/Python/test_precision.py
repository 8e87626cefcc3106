"""Reduced precision: bf16 only where the CPU has it natively and the model card says bf16 was
validated; a card's claim holds on real data."""

import json

import numpy as np
import pytest
import torch

from LiverSegmentationLogic.inference.segmenter import Segmenter, bf16_validated, native_bf16, resolve_precision
from LiverSegmentationLogic.io.volumes import Volume, read_volume
from LiverSegmentationLogic.models.catalog import CARD_NAME, models_dir
from LiverSegmentationLogic.models.model_files import load_model
from LiverSegmentationLogic.readouts.metrics import dice

VALIDATED = {"precision": {"bf16": {"validated": True}}}
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_bf16_only_on_a_native_cpu_for_a_validated_model(monkeypatch):
    import LiverSegmentationLogic.inference.segmenter as segmenter

    monkeypatch.setattr(segmenter, "native_bf16", lambda: True)
    assert resolve_precision("auto", CPU, VALIDATED) == "bf16"
    assert resolve_precision("auto", CPU, {}) == "fp32"  # never checked
    assert resolve_precision("auto", CPU, {"precision": {"bf16": {"validated": False}}}) == "fp32"
    assert resolve_precision("auto", CUDA, VALIDATED) == "fp32"
    monkeypatch.setattr(segmenter, "native_bf16", lambda: False)
    assert resolve_precision("auto", CPU, VALIDATED) == "fp32"  # emulated bf16 is slower than fp32
    assert resolve_precision("bf16", CPU, {}) == "bf16" and resolve_precision("fp32", CPU, VALIDATED) == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", CPU, {})


def test_the_result_says_which_precision_made_it(sample_case):
    image, _ = sample_case
    model = load_model("liver-mr-t2")
    auto = Segmenter(model, device="cpu")
    assert auto.precision == ("bf16" if native_bf16() and bf16_validated(model.card) else "fp32")
    result = Segmenter(model, device="cpu", precision="fp32").segment(Volume(image.array[14:17], image.geometry))
    assert result.model["precision"] == "fp32"


def _shipped_cards():
    return sorted(models_dir().glob(f"*/{CARD_NAME}"))


def _one_case(card: dict):
    """A real case of the model's domain: the bundled MR sample, or the smallest LiTS CT patient."""
    from LiverSegmentationLogic.io.sample import sample_paths

    from conftest import LITS_CT, require

    if card.get("modality") == "MR":
        image, label = sample_paths()
        return image, label, {"liver": [1], "right kidney": [2], "left kidney": [3], "spleen": [4]}
    lits = require(LITS_CT)
    return lits / "image_1.nii.gz", lits / "label_1.nii.gz", {"liver": [1, 2], "lesion": [2]}


@pytest.mark.parametrize("card_path", _shipped_cards(), ids=lambda p: p.parent.name)
def test_a_card_that_says_bf16_is_validated_is_right_on_a_real_case(card_path):
    """The card's claim (written by scripts/validate_precision.py over every available patient)
    is checked again here on one real case per model: bf16 changes no class's Dice against the
    reference by more than 0.001. A model whose card does not claim it runs in fp32 under auto."""
    card = json.loads(card_path.read_text())
    record = card.get("precision", {}).get("bf16")
    if not record or not record.get("validated"):
        pytest.skip(f"{card['name']}: the card does not claim bf16 (auto runs it in fp32)")
    image_path, label_path, reference = _one_case(card)
    model = load_model(card_path.parent)
    image = read_volume(image_path)
    truth = np.rint(read_volume(label_path, validate=False).array).astype(np.int64)
    fp32 = Segmenter(model, device="cpu", precision="fp32").segment(image).labels
    bf16 = Segmenter(model, device="cpu", precision="bf16").segment(image).labels
    for c in model.classes:
        ref = np.isin(truth, reference[c["name"]])
        difference = abs(dice(bf16 == c["label"], ref) - dice(fp32 == c["label"], ref))
        assert difference <= 0.001, (c["name"], difference)
