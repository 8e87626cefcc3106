"""Fine-tuning on the server: one ``liverseg finetune`` at a time, in a process of its own (the
GPU if the server has one), while the workers go on serving. The validation gate inside
``finetune`` decides promotion exactly as on the command line; a cancelled or failed run leaves
the active version as it was (a version is activated only after it validated), and the queue is
only read."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from typing import Optional

from ..processes import background_process_options, kill_process_tree

EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) loss ([0-9.]+)")
RUNNING, PROMOTED, NOT_PROMOTED, FAILED, CANCELLED = "running", "promoted", "not promoted", "failed", "cancelled"


class FinetuneRun:
    """A fine-tune of ``model`` (its study's line when ``study`` is given) on ``queue``."""

    def __init__(self, model: str, queue: str, study: Optional[str], replay: Optional[str], time_budget_s: float,
                 device: str = "auto", python: Optional[str] = None):
        self.id = uuid.uuid4().hex[:12]
        self.model, self.study = model, study
        self.started = time.time()
        self.log: deque = deque(maxlen=200)
        self._cancelled = False
        command = [python or sys.executable, "-m", "LiverSegmentationLogic.cli", "finetune", "--base", model,
                   "--queue", str(queue), "--time-budget", str(time_budget_s), "--device", device]
        command += (["--study", study] if study else []) + (["--replay", str(replay)] if replay else [])
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        **background_process_options())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.log.append(line.rstrip())

    @property
    def state(self) -> str:
        if self._cancelled:  # killed: it is over, whether or not the OS has reaped it yet
            return CANCELLED
        code = self.process.poll()
        if code is None:
            return RUNNING
        return {0: PROMOTED, 3: NOT_PROMOTED}.get(code, FAILED)

    def cancel(self):
        if self.process.poll() is None:
            self._cancelled = True
            kill_process_tree(self.process)
            threading.Thread(target=self.process.wait, daemon=True).start()  # reap it without waiting here

    def status(self) -> dict:
        """What an operator wants to see: state, epochs and loss so far, the outcome's reason."""
        lines = list(self.log)
        epochs = [m for m in (EPOCH_LINE.match(line) for line in lines) if m]
        last = epochs[-1] if epochs else None
        outcome = next((line for line in reversed(lines) if ": ACTIVATED:" in line or ": kept, not activated:" in line),
                       None)
        return {
            "id": self.id, "model": self.model, "study": self.study, "state": self.state,
            "seconds": round(time.time() - self.started, 1),
            "epoch": int(last.group(1)) if last else 0, "epochs": int(last.group(2)) if last else None,
            "loss": float(last.group(3)) if last else None,
            "outcome": outcome, "log": lines[-15:],
        }
