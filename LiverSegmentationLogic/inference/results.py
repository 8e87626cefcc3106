"""What inference hands back, without torch: the remote client builds the same result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

#: a voxel whose winning class probability is below this counts as uncertain
UNCERTAIN_BELOW = 0.9

#: progress(done, total, stage) is called as work advances
ProgressCallback = Callable[[int, int, str], None]


@dataclass
class SegmentationResult:
    """A labelmap on the input grid, with what made it."""

    labels: np.ndarray  # (k, j, i) uint8, same shape as the input
    geometry: "object"  # io.volumes.Geometry of the input
    classes: list[dict]
    model: dict  # name, version, sha256 of the weights
    timings: dict = field(default_factory=dict)  # seconds per stage
    #: per axial slice (in the reoriented S-P-L order, see preprocessing.AxialReorientation), the
    #: number of voxels whose winning class probability is below UNCERTAIN_BELOW: where the model
    #: hesitates, mostly along boundaries it is unsure of (see guidance.slices_to_check)
    slice_uncertainty: Optional[np.ndarray] = None
    #: per written label value (index 0-255), how many of the voxels the network gave that label
    #: were uncertain (before postprocessing): the share of a structure the model hesitated on
    uncertain_by_label: Optional[np.ndarray] = None
    #: per written label value, the segmentation's lowest Dice with itself on the image with its
    #: contrast bent (see inference.contrast_check); None when the check was not run
    contrast_agreement: Optional[dict] = None
