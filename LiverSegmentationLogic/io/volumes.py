"""Reading and writing volumes with their full geometry (SimpleITK).

SimpleITK is imported where a file is read or written, not with this module: a training-only
machine (a GPU server given prepared cases) uses the geometry and arrays without it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

from ..errors import ImageReadError, InvalidImageError

if TYPE_CHECKING:
    import SimpleITK as sitk


#: file name endings of the image formats the tools write or look for (longest first)
IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def split_image_suffix(name: str) -> tuple[str, str]:
    """``"case7.seg.nrrd"`` -> ``("case7", ".seg.nrrd")``; ``("notes.txt", "")`` for other files."""
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid lies in LPS patient space, in SimpleITK/ITK conventions.

    Attributes:
        spacing: voxel size along the i, j, k index axes, mm.
        origin: LPS position of voxel (0, 0, 0), mm.
        direction: 3x3 direction cosines, row-major; column n is the LPS direction of index axis n.
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def index_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping (i, j, k, 1) to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def allclose(self, other: "Geometry", tol: float = 1e-4) -> bool:
        return (
            np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    @classmethod
    def from_image(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    @classmethod
    def identity(cls, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> "Geometry":
        return cls(tuple(float(s) for s in spacing), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


@dataclass
class Volume:
    """A 3D array in numpy (k, j, i) = (z, y, x) order with its geometry."""

    array: np.ndarray
    geometry: Geometry

    def to_sitk(self) -> sitk.Image:
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing(self.geometry.spacing)
        image.SetOrigin(self.geometry.origin)
        image.SetDirection(self.geometry.direction)
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Volume":
        import SimpleITK as sitk

        return cls(sitk.GetArrayFromImage(image), Geometry.from_image(image))


def channel_array(volumes: Sequence[Volume]) -> np.ndarray:
    """One image per input channel (all on one grid) -> the array :func:`prepare_volume` takes:
    (k, j, i) for one channel, (C, k, j, i) for several."""
    return volumes[0].array if len(volumes) == 1 else np.stack([v.array for v in volumes])


def crop_volume(volume: Volume, box: tuple[slice, slice, slice]) -> Volume:
    """The sub-volume ``array[box]`` (numpy k, j, i slices with steps of 1) with its true geometry."""
    start_kji = np.array([b.start or 0 for b in box], dtype=float)
    g = volume.geometry
    origin = np.asarray(g.origin) + g.direction_matrix @ (start_kji[::-1] * np.asarray(g.spacing))
    return Volume(volume.array[box], Geometry(g.spacing, tuple(float(o) for o in origin), g.direction))


def read_volume(path: Union[str, os.PathLike], validate: bool = True) -> Volume:
    """Read a NIfTI, NRRD, MHA (anything SimpleITK reads) file or a DICOM series folder.

    Args:
        path: an image file, or a folder holding one DICOM series (the largest series is taken
            when there are several).
        validate: check that the result can be segmented (see :func:`validate_volume`).

    Raises:
        ImageReadError: the path does not exist or holds no readable image.
        InvalidImageError: the image is not a 3D scalar volume of finite, non-constant values.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"No such file or folder: {path}")
    try:
        image = _read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as exc:  # SimpleITK reports unreadable files as RuntimeError
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise ImageReadError(f"Not a readable image: {path} ({first_line})") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidImageError(
            f"{path}: {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "expected a scalar (grey-level) volume"
        )
    if image.GetDimension() != 3:
        raise InvalidImageError(f"{path}: a {image.GetDimension()}D image; expected a 3D volume")
    volume = Volume.from_sitk(image)
    if validate:
        validate_volume(volume, str(path))
    return volume


def _read_dicom_series(folder: Path) -> sitk.Image:
    import SimpleITK as sitk

    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise ImageReadError(f"No DICOM series in folder: {folder}")
    files = max(
        (sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids), key=len
    )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)  # GDCM sorts the files by position along the slice normal
    return reader.Execute()


def validate_volume(volume: Volume, name: str = "image") -> None:
    """Raise :class:`InvalidImageError` unless the volume is a 3D, finite, non-constant scan."""
    array = volume.array
    if array.ndim != 3:
        raise InvalidImageError(f"{name}: a {array.ndim}D array; expected a 3D volume")
    if min(array.shape) < 1 or array.size == 0:
        raise InvalidImageError(f"{name}: the volume is empty (shape {array.shape})")
    if array.shape[0] == 1:
        raise InvalidImageError(f"{name}: a single slice (2D image); expected a 3D volume")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InvalidImageError(f"{name}: voxel type {array.dtype} is not a real number type")
    if np.issubdtype(array.dtype, np.floating):
        bad = np.count_nonzero(~np.isfinite(array))
        if bad:
            raise InvalidImageError(f"{name}: {bad} voxels are NaN or infinite")
    if np.ptp(array) == 0:
        raise InvalidImageError(f"{name}: the volume is empty (every voxel is {array.flat[0]})")
    validate_geometry(volume.geometry, name)


#: voxel sizes outside this range (mm) are a broken header, not a scan
SPACING_RANGE_MM = (1e-3, 100.0)
#: how far the direction matrix may be from orthonormal (DICOM rounding stays far below it)
DIRECTION_TOLERANCE = 1e-3


def validate_geometry(geometry: Geometry, name: str = "image") -> None:
    """Raise :class:`InvalidImageError` unless the grid is usable: three finite spacings within
    :data:`SPACING_RANGE_MM`, a finite origin and an orthonormal direction matrix."""
    spacing, origin, direction = (np.asarray(v, dtype=float) for v in
                                  (geometry.spacing, geometry.origin, geometry.direction))
    if spacing.shape != (3,) or origin.shape != (3,) or direction.shape != (9,):
        raise InvalidImageError(f"{name}: the geometry must be 3D (3 spacings, 3 origin values, 9 direction values)")
    if not (np.all(np.isfinite(spacing)) and np.all(np.isfinite(origin)) and np.all(np.isfinite(direction))):
        raise InvalidImageError(f"{name}: the geometry holds NaN or infinite values")
    low, high = SPACING_RANGE_MM
    if spacing.min() < low or spacing.max() > high:
        raise InvalidImageError(f"{name}: voxel spacing {tuple(spacing)} mm is outside {low:g}-{high:g} mm")
    matrix = direction.reshape(3, 3)
    if np.abs(matrix @ matrix.T - np.eye(3)).max() > DIRECTION_TOLERANCE:
        raise InvalidImageError(f"{name}: the direction matrix is not orthonormal (singular or skewed axes)")


def write_labelmap(path: Union[str, os.PathLike], labels: np.ndarray, geometry: Geometry) -> Path:
    """Write a uint8 labelmap (NRRD, NIfTI, MHA... by extension) on the given grid."""
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Volume(np.ascontiguousarray(labels, dtype=np.uint8), geometry).to_sitk()
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def write_seg_nrrd(
    path: Union[str, os.PathLike],
    labels: np.ndarray,
    geometry: Geometry,
    segments: Sequence[dict],
) -> Path:
    """Write a Slicer ``.seg.nrrd``: one shared labelmap layer with named, coloured segments.

    Args:
        segments: one dict per label with keys ``label`` (int), ``name`` (str), ``color``
            (3 floats in 0-1) and optionally ``terminology`` (slicerio's terminology dict).
    """
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    header = _seg_nrrd_header(labels.shape, geometry, segments, labels)
    body = sitk.GetImageFromArray(labels)
    body.SetSpacing(geometry.spacing)
    body.SetOrigin(geometry.origin)
    body.SetDirection(geometry.direction)
    for key, value in header.items():
        body.SetMetaData(key, value)
    sitk.WriteImage(body, str(path), useCompression=True)
    return path


def _seg_nrrd_header(shape, geometry: Geometry, segments: Sequence[dict], labels: np.ndarray) -> dict:
    nz, ny, nx = shape
    header = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for n, seg in enumerate(segments):
        present = np.argwhere(labels == seg["label"])
        if len(present):
            (k0, j0, i0), (k1, j1, i1) = present.min(0), present.max(0)
            extent = f"{i0} {i1} {j0} {j1} {k0} {k1}"
        else:
            extent = f"0 {nx - 1} 0 {ny - 1} 0 {nz - 1}"
        tags = "Segmentation.Status:inprogress|"
        term = seg.get("terminology")
        if term:
            tags += "TerminologyEntry:" + terminology_string(term) + "|"
        prefix = f"Segment{n}_"
        header.update(
            {
                prefix + "ID": f"Segment_{seg['label']}",
                prefix + "Name": seg["name"],
                prefix + "NameAutoGenerated": "0",
                prefix + "Color": " ".join(f"{c:.6g}" for c in seg["color"]),
                prefix + "ColorAutoGenerated": "0",
                prefix + "LabelValue": str(seg["label"]),
                prefix + "Layer": "0",
                prefix + "Extent": extent,
                prefix + "Tags": tags,
            }
        )
    return header


def terminology_string(term: dict) -> str:
    """Slicer's terminology entry string: context~category~type~modifier~anatomic context..."""

    def code(triplet):
        return "^".join(triplet) if triplet else "^^"

    return "~".join(
        [
            term.get("contextName", "Segmentation category and type - 3D Slicer General Anatomy list"),
            code(term.get("category")),
            code(term.get("type")),
            code(term.get("typeModifier")),
            term.get("anatomicContextName", "Anatomic codes - DICOM master list"),
            code(term.get("anatomicRegion")),
            code(term.get("anatomicRegionModifier")),
        ]
    )
