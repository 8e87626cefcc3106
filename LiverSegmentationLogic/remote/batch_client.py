"""A study on an inference server: the segment function that ``studies.batch.run_batch`` calls from
its threads when ``liverseg batch --server`` keeps several cases in flight.

Each thread has a client of its own (a ZeroMQ socket is never shared between threads). A case
whose worker died or whose request timed out is tried once more (the server hands it to another
worker); a busy server (its admission control) is waited for, not counted as a failure.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from ..errors import RemoteError, ServerTimeoutError
from .client import InferenceClient

#: server error kinds after which the same request may well succeed on another worker
RETRY_ONCE = ("WorkerDiedError",)
BUSY_WAIT_S = (0.5, 10.0)  # first and longest wait before asking a busy server again


class RemoteSegment:
    """``segment(volume, ff_map, source, cancel)`` on the server behind ``make_client``.

    Args:
        make_client: a new connected :class:`InferenceClient` (called once per thread).
        study: the study whose active model version the server uses.
        margin_mm / ff_unit: the fat-fraction readout options, as for local inference.
    """

    def __init__(self, make_client: Callable[[], InferenceClient], study: Optional[str] = None,
                 margin_mm: float = 3.0, ff_unit: str = "auto", log: Callable[[str], None] = lambda line: None):
        self.make_client = make_client
        self.study, self.margin_mm, self.ff_unit, self.log = study, margin_mm, ff_unit, log
        self._local = threading.local()
        self._clients: list[InferenceClient] = []
        self._lock = threading.Lock()
        self.retried = 0  # cases tried a second time (read by the progress display)

    def _client(self) -> InferenceClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self.make_client()
            with self._lock:
                self._clients.append(client)
        return client

    def __call__(self, volume, ff_map, source: str, cancel: threading.Event):
        client = self._client()
        tries, wait_s = 0, BUSY_WAIT_S[0]
        while True:
            try:
                result, readout = client.segment(volume, ff_map, margin_mm=self.margin_mm, ff_unit=self.ff_unit,
                                                 cancel=cancel, study=self.study)
                readout["audit"]["input"]["source"] = source
                return result, readout
            except RemoteError as exc:
                if exc.kind == "ServerBusy" and not cancel.is_set():
                    cancel.wait(wait_s)  # not a failure: the server asks this client to come back later
                    wait_s = min(2 * wait_s, BUSY_WAIT_S[1])
                    continue
                if exc.kind not in RETRY_ONCE or tries:
                    raise
                reason = exc.message
            except ServerTimeoutError as exc:
                if tries:
                    raise
                reason = str(exc)
            tries += 1
            with self._lock:
                self.retried += 1
            self.log(f"{source}: {reason}; trying once more")
            time.sleep(0.1)

    def close(self):
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()
