"""Run Python code in a fresh interpreter where some packages cannot be imported (as in a Slicer
whose Python lacks them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_without(blocked, code: str, *args: str) -> subprocess.CompletedProcess:
    """``code`` (with ``args`` in ``sys.argv[1:]``) run from the repository root, any import of the
    ``blocked`` top-level packages raising ImportError."""
    guard = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        f"    if name.split('.')[0] in {tuple(blocked)!r}:\n"
        "        raise ImportError(name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
    )
    return subprocess.run([sys.executable, "-c", guard + code, *args], capture_output=True, text=True, cwd=REPO)
