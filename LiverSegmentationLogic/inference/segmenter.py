"""Running a model over a whole volume: batches of 2.5D slices, progress, cancel, postprocessing,
result on the input grid."""

from __future__ import annotations

import os
import time
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import CancelledError, InvalidImageError, ModelLoadError
from ..io.volumes import Volume, channel_array, crop_volume, validate_volume
from ..models.model_files import LoadedModel
from ..models.network import inference_network
from ..models.tasks import valid_threshold
from .contrast_check import CONTRAST_GAMMAS, contrast_agreement, contrast_check_enabled, with_gamma
from .postprocessing import postprocess_labels
from .preprocessing import grow_region, neighbour_stack, prepare_volume
from .results import UNCERTAIN_BELOW, ProgressCallback, SegmentationResult


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU (using every core); or a torch device string."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was requested but no CUDA device is available; use --device cpu")
    if dev.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    return dev


PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX-512 BF16 or AMX). Elsewhere bf16 is
    emulated, and slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def bf16_validated(card: dict) -> bool:
    """Whether the model card records that bf16 labels were checked against fp32 and agree
    (``scripts/validate_precision.py``)."""
    return bool(card.get("precision", {}).get("bf16", {}).get("validated"))


def resolve_precision(precision: str, device: torch.device, card: dict) -> str:
    """``"auto"`` -> ``"bf16"`` on a CPU with native bf16 for a model validated in bf16, else
    ``"fp32"``; ``"fp32"`` and ``"bf16"`` as asked (bf16 then runs wherever torch can)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and native_bf16() and bf16_validated(card) else "fp32"


def _cancel_check(cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if hasattr(cancel, "is_set"):  # threading.Event / multiprocessing.Event
        return cancel.is_set
    return cancel


class Segmenter:
    """Segments volumes with one loaded model on one device.

    Args:
        model: a :class:`LoadedModel`.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        batch_size: slices per forward pass.
        channels_last: use the channels-last memory format (faster for convolutions on most CPUs
            and GPUs); ``None`` picks it on CUDA and on CPU.
        precision: ``"auto"``, ``"fp32"`` or ``"bf16"`` (see :func:`resolve_precision`); the
            network runs under ``torch.autocast`` in bf16, probabilities and labels stay fp32.
        contrast_check: also segment the image with its contrast bent, for the quality control
            (:mod:`contrast_check`; two more passes); ``None`` follows the model's card.
    """

    def __init__(self, model: LoadedModel, device="auto", batch_size: int = 8, channels_last: Optional[bool] = None,
                 precision: str = "auto", contrast_check: Optional[bool] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device, model.card)
        self.batch_size = batch_size
        self.contrast_check = contrast_check_enabled(model.card) if contrast_check is None else bool(contrast_check)
        self.channels_last = True if channels_last is None else channels_last
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.network = inference_network(model.network).to(self.device, memory_format=memory_format)
        self.config = model.preprocess
        own = set(model.output_labels)  # a cascade's card also lists its first stage's classes
        self.rules = {int(c["label"]): c.get("postprocessing", {}) for c in model.classes if c["label"] in own}
        # network output channel -> label written out (0 hides a class the network was trained on
        # only to tell it apart, e.g. spleen and kidneys in the liver model)
        n_out = model.network.config["n_classes"]
        self.output_labels = torch.as_tensor(model.output_labels, dtype=torch.uint8)
        if len(self.output_labels) != n_out:
            raise ValueError(f"model card output_labels has {len(self.output_labels)} entries for {n_out} outputs")
        # sums output probabilities per written label, so uncertainty is about what the user sees
        # (a liver-only model hesitating between spleen and background is not a liver question)
        self._to_written = torch.nn.functional.one_hot(self.output_labels.long()).float().to(self.device)
        self._decision_weights = decision_weights(model.output_labels, self.rules)
        if self._decision_weights is not None:
            self._decision_weights = self._decision_weights.to(self.device)
        self.roi = None
        cascade = model.card.get("cascade")
        if cascade:  # a second-stage model: its first stage is a model folder inside its own
            from ..models.model_files import load_model

            roi_model = load_model(model.folder / cascade.get("roi_model", "roi"), device=self.device)
            self.roi = Segmenter(roi_model, self.device, batch_size, channels_last, precision, contrast_check=False)
            roi_labels = [c["label"] for c in roi_model.classes if c["name"] == cascade["roi_class"]]
            if not roi_labels:
                raise ModelLoadError(f"{model.name_version}: its first stage has no class {cascade['roi_class']!r}")
            self.roi_label = int(roi_labels[0])
            self.roi_margin_mm = float(cascade.get("margin_mm", 10.0))

    def segment(
        self,
        volume: Union[Volume, Sequence[Volume]],
        progress: Optional[ProgressCallback] = None,
        cancel=None,
    ) -> SegmentationResult:
        """Segment a volume; the labelmap lands on the input grid.

        Args:
            volume: the input scan, or one scan per input channel of the model (in the order of
                the card's ``channels``, all on one grid).
            progress: called as ``progress(done_slices, total_slices, stage)``.
            cancel: a ``threading.Event``-like object or a callable; when set/true the work stops
                between batches with :class:`CancelledError`.
        """
        volumes = [volume] if isinstance(volume, Volume) else list(volume)
        n = self.config.channels
        if len(volumes) != n:
            names = ", ".join(self.model.card.get("channels", [])) or f"{n} image(s)"
            raise InvalidImageError(f"Model {self.model.name_version} takes {n} input image(s) ({names}), "
                                    f"got {len(volumes)}")
        for i, v in enumerate(volumes):
            validate_volume(v, name=f"input image {i + 1}" if n > 1 else "image")
            if i and (v.array.shape != volumes[0].array.shape or not v.geometry.allclose(volumes[0].geometry)):
                raise InvalidImageError(f"Input image {i + 1} is not on the grid of input image 1")
        run = self._segment_stage if self.roi is None else self._segment_cascade
        is_cancelled = _cancel_check(cancel)
        result = run(volumes, progress, is_cancelled)
        if self.contrast_check:
            t0 = time.perf_counter()
            bent = [run([with_gamma(v, gamma) for v in volumes],
                        _staged(progress, f"(contrast check {i} of {len(CONTRAST_GAMMAS)})"), is_cancelled).labels
                    for i, gamma in enumerate(CONTRAST_GAMMAS, start=1)]
            result.contrast_agreement = contrast_agreement(result.labels, bent, [c["label"] for c in result.classes])
            result.timings["contrast check"] = time.perf_counter() - t0
        return result

    def _segment_cascade(self, volumes: list[Volume], progress, is_cancelled) -> SegmentationResult:
        """First stage: the ROI model (e.g. liver); second: this model inside the ROI (e.g. lesions)."""
        first = self.roi._segment_stage(volumes, _staged(progress, "1/2"), is_cancelled)
        labels = first.labels.copy()
        uncertain = first.uncertain_by_label
        roi = labels == self.roi_label
        timings = {f"{k} (stage 1)": v for k, v in first.timings.items()}
        if roi.any():
            grown, box = grow_region(roi, volumes[0].geometry.spacing[::-1], self.roi_margin_mm)
            second = self._segment_stage([crop_volume(v, box) for v in volumes], _staged(progress, "2/2"),
                                         is_cancelled, roi_mask=grown[box])
            inside = roi[box] & (second.labels > 0)
            labels[box][inside] = second.labels[inside]  # labels[box] is a view: writes into labels
            timings.update({f"{k} (stage 2)": v for k, v in second.timings.items()})
            uncertain = first.uncertain_by_label + second.uncertain_by_label
        return SegmentationResult(
            labels=labels,
            geometry=volumes[0].geometry,
            classes=self.model.classes,
            model=dict(self._model_record(), roi_model=first.model),
            timings=timings,
            slice_uncertainty=first.slice_uncertainty,
            uncertain_by_label=uncertain,
        )

    def _model_record(self) -> dict:
        """What made a result: name, version, weights hash, and the task and modality it serves
        (the panel files corrected cases by them)."""
        card = self.model.card
        return {**{k: card[k] for k in ("name", "version", "sha256")}, "task": card.get("task", card["name"]),
                "modality": card.get("modality", ""), "precision": self.precision}

    def _segment_stage(self, volumes: list[Volume], progress, is_cancelled, roi_mask=None) -> SegmentationResult:
        """This model's network over the whole of ``volumes`` (one per channel, validated)."""
        timings = {}
        t0 = time.perf_counter()
        prepared = prepare_volume(channel_array(volumes), volumes[0].geometry, self.config, roi_mask=roi_mask)
        timings["preprocess"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        n_slices = prepared.axial_shape[0]
        axial_labels = np.zeros(prepared.axial_shape, dtype=np.uint8)
        uncertainty = np.zeros(n_slices, dtype=np.int64)
        uncertain_by_label = np.zeros(256, dtype=np.int64)
        k = self.config.neighbours
        bf16 = self.precision == "bf16"
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            for start in range(0, n_slices, self.batch_size):
                if is_cancelled():
                    raise CancelledError(f"Segmentation cancelled after {start} of {n_slices} slices")
                idx = np.arange(start, min(start + self.batch_size, n_slices))
                batch = torch.from_numpy(neighbour_stack(prepared.image, idx, k)).to(self.device)
                if self.channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                logits = self.network(batch).float()
                probs = torch.softmax(prepared.to_input_grid(logits), dim=1)
                label = (probs if self._decision_weights is None else probs * self._decision_weights).argmax(dim=1)
                axial_labels[idx] = self.output_labels[label.cpu()].numpy()
                written = torch.einsum("bchw,cl->blhw", probs, self._to_written).amax(dim=1)
                uncertain = (written < UNCERTAIN_BELOW).cpu().numpy()
                uncertainty[idx] = uncertain.sum(axis=(1, 2))
                uncertain_by_label += np.bincount(axial_labels[idx][uncertain], minlength=256)
                if progress:
                    progress(int(idx[-1]) + 1, n_slices, "inference")
        timings["inference"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        axial_labels = postprocess_labels(axial_labels, self.rules)
        labels = np.ascontiguousarray(prepared.reorientation.inverse(axial_labels))
        timings["postprocess"] = time.perf_counter() - t0
        return SegmentationResult(
            labels=labels,
            geometry=volumes[0].geometry,
            classes=self.model.classes,
            model=self._model_record(),
            timings=timings,
            slice_uncertainty=uncertainty,
            uncertain_by_label=uncertain_by_label,
        )


def decision_weights(output_labels: list[int], rules: dict[int, dict]) -> Optional[torch.Tensor]:
    """Weights on the output probabilities before the argmax, from the classes' ``threshold``
    (postprocessing rule): a class with threshold ``t`` wins over background where its probability
    reaches ``t`` (its odds against background are weighed by ``(1 - t) / t``); without one the most
    probable class wins. ``None`` when no class sets a threshold. Shaped (1, channels, 1, 1)."""
    weights = [1.0] * len(output_labels)
    for channel, label in enumerate(output_labels):
        t = rules.get(int(label), {}).get("threshold") if label else None
        if t is None:
            continue
        if not valid_threshold(t):
            raise ModelLoadError(f"class {label}: threshold must be a number between 0 and 1, got {t!r}")
        weights[channel] = (1 - t) / t
    if weights == [1.0] * len(output_labels):
        return None
    return torch.tensor(weights, dtype=torch.float32).view(1, -1, 1, 1)


def _staged(progress: Optional[ProgressCallback], stage: str) -> Optional[ProgressCallback]:
    """Progress of one stage of a cascade, named e.g. "inference 1/2"."""
    if progress is None:
        return None
    return lambda done, total, name: progress(done, total, f"{name} {stage}")
