"""Running a model over a whole volume: batches of 2.5D slices, progress, cancel, postprocessing,
result on the input grid."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .errors import CancelledError
from .imageio import Volume, validate_volume
from .models import LoadedModel
from .postprocessing import postprocess_labels
from .preprocessing import neighbour_stack, prepare_volume

#: a voxel whose winning class probability is below this counts as uncertain
UNCERTAIN_BELOW = 0.9

#: progress(done, total, stage) is called as work advances
ProgressCallback = Callable[[int, int, str], None]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
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


def _cancel_check(cancel) -> Callable[[], bool]:
    if cancel is None:
        return lambda: False
    if hasattr(cancel, "is_set"):  # threading.Event / multiprocessing.Event
        return cancel.is_set
    return cancel


@dataclass
class SegmentationResult:
    """A labelmap on the input grid, with what made it."""

    labels: np.ndarray  # (k, j, i) uint8, same shape as the input
    geometry: "object"  # imageio.Geometry of the input
    classes: list[dict]
    model: dict  # name, version, sha256 of the weights
    timings: dict = field(default_factory=dict)  # seconds per stage
    #: per axial slice (in the reoriented S-P-L order, see preprocessing.AxialReorientation), the
    #: number of voxels whose winning class probability is below UNCERTAIN_BELOW: where the model
    #: hesitates, mostly along boundaries it is unsure of (see guidance.slices_to_check)
    slice_uncertainty: Optional[np.ndarray] = None


class Segmenter:
    """Segments volumes with one loaded model on one device.

    Args:
        model: a :class:`LoadedModel`.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        batch_size: slices per forward pass.
        channels_last: use the channels-last memory format (faster for convolutions on most CPUs
            and GPUs); ``None`` picks it on CUDA and on CPU.
    """

    def __init__(self, model: LoadedModel, device="auto", batch_size: int = 8, channels_last: bool | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.channels_last = True if channels_last is None else channels_last
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.network = model.network.to(self.device, memory_format=memory_format).eval()
        self.config = model.preprocess
        self.rules = {int(c["label"]): c.get("postprocessing", {}) for c in model.classes}
        # network output channel -> label written out (0 hides a class the network was trained on
        # only to tell it apart, e.g. spleen and kidneys in the liver model)
        n_out = model.network.config["n_classes"]
        self.output_labels = torch.as_tensor(model.card.get("output_labels", list(range(n_out))), dtype=torch.uint8)
        if len(self.output_labels) != n_out:
            raise ValueError(f"model card output_labels has {len(self.output_labels)} entries for {n_out} outputs")
        # sums output probabilities per written label, so uncertainty is about what the user sees
        # (a liver-only model hesitating between spleen and background is not a liver question)
        self._to_written = torch.nn.functional.one_hot(self.output_labels.long()).float().to(self.device)

    def segment(
        self,
        volume: Volume,
        progress: Optional[ProgressCallback] = None,
        cancel=None,
    ) -> SegmentationResult:
        """Segment a volume; the labelmap lands on the input grid.

        Args:
            volume: the input scan.
            progress: called as ``progress(done_slices, total_slices, "inference")``.
            cancel: a ``threading.Event``-like object or a callable; when set/true the work stops
                between batches with :class:`CancelledError`.
        """
        validate_volume(volume)
        is_cancelled = _cancel_check(cancel)
        timings = {}
        t0 = time.perf_counter()
        prepared = prepare_volume(volume.array, volume.geometry, self.config)
        timings["preprocess"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        n_slices = prepared.image.shape[0]
        axial_labels = np.zeros(prepared.axial_shape, dtype=np.uint8)
        uncertainty = np.zeros(n_slices, dtype=np.int64)
        k = self.config.neighbours
        with torch.inference_mode():
            for start in range(0, n_slices, self.batch_size):
                if is_cancelled():
                    raise CancelledError(f"Segmentation cancelled after {start} of {n_slices} slices")
                idx = np.arange(start, min(start + self.batch_size, n_slices))
                batch = torch.from_numpy(neighbour_stack(prepared.image, idx, k)).to(self.device)
                if self.channels_last:
                    batch = batch.contiguous(memory_format=torch.channels_last)
                logits = self.network(batch).float()
                probs = torch.softmax(prepared.to_input_grid(logits), dim=1)
                label = probs.argmax(dim=1)
                axial_labels[idx] = self.output_labels[label.cpu()].numpy()
                written = torch.einsum("bchw,cl->blhw", probs, self._to_written).amax(dim=1)
                uncertainty[idx] = (written < UNCERTAIN_BELOW).sum(dim=(1, 2)).cpu().numpy()
                if progress:
                    progress(int(idx[-1]) + 1, n_slices, "inference")
        timings["inference"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        axial_labels = postprocess_labels(axial_labels, self.rules)
        labels = np.ascontiguousarray(prepared.reorientation.inverse(axial_labels))
        timings["postprocess"] = time.perf_counter() - t0
        return SegmentationResult(
            labels=labels,
            geometry=volume.geometry,
            classes=self.model.classes,
            model={
                "name": self.model.card["name"],
                "version": self.model.card["version"],
                "sha256": self.model.card["sha256"],
            },
            timings=timings,
            slice_uncertainty=uncertainty,
        )
