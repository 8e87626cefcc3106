"""Segmentation jobs that run off the caller's thread, polled without blocking.

The Slicer panel starts a job and polls it from a ``qt.QTimer``; nothing here imports Qt or Slicer.
- :class:`LocalProcessJob` runs ``liverseg segment`` in a child process (a crash or a cancel can
  never take the GUI down; cancel kills the process group).
- :class:`RemoteJob` runs :class:`LiverSegmentationLogic.remote.client.InferenceClient` in a thread
  (the server does the work).
Both report ``("progress", done, total, stage)`` events and end as done, failed or cancelled.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

import LiverSegmentationLogic
from LiverSegmentationLogic.errors import CancelledError, LiverSegError
from LiverSegmentationLogic.io.volumes import Volume, read_volume
from LiverSegmentationLogic.processes import background_process_options, kill_process_tree

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


class Job:
    """Common state: ``state``, ``error`` (a message when failed), ``poll()`` and ``cancel()``."""

    def __init__(self):
        self.events: queue.Queue = queue.Queue()
        self.state = RUNNING
        self.error: Optional[str] = None
        self.labels: Optional[np.ndarray] = None
        self.readout: Optional[dict] = None
        self.classes: Optional[list] = None  # the model card's classes, when the job knows them

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    def poll(self) -> list:
        """Events since the last poll; also advances ``state`` when the work has ended."""
        events = []
        while True:
            try:
                events.append(self.events.get_nowait())
            except queue.Empty:
                break
        self._update_state()
        return events

    def _update_state(self):
        raise NotImplementedError

    def cancel(self):
        raise NotImplementedError


class LocalProcessJob(Job):
    """Segment a volume with ``python -m LiverSegmentationLogic.cli segment`` in a child process.

    Args:
        volume: the scan (written to a temporary NRRD for the child).
        ff_map: optional fat-fraction map.
        python: the interpreter to run (in Slicer: ``PythonSlicer``).
        model, device, margin_mm, ff_unit, study: as for ``liverseg segment``.
    """

    def __init__(self, volume: Volume, ff_map: Optional[Volume] = None, model: Optional[str] = None,
                 device: str = "auto", margin_mm: float = 3.0, ff_unit: str = "auto",
                 python: Optional[str] = None, work_dir: Optional[str] = None, study: Optional[str] = None):
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory(prefix="liverseg-", dir=work_dir)
        folder = Path(self._tmp.name)
        sitk.WriteImage(volume.to_sitk(), str(folder / "input.nrrd"))
        self.output, self.readout_path = folder / "labels.nrrd", folder / "readout.json"
        command = [python or sys.executable, "-m", "LiverSegmentationLogic.cli", "segment",
                   str(folder / "input.nrrd"), "-o", str(self.output), "--json", str(self.readout_path),
                   "--progress-lines", "--device", device, "--margin-mm", str(margin_mm), "--ff-unit", ff_unit]
        if ff_map is not None:
            sitk.WriteImage(ff_map.to_sitk(), str(folder / "ff.nrrd"))
            command += ["--ff", str(folder / "ff.nrrd")]
        if model:
            command += ["--model", str(model)]
        if study:
            command += ["--study", str(study)]
        self._cancelled = False
        self._stderr: list[str] = []
        # the child must find this package whatever its interpreter's path (e.g. PythonSlicer)
        package_parent = str(Path(LiverSegmentationLogic.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                        **background_process_options())
        self._exited_at: Optional[float] = None
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self):
        for line in self.process.stdout:
            if line.startswith("PROGRESS "):
                _, done, total, stage = line.split(maxsplit=3)
                self.events.put(("progress", int(done), int(total), stage.strip()))
            else:
                self.events.put(("log", line.rstrip()))

    def _read_stderr(self):
        for line in self.process.stderr:
            self._stderr.append(line.rstrip())

    def _update_state(self):
        """Never waits: the GUI thread calls it from a timer."""
        if self.state != RUNNING or self.process.poll() is None:
            return
        if self._exited_at is None:
            self._exited_at = time.monotonic()
        # the output is complete once the readers have drained the pipes; a grandchild that kept
        # them open is not waited for beyond READER_GRACE_S
        if any(r.is_alive() for r in self._readers) and time.monotonic() - self._exited_at < READER_GRACE_S:
            return
        if self._cancelled:
            self.state = CANCELLED
        elif self.process.returncode == 0:
            try:
                self.labels = read_volume(self.output, validate=False).array
                self.readout = json.loads(self.readout_path.read_text())
                self.state = DONE
            except (OSError, ValueError, LiverSegError) as exc:
                self.error, self.state = f"the segmentation process left no readable result ({exc})", FAILED
        else:
            prefix = "liverseg: error: "
            errors = [line[len(prefix):] for line in self._stderr if line.startswith(prefix)]
            tail = "\n".join(self._stderr[-5:])
            self.error = errors[-1] if errors else tail or f"exit code {self.process.returncode}"
            self.state = FAILED
        self._tmp.cleanup()

    def cancel(self):
        if self.process.poll() is None:
            self._cancelled = True
            kill_process_tree(self.process)


READER_GRACE_S = 2.0


class RemoteJob(Job):
    """Segment on a ``liverseg serve`` server from a background thread.

    Args:
        client: a :class:`LiverSegmentationLogic.remote.client.InferenceClient` (used from the job's thread only).
    """

    def __init__(self, client, volume: Volume, ff_map: Optional[Volume] = None, margin_mm: float = 3.0,
                 ff_unit: str = "auto", study: Optional[str] = None):
        super().__init__()
        self._cancel = threading.Event()
        self._outcome = None
        self._thread = threading.Thread(
            target=self._run, args=(client, volume, ff_map, margin_mm, ff_unit, study), daemon=True
        )
        self._thread.start()

    def _run(self, client, volume, ff_map, margin_mm, ff_unit, study):
        try:
            result, readout = client.segment(
                volume, ff_map, margin_mm=margin_mm, ff_unit=ff_unit, study=study,
                progress=lambda d, t, s: self.events.put(("progress", d, t, s)), cancel=self._cancel,
            )
            self.classes = result.classes  # the server's model may not exist on this machine
            self._outcome = (DONE, result.labels, readout, None)
        except CancelledError:
            self._outcome = (CANCELLED, None, None, None)
        except LiverSegError as exc:
            self._outcome = (FAILED, None, None, str(exc))
        except Exception as exc:  # anything else must still end the job, with a message
            self._outcome = (FAILED, None, None, f"{type(exc).__name__}: {exc}")
        finally:
            client.close()

    def _update_state(self):
        if self.state == RUNNING and not self._thread.is_alive() and self._outcome:
            self.state, self.labels, self.readout, self.error = self._outcome

    def cancel(self):
        self._cancel.set()


class ThreadJob(Job):
    """Any short piece of work (a server query, a queue export) in a thread; ``result`` holds its
    return value when done, ``error`` its message when it failed. Cancel only stops waiting."""

    def __init__(self, work, *args, **kwargs):
        super().__init__()
        self.result = None
        self._outcome = None
        self._thread = threading.Thread(target=self._run, args=(work, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, work, args, kwargs):
        try:
            self._outcome = (DONE, work(*args, **kwargs), None)
        except LiverSegError as exc:
            self._outcome = (FAILED, None, str(exc))
        except Exception as exc:  # anything else must still end the job, with a message
            self._outcome = (FAILED, None, f"{type(exc).__name__}: {exc}")

    def _update_state(self):
        if self.state == RUNNING and self._outcome is not None:
            self.state, self.result, self.error = self._outcome

    def cancel(self):
        if self.state == RUNNING:
            self.state = CANCELLED
