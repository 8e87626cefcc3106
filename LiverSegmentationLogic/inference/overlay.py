"""A PNG mosaic of axial slices with the segmentation outlined, for a quick visual check."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image
from scipy import ndimage

from ..io.volumes import Volume
from .preprocessing import AxialReorientation, normalise_intensity


def overlay_mosaic(
    volume: Volume,
    labels: np.ndarray,
    classes: Sequence[dict],
    path: Union[str, os.PathLike],
    n_slices: int = 12,
    columns: int = 4,
) -> Path:
    """Write ``n_slices`` axial slices through the segmented region, outlines in class colours.

    Slices are shown in the radiological convention (patient right on the image left).
    """
    reorient = AxialReorientation(volume.geometry)
    image = normalise_intensity(reorient.forward(volume.array), {"method": "percentile", "lower": 0.5, "upper": 99.5})
    lab = np.ascontiguousarray(reorient.forward(labels))
    occupied = np.flatnonzero(lab.reshape(lab.shape[0], -1).any(1))
    z_lo, z_hi = (occupied[0], occupied[-1]) if occupied.size else (0, lab.shape[0] - 1)
    zs = np.unique(np.linspace(z_lo, z_hi, min(n_slices, z_hi - z_lo + 1)).round().astype(int))
    # keep the physical aspect ratio of the in-plane pixels
    _, sy, sx = reorient.spacing_zyx
    h, w = image.shape[1:]
    out_h, out_w = int(round(h * sy / min(sx, sy))), int(round(w * sx / min(sx, sy)))
    tiles = []
    for z in zs:
        rgb = np.repeat(image[z][..., None], 3, axis=2)
        for cls in classes:
            mask = lab[z] == cls["label"]
            edge = mask & ~ndimage.binary_erosion(mask)
            edge = ndimage.binary_dilation(edge)  # 2-pixel outline, visible at any size
            rgb[edge] = cls["color"]
        tile = Image.fromarray((rgb * 255).astype(np.uint8)).resize((out_w, out_h), Image.NEAREST)
        tiles.append(np.asarray(tile))
    rows = -(-len(tiles) // columns)
    canvas = np.zeros((rows * out_h, min(columns, len(tiles)) * out_w, 3), dtype=np.uint8)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, columns)
        canvas[r * out_h : (r + 1) * out_h, c * out_w : (c + 1) * out_w] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path
