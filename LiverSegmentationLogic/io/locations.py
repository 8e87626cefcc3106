"""Where files live: the bundled ``Resources`` folder and the user's writable LiverSegmentation home."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def resources_dir() -> Path:
    """The extension's ``Resources`` folder, beside the package (in the repository and in Slicer's
    install tree alike)."""
    return PACKAGE_DIR.parent / "Resources"


def home_dir() -> Path:
    """Writable per-user folder for the registry and user tasks (``LIVERSEG_HOME``, else ``~/.liverseg``)."""
    return Path(os.environ.get("LIVERSEG_HOME", Path.home() / ".liverseg"))
