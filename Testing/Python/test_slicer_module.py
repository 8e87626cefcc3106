"""Static checks of the Slicer module that need no Slicer: the .ui file, CMake lists, lint."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from import_guard import run_without

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "LiverSegmentation"
UI = MODULE / "Resources/UI/LiverSegmentation.ui"


def _ui_names_used_by_panel() -> set[str]:
    tree = ast.parse((MODULE / "LiverSegmentation.py").read_text())
    names = set()
    for node in ast.walk(tree):
        # self.ui.<name>
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            names.add(node.attr)
    return names


def test_ui_loads_and_has_every_widget_the_panel_uses():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtCore = pytest.importorskip("PySide6.QtCore", reason="PySide6 is not installed")
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QWidget

    app = QApplication.instance() or QApplication([])
    loader = QUiLoader()
    file = QtCore.QFile(str(UI))
    assert file.open(QtCore.QFile.ReadOnly)
    widget = loader.load(file)
    file.close()
    assert widget is not None, loader.errorString()
    names = {w.objectName() for w in widget.findChildren(QWidget)}
    used = _ui_names_used_by_panel()
    assert used, "the panel uses no ui names?"
    missing = used - names
    assert not missing, f"the panel uses widgets missing from the .ui: {sorted(missing)}"
    # parameter-node bindings point at real parameters of the wrapper class
    params = set(re.findall(r"^    (\w+): ", (MODULE / "LiverSegmentation.py").read_text(), re.M))
    slicer_names = re.findall(
        r'<property name="SlicerParameterName">\s*<string>(\w+)</string>', UI.read_text())
    assert slicer_names and set(slicer_names) <= params, set(slicer_names) - params
    app.processEvents()


def _cmake_listed() -> set[str]:
    listed = set()
    for cmake, base in ((REPO / "CMakeLists.txt", REPO), (MODULE / "CMakeLists.txt", MODULE)):
        text = cmake.read_text().replace("${MODULE_NAME}", "LiverSegmentation")
        for entry in re.findall(r"^\s+([\w./-]+\.\w+)\s*$", text, re.M):
            listed.add(str((base / entry).relative_to(REPO)))
    return listed


def test_every_python_file_and_resource_is_listed_in_cmake():
    listed = _cmake_listed()
    shipped = [p for p in (REPO / "LiverSegmentationLogic").rglob("*.py")]
    shipped += [p for p in MODULE.rglob("*.py")]
    shipped += [p for p in (MODULE / "Resources").rglob("*") if p.is_file()]
    shipped += [p for p in (REPO / "Resources").rglob("*") if p.is_file()]
    missing = sorted(str(p.relative_to(REPO)) for p in shipped if str(p.relative_to(REPO)) not in listed)
    assert not missing, f"not listed in CMake (would silently not ship): {missing}"
    absent = sorted(f for f in listed if not (REPO / f).exists())
    assert not absent, f"listed in CMake but missing (stops configuration): {absent}"


def test_panel_passes_lint_with_no_undefined_names():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "E,F,W,B", str(MODULE)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_bridge_and_core_import_no_qt():
    for path in [*(REPO / "LiverSegmentationLogic").rglob("*.py"), *(MODULE / "LiverSegmentationLib").glob("*.py")]:
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"qt", "ctk", "PySide6", "PyQt5"}, path
        if "LiverSegmentationLogic" in path.parts:
            assert "slicer" not in imported, path


def test_panel_can_list_models_and_tasks_without_torch():
    """The panel fills its model list in setup(), before dependencies are installed; the server's
    broker lists tasks without loading torch either."""
    result = run_without(("torch", "scipy", "skimage", "zmq"), (
        "from LiverSegmentationLogic.models.catalog import model_names, resolve_model_folder\n"
        "names = model_names()\n"
        "assert names[0] == 'liver-mr-t2', names\n"
        "assert resolve_model_folder(names[0]).is_dir()\n"
        "from LiverSegmentationLogic.models.tasks import list_tasks\n"
        "assert [t.preprocess_config().in_channels for t in list_tasks() if t.name == 'liver-dixon-mr'] == [6]\n"
    ))
    assert result.returncode == 0, result.stderr


VERMIN = ["--target=3.9-", "--violations", "--no-tips", "--eval-annotations", "--feature", "union-types",
          "--exclude", "long"]  # 'long': torch's Tensor.long(), not Python 2's long


def _vermin(*paths) -> subprocess.CompletedProcess:
    pytest.importorskip("vermin", reason="vermin is not installed (pip install -e '.[test]')")
    command = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", *VERMIN, *map(str, paths)]
    return subprocess.run(command, capture_output=True, text=True)


def test_everything_slicer_imports_runs_on_python_39(tmp_path):
    """Slicer 5.8 ships Python 3.9: the module, LiverSegmentationLib and the core (which the panel
    and its background job import) use nothing newer, checked by vermin and by ruff's py39 target."""
    result = _vermin(MODULE, REPO / "LiverSegmentationLogic")
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--target-version", "py39", str(MODULE),
                             str(REPO / "LiverSegmentationLogic")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # the check does catch what crashed Slicer 5.8
    (tmp_path / "new.py").write_text("def f(x: dict | None):\n    return list(zip(x, x, strict=True))\n")
    result = _vermin(tmp_path / "new.py")
    assert result.returncode != 0 and "zip(strict)" in result.stdout and "union types" in result.stdout


def test_lesions_use_slicers_mass_terminology():
    """Slicer's terminology lists have no 'Lesion' under Anatomical Structure: a lesion is a Mass
    (SCT 4147007) under Morphologically Altered Structure (SCT 49755003), in new and shipped cards."""
    import json

    from LiverSegmentationLogic.models.anatomy import class_entry
    from LiverSegmentationLogic.models.catalog import list_models

    expected = {"category": ["SCT", "49755003", "Morphologically Altered Structure"],
                "type": ["SCT", "4147007", "Mass"]}
    assert class_entry(2, "lesion")["terminology"] == expected
    lesion_cards = [e for e in list_models() if any(c["name"] == "lesion" for c in e.card["classes"])]
    assert lesion_cards
    for entry in lesion_cards:
        for c in entry.card["classes"]:
            if c["name"] == "lesion":
                assert c["terminology"] == expected, entry.ref
    assert "52988006" not in json.dumps([e.card for e in list_models()])
