"""Clean-up of predicted labelmaps: largest connected component, hole filling."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component of a boolean mask."""
    labelled, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == int(np.argmax(sizes))


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill holes in each axial slice (axis 0) of a (z, y, x) mask."""
    out = np.empty_like(mask, dtype=bool)
    for z in range(mask.shape[0]):
        out[z] = ndimage.binary_fill_holes(mask[z])
    return out


def postprocess_labels(labels: np.ndarray, rules: dict[int, dict]) -> np.ndarray:
    """Apply per-class rules to a (z, y, x) labelmap.

    Args:
        rules: ``{label: {"largest_component": bool, "fill_holes": bool}}``. Filled holes take the
            class's label only where they were background, so other classes are never overwritten.
            (A rule's ``threshold`` acts before, on the probabilities: see ``segmenter.decision_weights``.)
    """
    out = labels.copy()
    # each class's bounding box, all in one pass; they hold throughout, for a class's rules change
    # only its own voxels and background
    boxes = ndimage.find_objects(out)
    for label, rule in rules.items():
        if label > len(boxes) or boxes[label - 1] is None:
            continue
        # inside the class's bounding box only: its pieces lie there, and a hole in a slice cannot
        # reach the box's edge (nothing outside the box belongs to the class)
        box = out[boxes[label - 1]]  # a view: writes land in out
        mask = box == label
        if rule.get("largest_component"):
            keep = largest_component(mask)
            box[mask & ~keep] = 0
            mask = keep
        if rule.get("fill_holes"):
            filled = fill_holes_per_slice(mask)
            box[filled & (box == 0)] = label
    return out
