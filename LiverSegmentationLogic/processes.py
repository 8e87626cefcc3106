"""Child processes (the panel's segmentation, the server's fine-tuning): started without a console
window and in a group of their own, stopped together with everything they started."""

from __future__ import annotations

import os
import signal
import subprocess


def background_process_options() -> dict:
    """Popen options: no console window on Windows; elsewhere a process group of its own."""
    if os.name == "nt":
        # bit flags, not a type union (vermin reads "A | B" as one)
        flags = subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP  # novermin
        return {"creationflags": flags}
    return {"start_new_session": True}


def kill_process_tree(process: subprocess.Popen) -> None:
    """Kill a process and everything it started, without waiting: a launcher (PythonSlicer) starts
    the real interpreter, which must not survive it and keep the pipes open."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(process.pid)
            family = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            family = []
        for member in family:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        return
    if os.name == "nt":  # taskkill ends the whole tree (/T), forcefully (/F)
        subprocess.Popen(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, creationflags=subprocess.CREATE_NO_WINDOW)
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the session's process group
    except (ProcessLookupError, PermissionError):
        process.kill()
