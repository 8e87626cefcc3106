"""Review guidance: which slices an operator should look at first.

The model's own hesitation is the signal: :class:`segmenter.SegmentationResult` counts, per axial
slice, the voxels whose winning class probability is below 0.9. Slices are ranked by that count;
benchmarks/bench_guidance.py measures on held-out cases how much of the real error the top of
the list holds.
"""

from __future__ import annotations

import math

import numpy as np

from ..io.volumes import Geometry
from .preprocessing import AxialReorientation


def slices_to_check(uncertainty: np.ndarray, fraction: float = 0.1, minimum: int = 1) -> list[int]:
    """Axial slice indices, most uncertain first: the top ``fraction`` of slices (at least
    ``minimum``), leaving out slices with no uncertain voxel."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = max(minimum, math.ceil(fraction * len(uncertainty)))
    order = np.argsort(-np.asarray(uncertainty), kind="stable")[:n]
    return [int(z) for z in order if uncertainty[z] > 0]


def axial_slice_positions(geometry: Geometry, shape: tuple[int, int, int]) -> np.ndarray:
    """LPS position (mm) of the centre of each axial slice, to jump a slice view there.

    Args:
        shape: the input array's (k, j, i) shape.
    """
    reorientation = AxialReorientation(geometry)
    source_axis = reorientation.axes[0]  # the input's numpy axis that runs inferior -> superior
    n = shape[source_axis]
    centre = np.array([s // 2 for s in shape], dtype=float)
    positions = []
    for z in range(n):
        centre[source_axis] = n - 1 - z if 0 in reorientation.flips else z
        k, j, i = centre
        positions.append((geometry.index_to_lps() @ np.array([i, j, k, 1.0]))[:3])
    return np.array(positions)


def error_share_in_top(uncertainty: np.ndarray, errors_per_slice: np.ndarray, fraction: float = 0.1) -> float:
    """Share of all error voxels that lie in the flagged slices (1.0 = every error is flagged)."""
    total = float(np.sum(errors_per_slice))
    if total == 0:
        return float("nan")
    flagged = slices_to_check(uncertainty, fraction)
    return float(np.sum(np.asarray(errors_per_slice)[flagged])) / total
