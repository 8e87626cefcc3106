"""Shared fixtures: real data from ../shared/data (skipped with a clear message where absent) and
small constructed inputs that always exist."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import types

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("LIVERSEG_DATA", REPO.parent / "shared" / "data"))
CHAOS_MR = DATA / "chaos-mr-t2"
CHAOS_CT = DATA / "chaos-ct-1"
LITS_CT = DATA / "lits-ct"

# LiverSegmentationLib (the panel's Slicer-side, Qt-free helpers) is imported from the module folder,
# as Slicer does when it loads the module.
sys.path.insert(0, str(REPO / "LiverSegmentation"))


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set LIVERSEG_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory):
    """A fresh registry and user-task folder (LIVERSEG_HOME) for the session, also seen by
    subprocesses, so that tests never read or change the user's ~/.liverseg."""
    old = os.environ.get("LIVERSEG_HOME")
    home = tmp_path_factory.mktemp("liverseg-home")
    os.environ["LIVERSEG_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("LIVERSEG_HOME", None)
    else:
        os.environ["LIVERSEG_HOME"] = old


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A registry and user-task folder of its own for one test (the environment is seen by
    subprocesses too)."""
    monkeypatch.setenv("LIVERSEG_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "tasks").mkdir(parents=True)
    return tmp_path / "home"


@pytest.fixture(scope="session")
def lits_ct() -> Path:
    return require(LITS_CT)


@pytest.fixture(scope="session")
def chaos_mr() -> Path:
    return require(CHAOS_MR)


@pytest.fixture(scope="session")
def chaos_ct() -> Path:
    return require(CHAOS_CT)


@pytest.fixture(scope="session")
def sample_case():
    """The bundled sample (always in the repository): image Volume and reference liver mask."""
    from LiverSegmentationLogic.io.volumes import read_volume
    from LiverSegmentationLogic.io.sample import sample_paths

    image_path, label_path = sample_paths()
    image = read_volume(image_path)
    label = read_volume(label_path, validate=False)
    return image, np.rint(label.array).astype(np.int64)


@pytest.fixture(scope="session")
def default_model():
    from LiverSegmentationLogic.models.model_files import load_model

    return load_model()


@pytest.fixture(scope="session")
def segmenter(default_model):
    from LiverSegmentationLogic.inference.segmenter import Segmenter

    return Segmenter(default_model, device="cpu")


@pytest.fixture(scope="session")
def sample_result(segmenter, sample_case):
    return segmenter.segment(sample_case[0])


@pytest.fixture(scope="module")
def scene():
    """A real scene with the converter rules registered and slicer.mrmlScene / slicer.modules bound
    to real logic objects, as the Slicer application would."""
    pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")
    import slicer.util

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
    mrml_scene = slicer.vtkMRMLScene()
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(mrml_scene)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(mrml_scene)
    saved = {name: getattr(slicer, name, None) for name in ("mrmlScene", "modules")}
    slicer.mrmlScene = mrml_scene
    slicer.modules = types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: segmentations),
        volumes=types.SimpleNamespace(logic=lambda: volumes),
    )
    yield mrml_scene
    for name, value in saved.items():
        if value is None:
            delattr(slicer, name)
        else:
            setattr(slicer, name, value)
