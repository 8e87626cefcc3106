"""Reversible preprocessing: axial reorientation, normalisation, in-plane resampling, padding,
2.5D neighbour-slice input.

Every forward step has an inverse so that a prediction made on the model grid lands back on the
input grid voxel for voxel.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..errors import InvalidImageError
from ..io.volumes import Geometry
from ..models.preprocess_config import PreprocessConfig



class AxialReorientation:
    """Permute and flip array axes so that numpy axes are (S, P, L): axial slices along axis 0,
    rows running anterior to posterior, columns right to left (the radiological view).

    Only axis permutations and flips are used (no interpolation), so the inverse is exact. For an
    oblique scan the closest axis assignment is chosen.
    """

    def __init__(self, geometry: Geometry):
        d = np.abs(geometry.direction_matrix)
        # index axis a (0=i, 1=j, 2=k) -> world axis best[a] (0=x/L, 1=y/P, 2=z/S)
        best = max(itertools.permutations(range(3)), key=lambda p: sum(d[p[a], a] for a in range(3)))
        signs = [np.sign(geometry.direction_matrix[best[a], a]) or 1.0 for a in range(3)]
        axes = [0, 0, 0]
        flips = []
        spacing_world = [0.0, 0.0, 0.0]
        for a in range(3):
            new_axis = 2 - best[a]
            axes[new_axis] = 2 - a  # numpy axis of index axis a
            spacing_world[best[a]] = geometry.spacing[a]
            if signs[a] < 0:
                flips.append(new_axis)
        self.axes = tuple(axes)
        self.flips = tuple(sorted(flips))
        self.inverse_axes = tuple(int(i) for i in np.argsort(self.axes))
        #: spacing of the reoriented array along (z, y, x), mm
        self.spacing_zyx = (spacing_world[2], spacing_world[1], spacing_world[0])

    def forward(self, array: np.ndarray) -> np.ndarray:
        """Input (k, j, i) array (optionally with leading channel axes) -> (z, y, x)."""
        lead = array.ndim - 3
        out = np.transpose(array, tuple(range(lead)) + tuple(lead + a for a in self.axes))
        if self.flips:
            out = np.flip(out, axis=tuple(lead + f for f in self.flips))
        return out

    def inverse(self, array: np.ndarray) -> np.ndarray:
        """(z, y, x) array (optionally with leading channel axes) -> input (k, j, i) order."""
        lead = array.ndim - 3
        if self.flips:
            array = np.flip(array, axis=tuple(lead + f for f in self.flips))
        return np.transpose(array, tuple(range(lead)) + tuple(lead + a for a in self.inverse_axes))


#: CT in Hounsfield units: nothing real is darker than air (-1000 HU). Scanners write -2048 or
#: -3024 outside the reconstructed circle (DICOM's padding value); left there, those voxels
#: (a fifth of a 512 x 512 slice) would set the lower percentile and squeeze the soft tissue
#: into a few grey levels (the shipped CT model on the CHAOS CT case, one of its training cases:
#: liver Dice 0.976 -> 0.580 once padded with -3024). Images already windowed to 0-255, and MR,
#: never go below 0.
HU_AIR = -1024.0


def normalise_intensity(array: np.ndarray, intensity: dict, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Clip (to percentiles or a window) and rescale to 0-1, as float32. Voxels darker than
    air (:data:`HU_AIR`, CT padding) count as air.

    Args:
        intensity: see :class:`models.preprocess_config.PreprocessConfig`. A window with
            ``windowed_range`` [a, b] takes an image whose values all lie in [a, b] as already
            windowed by its publisher (LiTS-derived CT stored as 0-255) and maps [a, b] to 0-1;
            any other image is taken as Hounsfield units and clipped to the window.
        mask: when given, percentiles are taken inside it only and voxels outside become 0 (the
            second stage of a cascade sees only its region of interest, windowed to that region).
    """
    array = np.maximum(np.asarray(array, dtype=np.float32), HU_AIR)
    # a window is decided on the whole image: a liver region alone in HU can look 0-255
    window = None if intensity["method"] == "percentile" else window_bounds(array, intensity)
    if mask is not None and not mask.any():
        return np.zeros_like(array)
    values = array if mask is None else array[mask]
    lo, hi = window or np.percentile(values, [intensity["lower"], intensity["upper"]])
    if hi <= lo:  # near-constant image: fall back to the full range
        lo, hi = float(values.min()), float(values.max())
    scale = 1.0 / (hi - lo) if hi > lo else 1.0
    out = np.clip((values - lo) * scale, 0.0, 1.0, dtype=np.float32)
    if mask is None:
        return out
    result = np.zeros_like(array)
    result[mask] = out
    return result


def window_bounds(array: np.ndarray, intensity: dict) -> tuple[float, float]:
    """The (lower, upper) values a ``window`` intensity maps to 0 and 1 for this image.

    Raises:
        InvalidImageError: with ``windowed_range``, an image that is neither windowed (all values
            in that range) nor in Hounsfield units (a CT in HU has air or fat below 0): stored
            values without the scanner's rescale, or an MR image, would come out as a blank.
    """
    windowed = intensity.get("windowed_range")
    if windowed is not None and array.size:
        low, high = float(array.min()), float(array.max())
        if windowed[0] <= low and high <= windowed[1]:
            return float(windowed[0]), float(windowed[1])
        if low >= 0:
            raise InvalidImageError(
                f"this model expects CT in Hounsfield units (air near -1000) or already windowed to "
                f"{windowed[0]}-{windowed[1]}, but the image's values run from {low:g} to {high:g}: apply the "
                "scanner's rescale first (HU = stored value x RescaleSlope + RescaleIntercept), or pick a "
                "model for this kind of image")
    half = intensity["width"] / 2.0
    return intensity["center"] - half, intensity["center"] + half


@dataclass
class PreparedVolume:
    """A volume on the model grid plus what is needed to map predictions back."""

    image: np.ndarray  # (Z, H, W) float32, normalised, resampled, padded; (C, Z, H, W) for C > 1 channels
    reorientation: AxialReorientation
    axial_shape: tuple[int, int, int]  # (Z, h, w) after reorientation, before resampling
    resampled_hw: tuple[int, int]  # (H', W') before padding
    pad: tuple[int, int, int, int]  # (top, bottom, left, right)

    def unpad(self, tensor: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.pad
        h, w = self.resampled_hw
        return tensor[..., top : top + h, left : left + w]

    def to_input_grid(self, tensor: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """(B, C, H, W) model-grid maps -> (B, C, h, w) on the reoriented input grid."""
        tensor = self.unpad(tensor)
        size = self.axial_shape[1:]
        if tuple(tensor.shape[-2:]) == tuple(size):
            return tensor
        if mode == "nearest":
            return F.interpolate(tensor, size=size, mode="nearest-exact")
        return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)


def resample_in_plane(array: np.ndarray, size: tuple[int, int], is_label: bool = False) -> np.ndarray:
    """Resample a (Z, h, w) array to (Z, *size); linear (antialiased) for images, nearest for labels."""
    if tuple(array.shape[1:]) == tuple(size):
        return array
    t = torch.from_numpy(np.ascontiguousarray(array))[:, None]
    if is_label:
        out = F.interpolate(t.float(), size=size, mode="nearest-exact").to(t.dtype)
    else:
        downsampling = size[0] < array.shape[1] or size[1] < array.shape[2]
        out = F.interpolate(t.float(), size=size, mode="bilinear", align_corners=False, antialias=downsampling)
    return out[:, 0].numpy()


#: the model grid's largest side (px); a larger one means a broken spacing or a whole-body field of
#: view, and would take minutes and gigabytes before failing
MAX_MODEL_GRID = 1024


def model_grid_size(axial_shape, spacing_zyx, config: PreprocessConfig) -> tuple[int, int]:
    """The in-plane size of the model grid; :class:`InvalidImageError` if it exceeds :data:`MAX_MODEL_GRID`."""
    _, h, w = axial_shape
    size = (
        max(1, int(round(h * spacing_zyx[1] / config.spacing_xy[1]))),
        max(1, int(round(w * spacing_zyx[2] / config.spacing_xy[0]))),
    )
    if max(size) > MAX_MODEL_GRID:
        raise InvalidImageError(
            f"the in-plane field of view ({h * spacing_zyx[1]:.0f} x {w * spacing_zyx[2]:.0f} mm) would need a "
            f"{size[0]} x {size[1]} model grid (at most {MAX_MODEL_GRID}); check the voxel spacing"
        )
    return size


def pad_amounts(hw: tuple[int, int], multiple: int) -> tuple[int, int, int, int]:
    ph = (-hw[0]) % multiple
    pw = (-hw[1]) % multiple
    return (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)


def prepare_volume(
    array: np.ndarray, geometry: Geometry, config: PreprocessConfig, roi_mask: Optional[np.ndarray] = None
) -> PreparedVolume:
    """Input (k, j, i) array, or (C, k, j, i) for C channels, + geometry -> the model-grid volume,
    with its inverse information.

    Args:
        roi_mask: (k, j, i) boolean; when given, intensities are normalised inside it and zero outside.
    """
    channels = array[None] if array.ndim == 3 else array
    if channels.shape[0] != config.channels:
        raise ValueError(f"the model takes {config.channels} input channel(s), got {channels.shape[0]}")
    reorientation = AxialReorientation(geometry)
    mask = None if roi_mask is None else np.ascontiguousarray(reorientation.forward(roi_mask.astype(bool)))
    axial_shape = reorientation.forward(channels[0]).shape
    size = model_grid_size(axial_shape, reorientation.spacing_zyx, config)
    pad = pad_amounts(size, config.multiple)
    planes = []
    for channel in channels:
        axial = normalise_intensity(reorientation.forward(channel), config.intensity, mask)
        planes.append(np.pad(resample_in_plane(axial, size), ((0, 0), pad[:2], pad[2:]), constant_values=0.0))
    image = planes[0] if len(planes) == 1 else np.stack(planes)
    return PreparedVolume(np.ascontiguousarray(image), reorientation, tuple(axial_shape), size, pad)


def grow_region(region: np.ndarray, spacing_zyx, margin_mm: float) -> tuple[np.ndarray, tuple[slice, ...]]:
    """The region grown by ``margin_mm`` (exact in mm) and the bounding box of the grown region:
    what the second stage of a cascade sees, at inference and in training alike."""
    grown = ndimage.distance_transform_edt(~region, sampling=spacing_zyx) <= margin_mm
    return grown, ndimage.find_objects(grown.astype(np.uint8))[0]


def prepare_labels(labels: np.ndarray, prepared: PreparedVolume) -> np.ndarray:
    """Map an input-grid labelmap onto the model grid of ``prepared`` (nearest neighbour)."""
    axial = np.ascontiguousarray(prepared.reorientation.forward(labels)).astype(np.uint8)
    resampled = resample_in_plane(axial, prepared.resampled_hw, is_label=True)
    pad = prepared.pad
    return np.pad(resampled, ((0, 0), pad[:2], pad[2:]), mode="constant", constant_values=0)


def neighbour_stack(image: np.ndarray, slices: Union[np.ndarray, list[int]], k: int) -> np.ndarray:
    """2.5D input: for each slice index, the slice and k neighbours on each side (edges replicated).

    Args:
        image: (Z, H, W), or (C, Z, H, W) for several input channels.

    Returns:
        (len(slices), C x (2k + 1), H, W) array; for one channel, channel k is the slice itself.
    """
    slices = np.asarray(slices)
    offsets = np.arange(-k, k + 1)
    if image.ndim == 4:
        return np.concatenate([neighbour_stack(channel, slices, k) for channel in image], axis=1)
    index = np.clip(slices[:, None] + offsets[None, :], 0, image.shape[0] - 1)
    return image[index]
