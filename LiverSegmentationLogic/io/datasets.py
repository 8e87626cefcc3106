"""Labelled datasets on disk: finding image/label pairs, splitting them patient-wise.

Two layouts are read:

- nnU-Net raw layout (also the fine-tuning queue's): ``imagesTr/<case>_0000.nii.gz`` (``_0001``...
  for more channels) and ``labelsTr/<case>.nii.gz``;
- flat pairs: ``image_<case>.<ext>`` and ``label_<case>.<ext>`` (as in ``../shared/data``).

A case is named ``<folder name>/<case>``; task files and model cards refer to validation cases by
that name or by the bare ``<case>``.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import LiverSegError
from .volumes import split_image_suffix


class DatasetError(LiverSegError):
    """A dataset folder is missing, empty, or has images without labels."""


@dataclass(frozen=True)
class CaseFiles:
    case_id: str  # "<folder>/<case>"
    images: tuple[Path, ...]  # one per input channel
    label: Path

    @property
    def short_id(self) -> str:
        return self.case_id.split("/", 1)[-1]


def find_cases(folder: Union[str, os.PathLike], n_channels: int = 1) -> list[CaseFiles]:
    """The labelled cases of a dataset folder, in a stable order.

    Raises:
        DatasetError: no such folder, no cases, or a case missing a channel image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"Dataset folder not found: {folder}")
    cases = []
    if (folder / "labelsTr").is_dir():
        for label in sorted((folder / "labelsTr").iterdir()):
            case, suffix = split_image_suffix(label.name)
            if not suffix or ".partial" in label.name:
                continue
            images = tuple(folder / "imagesTr" / f"{case}_{c:04d}{suffix}" for c in range(n_channels))
            cases.append(CaseFiles(f"{folder.name}/{case}", images, label))
    else:
        for label in sorted(folder.glob("label_*")):
            case, suffix = split_image_suffix(label.name[len("label_"):])
            if not suffix:
                continue
            if n_channels == 1:
                images = (folder / f"image_{case}{suffix}",)
            else:
                images = tuple(folder / f"image_{case}_{c:04d}{suffix}" for c in range(n_channels))
            cases.append(CaseFiles(f"{folder.name}/{case}", images, label))
    if not cases:
        raise DatasetError(
            f"No labelled cases in {folder} (expected labelsTr/ + imagesTr/, or label_<case> + image_<case> files)"
        )
    for case in cases:
        missing = [str(p) for p in case.images if not p.is_file()]
        if missing:
            raise DatasetError(f"Case {case.case_id} has a label but no image: {', '.join(missing)}")
    return sorted(cases, key=lambda c: _natural_key(c.case_id))


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def find_all_cases(folders: Sequence[Union[str, os.PathLike]], n_channels: int = 1) -> list[CaseFiles]:
    cases = [c for f in folders for c in find_cases(f, n_channels)]
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"Two datasets share a folder name and case names: {sorted(ids)}")
    return cases


def select_cases(cases: Sequence[CaseFiles], names: Sequence[str]) -> list[CaseFiles]:
    """The cases a list of names refers to: a name matches a case id (``folder/case``) exactly,
    or else, when no id matches it, the bare case name (so ``chaos-mr-t2/21`` finds case 21 of
    a copy of that dataset under another folder name)."""
    chosen = set()
    for name in names or []:
        exact = [c.case_id for c in cases if c.case_id == name]
        short = name.split("/", 1)[-1]
        chosen.update(exact or [c.case_id for c in cases if c.short_id == short])
    return [c for c in cases if c.case_id in chosen]


def split_cases(
    cases: Sequence[CaseFiles], validation: Optional[Sequence[str]] = None, fraction: float = 0.2, seed: int = 0
) -> tuple[list[CaseFiles], list[CaseFiles]]:
    """Patient-wise split into (train, validation).

    Args:
        validation: case names to validate on (see :func:`select_cases`); when none of them is
            present, a seeded random ``fraction`` of the cases (at least one) is used.
    """
    if len(cases) < 2:
        raise DatasetError(f"Need at least 2 cases to hold one out for validation, got {len(cases)}")
    chosen = select_cases(cases, validation or [])
    if not chosen:
        rng = np.random.default_rng(seed)
        n = min(len(cases) - 1, max(1, int(round(len(cases) * fraction))))
        chosen = [cases[i] for i in sorted(rng.choice(len(cases), n, replace=False))]
    if len(chosen) == len(cases):
        raise DatasetError("Every case is a validation case; nothing is left to train on")
    return [c for c in cases if c not in chosen], chosen


def k_folds(cases: Sequence[CaseFiles], k: int, seed: int = 0) -> list[list[CaseFiles]]:
    """Patient-wise k-fold partition (seeded shuffle, folds differ in size by at most one)."""
    if not 2 <= k <= len(cases):
        raise DatasetError(f"k-fold needs 2 <= k <= number of cases ({len(cases)}), got {k}")
    order = np.random.default_rng(seed).permutation(len(cases))
    return [[cases[i] for i in sorted(order[f::k])] for f in range(k)]


def convert_chaos_ct(
    source: Union[str, os.PathLike], destination: Union[str, os.PathLike], case: str = "1"
) -> CaseFiles:
    """A CHAOS CT case (a DICOM folder ``DICOM_anon`` + liver ground-truth PNGs ``Ground``) ->
    ``image_<case>.nii.gz`` + ``label_<case>.nii.gz`` (label 1 liver) on the DICOM grid.

    CHAOS orders its PNG slices like the DICOM files by name; each PNG is placed at its DICOM
    file's slice position, so the label matches however SimpleITK sorts the series.
    """
    import SimpleITK as sitk
    from PIL import Image

    from .volumes import read_volume, write_labelmap

    source, destination = Path(source), Path(destination)
    files = sorted(glob.glob(str(source / "DICOM_anon" / "*.dcm")))
    pngs = sorted(glob.glob(str(source / "Ground" / "*.png")))
    if not files or len(files) != len(pngs):
        raise DatasetError(f"{source}: expected as many DICOM files as ground-truth PNGs, "
                           f"got {len(files)} and {len(pngs)}")
    image = read_volume(source / "DICOM_anon")
    lps_to_index = np.linalg.inv(image.geometry.index_to_lps())
    labels = np.zeros(image.array.shape, dtype=np.uint8)
    header = sitk.ImageFileReader()
    for dcm, png in zip(files, pngs):
        header.SetFileName(dcm)
        header.ReadImageInformation()  # the header only
        position = [float(v) for v in header.GetMetaData("0020|0032").split("\\")]  # ImagePositionPatient
        k = int(round((lps_to_index @ np.array(position + [1.0]))[2]))
        labels[k] = np.asarray(Image.open(png)) > 0
    destination.mkdir(parents=True, exist_ok=True)
    image_path = destination / f"image_{case}.nii.gz"
    sitk.WriteImage(image.to_sitk(), str(image_path), useCompression=True)
    label_path = write_labelmap(destination / f"label_{case}.nii.gz", labels, image.geometry)
    return CaseFiles(f"{destination.name}/{case}", (image_path,), label_path)

