"""The contrast check: does a segmentation hold when the image's contrast is bent?

A confidently wrong structure (a spleen outlined where the spleen is not, every voxel of it sure)
passes the volume, shape, position and certainty checks of :mod:`readouts.quality`. On the MR
cross-validation such structures moved when the image's contrast was bent (gamma 0.7 and 1.4)
while well-segmented ones held (``benchmarks/bench_qc_signals.py``). The segmenter runs the
network on the two bent images and hands back, per structure, the lower Dice of the segmentation
with those two; the quality control flags a structure that moved. It costs two more passes of
the network, so a task turns it on (``"quality": {"contrast_check": true}``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..io.volumes import Volume
from ..readouts.metrics import dice

#: the contrast bends: darker and brighter mid-tones
CONTRAST_GAMMAS = (0.7, 1.4)


def contrast_check_enabled(card: dict) -> bool:
    """Whether a model's card (from its task) asks for the contrast check."""
    quality = card.get("quality")
    return isinstance(quality, dict) and quality.get("contrast_check") is True


def with_gamma(volume: Volume, gamma: float) -> Volume:
    """The volume with its contrast bent: intensities scaled to 0-1 between the 0.5th and 99.5th
    percentiles (below: 0), raised to ``gamma`` and scaled back, so that the model's own
    normalisation sees the same range with other mid-tones."""
    a = volume.array.astype(np.float32)
    lo, hi = np.percentile(a, [0.5, 99.5])
    if hi <= lo:
        return volume
    unit = np.clip((a - lo) / (hi - lo), 0, None)
    return Volume(unit ** gamma * (hi - lo) + lo, volume.geometry)


def contrast_agreement(labels: np.ndarray, bent: Sequence[np.ndarray], label_values: Sequence[int]) -> dict[int, float]:
    """Per label value present in ``labels``: the lowest Dice between it and the same label in
    each of the ``bent`` segmentations."""
    out = {}
    for value in label_values:
        mask = labels == value
        if mask.any():
            out[int(value)] = min(dice(mask, b == value) for b in bent)
    return out
