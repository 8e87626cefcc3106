"""Study model lines: a version fine-tuned for one study serves that study only, everywhere a
model is chosen (registry, CLI, server, panel), and can be rolled back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from LiverSegmentationLogic.errors import ModelNotFoundError
from LiverSegmentationLogic.io.volumes import crop_volume
from LiverSegmentationLogic.models import catalog
from server_helpers import start_server, stop, wait_ready


def register_study_version(study: str) -> str:
    """A study version of the default model (the bundled weights under a study-line version)."""
    bundled = catalog.find_model("liver-mr-t2@" + catalog.active_model("liver-mr-t2").version)
    base = catalog.origin_version(bundled.version)
    version, folder = catalog.new_version_folder("liver-mr-t2", base, "ft", study=study)
    folder.mkdir(parents=True)
    shutil.copy(bundled.folder / catalog.WEIGHTS_NAME, folder / catalog.WEIGHTS_NAME)
    (folder / catalog.CARD_NAME).write_text(json.dumps(dict(bundled.card, version=version)))
    return version


def test_a_study_has_its_own_active_version_and_rolls_back(home):
    version = register_study_version("TRIAL 7/site-3")
    assert version.endswith("+TRIAL-7-site-3-ft1")
    bundled = catalog.active_model("liver-mr-t2").version
    catalog.activate(f"liver-mr-t2@{version}", study="TRIAL 7/site-3")
    assert catalog.active_model("liver-mr-t2", "TRIAL 7/site-3").version == version
    assert catalog.active_model("liver-mr-t2", "TRIAL-7-site-3").version == version  # the same tag
    assert catalog.active_model("liver-mr-t2").version == bundled  # the global choice is untouched
    assert catalog.active_model("liver-mr-t2", "OTHER").version == bundled  # and other studies'
    assert catalog.resolve_model_folder("liver-mr-t2", "TRIAL 7/site-3").name == version
    again = register_study_version("TRIAL 7/site-3")
    assert again.endswith("-ft2")
    catalog.activate(f"liver-mr-t2@{again}", study="TRIAL 7/site-3")
    assert catalog.rollback("liver-mr-t2", study="TRIAL 7/site-3").version == version
    assert catalog.rollback("liver-mr-t2", study="TRIAL 7/site-3").version == bundled
    with pytest.raises(ModelNotFoundError, match="Nothing to roll back"):
        catalog.rollback("liver-mr-t2", study="TRIAL 7/site-3")


def test_a_fine_tuned_version_names_the_version_it_descends_from():
    assert catalog.origin_version("2.0.0+TRIAL-7-site-3-ft2") == "2.0.0"
    assert catalog.origin_version("2.0.0-ft1") == "2.0.0"
    # a base version with a hyphen of its own (a release candidate, a benchmark's base) keeps it
    assert catalog.origin_version("2.0.0-rc1+TRIAL-7-ft12") == "2.0.0-rc1"
    assert catalog.origin_version("2.0.0-study-base") == "2.0.0-study-base"


def test_an_older_registry_file_still_reads(home):
    version = register_study_version("X")
    (home / "models" / "active.json").write_text(json.dumps({"liver-mr-t2": version}))  # the old flat form
    assert catalog.active_model("liver-mr-t2").version == version
    catalog.activate("liver-mr-t2@" + version.split("+")[0], study="X")  # the bundled one, for study X
    assert catalog.active_model("liver-mr-t2").version == version
    assert catalog.active_model("liver-mr-t2", "X").version == version  # cleared: falls back to global


def test_cli_and_server_segment_with_the_studys_version(home, sample_case, tmp_path):
    from LiverSegmentationLogic.remote.client import InferenceClient

    version = register_study_version("TRIAL7")
    run = lambda *a: subprocess.run([sys.executable, "-m", "LiverSegmentationLogic.cli", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True)
    r = run("models", "activate", f"liver-mr-t2@{version}", "--study", "TRIAL7")
    assert r.returncode == 0 and "active for study TRIAL7" in r.stdout, r.stderr
    assert "* liver-mr-t2@" + version in run("models", "list", "--study", "TRIAL7").stdout
    image, _ = sample_case
    small = crop_volume(image, (slice(14, 20), slice(None), slice(None)))
    import SimpleITK as sitk

    sitk.WriteImage(small.to_sitk(), str(tmp_path / "scan.nrrd"))
    for study, expected in (("TRIAL7", version), (None, version.split("+")[0])):
        r = run("segment", tmp_path / "scan.nrrd", "-o", tmp_path / "out.nrrd", "--json", tmp_path / "r.json",
                *(["--study", study] if study else []))
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / "r.json").read_text())["model"]["version"] == expected
    proc, address = start_server(workers=1)
    try:
        wait_ready(address, 1)
        with InferenceClient(address, idle_timeout_s=60) as client:
            _, study_readout = client.segment(small, study="TRIAL7")
            _, plain_readout = client.segment(small)
        assert study_readout["model"]["version"] == version
        assert plain_readout["model"]["version"] == version.split("+")[0]
        np.testing.assert_equal(study_readout["volumes_ml"], plain_readout["volumes_ml"])  # the same weights
    finally:
        assert stop(proc) == 0
