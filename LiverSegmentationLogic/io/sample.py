"""The bundled demo case: one CHAOS MR T2-SPIR patient (CC BY-SA 4.0, Kavur et al. 2021)."""

from __future__ import annotations

from pathlib import Path

from .locations import resources_dir

SAMPLE_NAME = "chaos-mr-t2-patient21"


def sample_paths() -> tuple[Path, Path]:
    """(image, reference label) of the bundled sample; see Resources/Sample/README.md."""
    folder = resources_dir() / "Sample"
    return folder / f"{SAMPLE_NAME}_image.nii.gz", folder / f"{SAMPLE_NAME}_label.nii.gz"
