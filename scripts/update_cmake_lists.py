"""Rewrite the file lists in the top-level CMakeLists.txt from what is on disk.

    python scripts/update_cmake_lists.py

A file missing from CMake is silently not shipped; Testing/Python/test_slicer_module.py fails
until the lists match the tree again.
"""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def replace_list(text: str, name: str, entries: list[str]) -> str:
    body = "".join(f"  {e}\n" for e in entries)
    new, count = re.subn(rf"set\({name}\n.*?  \)", f"set({name}\n{body}  )", text, flags=re.S)
    if count != 1:
        raise SystemExit(f"set({name} ...) not found in CMakeLists.txt")
    return new


def main():
    cmake = REPO / "CMakeLists.txt"
    core = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "LiverSegmentationLogic").rglob("*.py"))
    resources = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "Resources").rglob("*") if p.is_file())
    text = replace_list(cmake.read_text(), "CORE_PYTHON_SCRIPTS", core)
    text = replace_list(text, "CORE_PYTHON_RESOURCES", resources)
    cmake.write_text(text)
    print(f"{len(core)} scripts, {len(resources)} resources listed")


if __name__ == "__main__":
    main()
