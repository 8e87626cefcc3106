"""Inference workers: load a model once, then run the jobs the broker hands them, one at a time.

A worker runs exactly :func:`inference.pipeline.segment_case`, the code of local inference, on the
model version active for the request's study. It talks to the broker's backend over CurveZMQ with
its own key, answers each job with one final reply carrying the broker's job token, and sends a
heartbeat every second from a thread of its own (a hung or stopped process sends none, so the
broker notices). Local workers are started by :class:`server.InferenceServer`; workers on other
machines by ``liverseg worker`` (:func:`run_worker`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from typing import Optional

import zmq

from ..errors import LiverSegError, ProtocolError
from .protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    channel_volumes_from,
    check_request,
    encode_array,
    pack,
    request_id_of,
    segment_options,
    unpack,
    volume_from,
)

log = logging.getLogger("liverseg.worker")

# broker <-> worker frames (after the ROUTER's identity frame)
READY = b"READY"  # worker -> broker: [READY, info JSON]
HEARTBEAT = b"HEARTBEAT"  # worker -> broker: [HEARTBEAT]
REPLY = b"REPLY"  # worker -> broker: [REPLY, token, header, buffers...]
JOB = b"JOB"  # broker -> worker: [JOB, token, header, buffers...]
CANCEL = b"CANCEL"  # broker -> worker: [CANCEL, token]
STOP = b"STOP"  # broker -> worker: [STOP]
WORKER_HEARTBEAT_S = 1.0  # how often a worker says it lives
SEND_TIMEOUT_MS = 10_000  # a worker's send waits this long for a broker that is gone


def error_header(request_id, kind: str, message: str) -> dict:
    return {
        "protocol": PROTOCOL_VERSION,
        "id": request_id,
        "status": "error",
        "error": {"type": kind, "message": message},
    }


class _WorkerLink:
    """The worker's socket, shared by its main thread and a heartbeat thread under a lock (a
    ZeroMQ socket may change threads with a full memory barrier, which the lock gives). A hung
    or stopped process sends no heartbeat, so the broker notices it."""

    def __init__(self, sock, interval_s: float):
        self.sock, self.lock = sock, threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(interval_s,), daemon=True)
        self._thread.start()

    def _beat(self, interval_s: float):
        while not self._stop.wait(interval_s):
            self.send([HEARTBEAT])

    def send(self, frames):
        with self.lock:
            try:
                self.sock.send_multipart(frames, copy=False)  # waits at most SEND_TIMEOUT_MS
            except zmq.Again:  # the broker is gone: nothing to deliver to
                log.warning("the broker did not take a message for %d ms: dropped", SEND_TIMEOUT_MS)

    def recv(self, timeout_ms: int):
        """The next message, or None after ``timeout_ms``."""
        with self.lock:
            if self.sock.poll(timeout_ms):
                return self.sock.recv_multipart()
        return None

    def close(self):
        self._stop.set()
        self._thread.join(2)


def worker_main(backend: str, model: Optional[str], device: str, name: str, threads: int, max_bytes: int,
                curve: tuple, heartbeat_s: float = WORKER_HEARTBEAT_S):
    """Entry point of a worker process: load the model once, then serve jobs until STOP.

    Args:
        curve: (server public key, this worker's public key, its secret key), Z85.
    """
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the broker decides when workers stop
    models = _WorkerModels(model, device)
    segmenter = models.default
    loaded = segmenter.model
    if segmenter.device.type == "cpu":
        torch.set_num_threads(max(1, threads))  # share the cores between the workers
    info = {
        "worker": name,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "device": str(segmenter.device),
        "model": {k: loaded.card.get(k) for k in ("name", "version", "task", "modality", "sha256")},
        "classes": [c["name"] for c in loaded.classes],
    }
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, name.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
    sock.connect(backend)
    link = _WorkerLink(sock, heartbeat_s)
    link.send([READY, json.dumps(info).encode()])
    try:
        while True:
            frames = link.recv(100)
            if frames is None:
                continue
            if frames[0] == STOP:
                break
            if frames[0] == JOB and len(frames) >= 3:
                if _serve_one(link, frames[1], frames[2:], models, max_bytes):
                    break
            # anything else (a late CANCEL for a job already answered) needs nothing
    finally:
        link.close()
        sock.close()
        ctx.term()


class _WorkerModels:
    """The worker's model, and the versions active for the studies its requests name (a few kept
    loaded: a study's fine-tuned line serves that study only)."""

    KEEP = 3

    def __init__(self, model: Optional[str], device: str):
        from ..inference.segmenter import Segmenter
        from ..models.catalog import resolve_model_folder
        from ..models.model_files import load_model

        self.model, self.device = model, device
        self._make = lambda folder: Segmenter(load_model(folder), device=device)
        self._resolve = resolve_model_folder
        self.default_folder = resolve_model_folder(model)
        self.default = self._make(self.default_folder)
        self._loaded: dict = {}

    def for_study(self, study: Optional[str]):
        """The version active now for ``study`` (or globally): an activation on the server applies
        from the next request on."""
        folder = self._resolve(self.model, study)
        if folder == self.default_folder:
            return self.default
        if folder not in self._loaded:
            if len(self._loaded) >= self.KEEP:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[folder] = self._make(folder)
        return self._loaded[folder]


def _serve_one(link: _WorkerLink, token: bytes, frames, models: _WorkerModels, max_bytes: int) -> bool:
    """Run one job and send exactly one final reply; True when the broker asked to stop meanwhile."""
    from ..inference.pipeline import segment_case

    request_id = None
    t0 = time.perf_counter()
    stop = cancelled = False

    def send(header, buffers=()):
        link.send([REPLY, token] + pack(header, buffers))

    def progress(done, total, stage):
        nonlocal cancelled, stop
        send({"protocol": PROTOCOL_VERSION, "id": request_id, "status": "event", "event": "progress",
              "stage": stage, "done": done, "total": total})
        while (more := link.recv(0)) is not None:  # while busy the broker only sends CANCEL or STOP
            if more[0] == STOP:
                stop = cancelled = True
            elif more[0] == CANCEL and len(more) == 2 and more[1] == token:
                cancelled = True

    try:
        header, buffers = unpack(frames, max_bytes)
        request_id = request_id_of(header)
        check_request(header, max_bytes)
        options = segment_options(header.get("options") or {})
        channels = channel_volumes_from(header, buffers, max_bytes)
        if not channels:
            raise ProtocolError("a segment request needs an array named 'image'")
        ff_map = volume_from(header, buffers, "ff_map", max_bytes)
        result, readout = segment_case(
            models.for_study(options["study"]), channels, ff_map, margin_mm=options["margin_mm"],
            ff_unit=options["ff_unit"], progress=progress, cancel=lambda: cancelled,
        )
        desc, buf = encode_array("labels", result.labels, result.geometry, options["label_compression"])
        readout["timings"]["server_total"] = time.perf_counter() - t0
        send({"protocol": PROTOCOL_VERSION, "id": request_id, "status": "ok", "readout": readout,
              "classes": result.classes, "arrays": [desc]}, [buf])
        log.info("request %s done in %.2fs", request_id, time.perf_counter() - t0)
    except LiverSegError as exc:
        if type(exc).__name__ == "CancelledError":
            send({"protocol": PROTOCOL_VERSION, "id": request_id, "status": "cancelled", "message": str(exc)})
        else:
            send(error_header(request_id, type(exc).__name__, str(exc)))
    except (ValueError, TypeError, KeyError) as exc:
        send(error_header(request_id, "BadRequest", f"{type(exc).__name__}: {exc}"))
    except Exception as exc:  # a model error must not kill the worker: report it and go on
        log.exception("request %s failed", request_id)
        send(error_header(request_id, "InternalError", f"{type(exc).__name__}: {exc}"))
    return stop


def run_worker(connect: str, server_key_file: str, worker_cert_file: str, model: Optional[str] = None,
               device: str = "auto", name: Optional[str] = None, threads: Optional[int] = None,
               max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
    """A worker on another machine: connect to a server's backend with this worker's key (its
    public half must be in the server's allowed-workers folder) and serve until stopped."""
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(server_key_file)
    public, secret = zmq.auth.load_certificate(worker_cert_file)
    if secret is None:
        raise ValueError(f"{worker_cert_file} holds no secret key; pass this worker's .key_secret file")
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    print(f"liverseg worker {name} connecting to {connect}", flush=True)
    worker_main(connect, model, device, name, threads or (os.cpu_count() or 1), max_message_bytes,
                (server_public, public, secret))
