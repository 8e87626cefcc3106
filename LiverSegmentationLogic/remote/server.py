"""The ZeroMQ inference server: a ROUTER front end that balances requests over worker processes.

    clients (DEALER) --> [frontend ROUTER | broker | backend ROUTER] <-- workers (DEALER)

Standard ZeroMQ load balancing: a worker says READY (with its model info) and is given one
request at a time. Workers run exactly :func:`inference.pipeline.segment_case`, the code of local inference.
Malformed requests are answered with an error reply; a worker that dies is reported to the client
whose request it held and replaced. Workers may also run on other machines and connect to the
backend address (``liverseg serve --backend tcp://...``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import zmq

from .. import __version__
from ..errors import LiverSegError, ProtocolError, ProtocolVersionError
from .protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    SUPPORTED_PROTOCOLS,
    channel_volumes_from,
    check_request,
    encode_array,
    pack,
    unpack,
    volume_from,
)

log = logging.getLogger("liverseg.server")

READY = b"READY"
STOP = b"STOP"
FINAL_STATUSES = ("ok", "error", "cancelled")
HEARTBEAT_S = 1.0  # queued requests get an event this often, so clients know the server lives
DEFAULT_CLIENT_TIMEOUT_S = 10.0  # a job whose client sent no heartbeat for this long is abandoned
MAX_FAILED_STARTS = 3  # a worker that cannot even load its model is not restarted for ever


def error_header(request_id, kind: str, message: str) -> dict:
    return {
        "protocol": PROTOCOL_VERSION,
        "id": request_id,
        "status": "error",
        "error": {"type": kind, "message": message},
    }


# --------------------------------------------------------------------------------------- worker
def worker_main(backend: str, model: Optional[str], device: str, name: str, threads: int, max_bytes: int):
    """Entry point of a worker process: load the model once, then serve requests forever."""
    import torch

    from ..inference.segmenter import Segmenter
    from ..models.model_files import load_model

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the broker decides when workers stop
    loaded = load_model(model)
    segmenter = Segmenter(loaded, device=device)
    if segmenter.device.type == "cpu":
        torch.set_num_threads(max(1, threads))  # share the cores between the workers
    info = {
        "worker": name,
        "pid": os.getpid(),
        "device": str(segmenter.device),
        "model": {k: loaded.card.get(k) for k in ("name", "version", "task", "modality", "sha256")},
        "classes": [c["name"] for c in loaded.classes],
    }
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, name.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(backend)
    sock.send_multipart([READY, json.dumps(info).encode()])
    try:
        while True:
            frames = sock.recv_multipart(copy=False)
            if frames[0].bytes == STOP:
                break
            client, msg = frames[0].bytes, frames[1:]
            _serve_one(sock, client, msg, segmenter, max_bytes)
    finally:
        sock.close()
        ctx.term()


def _serve_one(sock, client: bytes, frames, segmenter, max_bytes: int):
    from ..inference.pipeline import segment_case

    request_id = None
    t0 = time.perf_counter()

    def send(header, buffers=()):
        sock.send_multipart([client] + pack(header, buffers), copy=False)

    cancelled = False

    def progress(done, total, stage):
        nonlocal cancelled
        send({"protocol": PROTOCOL_VERSION, "id": request_id, "status": "event", "event": "progress",
              "stage": stage, "done": done, "total": total})
        while sock.poll(0):  # while busy the broker only sends cancel or stop
            more = sock.recv_multipart()
            if more[0] == STOP or json.loads(more[-1]).get("op") == "cancel":
                cancelled = True

    try:
        header, buffers = unpack([f.buffer for f in frames], max_bytes)
        request_id = header.get("id")
        channels = channel_volumes_from(header, buffers)
        if not channels:
            raise ProtocolError("a segment request needs an array named 'image'")
        ff_map = volume_from(header, buffers, "ff_map")
        options = header.get("options") or {}
        result, readout = segment_case(
            segmenter,
            channels,
            ff_map,
            margin_mm=float(options.get("margin_mm", 3.0)),
            ff_unit=options.get("ff_unit", "auto"),
            progress=progress,
            cancel=lambda: cancelled,
        )
        desc, buf = encode_array("labels", result.labels, result.geometry, options.get("label_compression", "zlib"))
        readout["timings"]["server_total"] = time.perf_counter() - t0
        send(
            {"protocol": PROTOCOL_VERSION, "id": request_id, "status": "ok", "readout": readout,
             "classes": result.classes, "arrays": [desc]},
            [buf],
        )
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


# --------------------------------------------------------------------------------------- broker
def _task_listing() -> dict:
    """Task name -> its active model on this server's machine (None where none is trained)."""
    from ..models.catalog import active_models
    from ..models.tasks import list_tasks

    active = active_models()
    return {task.name: active[task.name].ref if task.name in active else None for task in list_tasks()}


@dataclass
class _Job:
    client: bytes
    request_id: str
    frames: list
    size: int
    last_seen: float = field(default_factory=time.monotonic)  # the client's last heartbeat
    abandoned: bool = False


@dataclass
class _Worker:
    name: str
    process: Optional[mp.Process] = None
    info: dict = field(default_factory=dict)
    job: Optional[_Job] = None


class InferenceServer:
    """Broker plus local worker processes.

    Args:
        bind: front-end address for clients (loopback by default).
        workers: number of local worker processes (0: only remote workers connecting to ``backend``).
        model: model name or path (default: the active default model).
        device: worker device (``auto``, ``cpu``, ``cuda``...).
        backend: address workers connect to; an ephemeral loopback port by default.
        max_message_bytes: larger requests are refused with an error reply.
        curve_secret_file: the server's CurveZMQ secret certificate (``liverseg keys``); enables Curve.
        curve_clients_dir: folder of allowed client public certificates (required with Curve).
        client_timeout_s: a request whose client sent no heartbeat for this long (the client was
            killed or lost its network) is dropped from the queue or cancelled on its worker.
        queue_dir: the fine-tuning queue that ``submit`` requests write into (none: refused).
    """

    def __init__(
        self,
        bind: str = "tcp://127.0.0.1:5555",
        workers: int = 1,
        model: Optional[str] = None,
        device: str = "auto",
        backend: Optional[str] = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        curve_secret_file: Optional[str] = None,
        curve_clients_dir: Optional[str] = None,
        client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S,
        queue_dir: Optional[str] = None,
    ):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.model, self.device, self.n_workers = model, device, workers
        self.client_timeout_s = client_timeout_s
        self.queue_dir = queue_dir
        self.max_bytes = max_message_bytes
        self.ctx = zmq.Context()
        self.auth = None
        self.frontend = self.ctx.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.LINGER, 0)
        # hard cap per frame (libzmq drops the connection beyond it); below it, oversized requests get
        # an error reply from unpack()
        self.frontend.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes + (1 << 20))
        if curve_secret_file:
            self._enable_curve(curve_secret_file, curve_clients_dir)
        self.frontend.bind(bind)
        self.address = self.frontend.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.backend = self.ctx.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.LINGER, 0)
        if backend:
            self.backend.bind(backend)
        else:
            self.backend.bind_to_random_port("tcp://127.0.0.1")
        self.backend_address = self.backend.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.workers: dict[str, _Worker] = {}
        self.free: deque[str] = deque()
        self.queue: deque[_Job] = deque()
        self._spawned = 0
        self._failed_starts = 0  # workers that died before becoming ready, in a row
        self._stop = False
        self._last_heartbeat = time.monotonic()

    def _enable_curve(self, secret_file: str, clients_dir: Optional[str]):
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        if not clients_dir or not Path(clients_dir).is_dir():
            raise ValueError("CurveZMQ needs a folder of allowed client public keys (--curve-clients)")
        public, secret = zmq.auth.load_certificate(secret_file)
        if secret is None:
            raise ValueError(f"{secret_file} holds no secret key; pass the server's .key_secret file")
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(clients_dir))
        self.frontend.curve_secretkey = secret
        self.frontend.curve_publickey = public
        self.frontend.curve_server = True

    # ---------------------------------------------------------------- workers
    def _spawn_worker(self):
        self._spawned += 1
        name = f"worker-{self._spawned}"
        threads = max(1, (os.cpu_count() or 1) // max(1, self.n_workers))
        process = mp.get_context("spawn").Process(
            target=worker_main,
            args=(self.backend_address, self.model, self.device, name, threads, self.max_bytes),
            name=name,
            daemon=True,
        )
        process.start()
        self.workers[name] = _Worker(name, process)
        log.info("started %s (pid %s)", name, process.pid)

    def _check_workers(self):
        for name, worker in list(self.workers.items()):
            if worker.process is None or worker.process.is_alive():
                continue
            code = worker.process.exitcode
            log.error("%s died (exit code %s)", name, code)
            if worker.job is not None:
                self._reply(worker.job.client, error_header(
                    worker.job.request_id, "WorkerDiedError",
                    f"the worker running this request died (exit code {code}); the request was not completed, "
                    "please retry"))
            del self.workers[name]
            if name in self.free:
                self.free.remove(name)
            self._failed_starts = 0 if worker.info else self._failed_starts + 1
            if self._failed_starts >= MAX_FAILED_STARTS:
                log.error("workers die before they are ready (%d in a row; see the log above): not restarting",
                          self._failed_starts)
                for job in self.queue:
                    self._reply(job.client, error_header(job.request_id, "WorkerStartError", self._broken_message()))
                self.queue.clear()
            elif not self._stop:
                self._spawn_worker()

    # ---------------------------------------------------------------- messages
    def _reply(self, client: bytes, header: dict, buffers=()):
        self.frontend.send_multipart([client] + pack(header, buffers), copy=False)

    def _info(self) -> dict:
        ready = [w.info for w in self.workers.values() if w.info]
        return {
            "server_version": __version__,
            "protocol": PROTOCOL_VERSION,
            "protocols": list(SUPPORTED_PROTOCOLS),
            "capabilities": ["segment", "progress", "cancel", "heartbeat", "zlib"]
            + (["submit"] if self.queue_dir else []),
            "client_timeout_s": self.client_timeout_s,
            "workers": len(ready),
            "busy": sum(1 for w in self.workers.values() if w.job),
            "queued": len(self.queue),
            "models": ready[0]["model"] if ready else None,
            "tasks": _task_listing(),
            "worker_list": [
                {"name": w.name, "pid": w.info.get("pid"), "busy": w.job is not None}
                for w in self.workers.values()
                if w.info
            ],
            "devices": sorted({w["device"] for w in ready}),
            "max_message_bytes": self.max_bytes,
        }

    def _on_frontend(self):
        client, *frames = self.frontend.recv_multipart(copy=False)
        client = client.bytes
        request_id = None
        try:
            header, _ = unpack([f.buffer for f in frames], self.max_bytes)
            request_id = header.get("id")
            check_request(header)
        except ProtocolVersionError as exc:
            self._reply(client, error_header(request_id, "ProtocolVersionError", str(exc)))
            return
        except ProtocolError as exc:
            log.warning("bad request from %s: %s", client.hex(), exc)
            self._reply(client, error_header(request_id or exc.request_id, "ProtocolError", str(exc)))
            return
        size = sum(len(f) for f in frames)
        op = header["op"]
        log.info("request %s op=%s %d bytes", request_id, op, size)
        if op == "info":
            self._reply(client, {"protocol": PROTOCOL_VERSION, "id": request_id, "status": "ok", "info": self._info()})
        elif op == "cancel":
            self._cancel(client, header)
        elif op == "submit":
            self._submit(client, header, frames)
        elif op == "heartbeat":
            job = self._find_job(client, header.get("target"))
            if job is not None:
                job.last_seen = time.monotonic()
        elif self._failed_starts >= MAX_FAILED_STARTS and not self.free:
            self._reply(client, error_header(request_id, "WorkerStartError", self._broken_message()))
        else:
            self.queue.append(_Job(client, request_id, frames, size))
            self._reply(client, {"protocol": PROTOCOL_VERSION, "id": request_id, "status": "event",
                                 "event": "accepted", "queue_position": len(self.queue)})
            self._dispatch()

    def _submit(self, client: bytes, header: dict, frames):
        """Write a corrected case into this server's fine-tuning queue (done here, in the broker:
        a few MB to disk, no model needed)."""
        from ..studies.case_queue import CaseQueue
        from ..io.volumes import validate_volume

        request_id = header["id"]
        try:
            if not self.queue_dir:
                raise ProtocolError("this server has no fine-tuning queue (start it with --queue DIR)")
            _, buffers = unpack([f.buffer for f in frames], self.max_bytes)
            image, label = volume_from(header, buffers, "image"), volume_from(header, buffers, "label")
            if image is None or label is None:
                raise ProtocolError("a submit request needs arrays named 'image' and 'label'")
            validate_volume(image, "image")
            options = header.get("options") or {}
            meta = options.get("meta") or {}
            if not isinstance(meta, dict):
                raise ProtocolError("options.meta must be a JSON object")
            queue = CaseQueue(self.queue_dir, labels=options.get("labels"), modality=meta.get("modality", "MR"))
            record = queue.add(image, label.array, meta, on_duplicate=options.get("on_duplicate", "replace"))
            log.info("request %s queued case %s", request_id, record["case_id"])
            self._reply(client, {"protocol": PROTOCOL_VERSION, "id": request_id, "status": "ok", "record": record})
        except (LiverSegError, ValueError) as exc:
            self._reply(client, error_header(request_id, type(exc).__name__, str(exc)))

    def _broken_message(self) -> str:
        return (f"the server's workers cannot start (the model {self.model or 'default'!s} failed to load "
                "on the server, see its log); nothing can be segmented until it is restarted")

    def _find_job(self, client: bytes, request_id) -> Optional[_Job]:
        running = [w.job for w in self.workers.values() if w.job]
        return next((j for j in [*self.queue, *running] if j.client == client and j.request_id == request_id), None)

    def _cancel(self, client: bytes, header: dict):
        target = header.get("target")
        for job in list(self.queue):
            if job.client == client and job.request_id == target:
                self.queue.remove(job)
                self._reply(client, {"protocol": PROTOCOL_VERSION, "id": target, "status": "cancelled",
                                     "message": "cancelled before it started"})
                break
        else:
            for worker in self.workers.values():
                if worker.job and worker.job.client == client and worker.job.request_id == target:
                    self.backend.send_multipart([worker.name.encode(), client, json.dumps({"op": "cancel"}).encode()])
        self._reply(client, {"protocol": PROTOCOL_VERSION, "id": header["id"], "status": "ok"})

    def _on_backend(self):
        worker_id, *frames = self.backend.recv_multipart(copy=False)
        name = worker_id.bytes.decode()
        if frames[0].bytes == READY:
            worker = self.workers.setdefault(name, _Worker(name))  # remote workers register here
            worker.info = json.loads(frames[1].bytes)
            worker.job = None
            self.free.append(name)
            log.info("%s ready: %s on %s", name, worker.info["model"]["name"], worker.info["device"])
            self._dispatch()
            return
        client, reply = frames[0].bytes, frames[1:]
        self.frontend.send_multipart([client] + reply, copy=False)
        header = json.loads(reply[0].bytes)
        if header.get("status") in FINAL_STATUSES:
            worker = self.workers.get(name)
            if worker is not None:
                worker.job = None
                self.free.append(name)
            self._dispatch()

    def _dispatch(self):
        while self.queue and self.free:
            name = self.free.popleft()
            if name not in self.workers:
                continue
            job = self.queue.popleft()
            self.workers[name].job = job
            self.backend.send_multipart([name.encode(), job.client] + job.frames, copy=False)

    def _heartbeat(self):
        now = time.monotonic()
        if now - self._last_heartbeat < HEARTBEAT_S:
            return
        self._last_heartbeat = now
        for job in [j for j in self.queue if now - j.last_seen > self.client_timeout_s]:
            log.warning("request %s dropped from the queue: its client is gone", job.request_id)
            self.queue.remove(job)
        for worker in self.workers.values():
            job = worker.job
            if job and not job.abandoned and now - job.last_seen > self.client_timeout_s:
                log.warning("request %s cancelled on %s: its client is gone", job.request_id, worker.name)
                job.abandoned = True
                self.backend.send_multipart([worker.name.encode(), job.client, json.dumps({"op": "cancel"}).encode()])
        for position, job in enumerate(self.queue, 1):
            self._reply(job.client, {"protocol": PROTOCOL_VERSION, "id": job.request_id, "status": "event",
                                     "event": "queued", "queue_position": position})

    # ---------------------------------------------------------------- loop
    def stop(self, *_):
        self._stop = True

    def serve_forever(self):
        """Run until :meth:`stop` (also bound to SIGINT/SIGTERM in the main thread)."""
        for _ in range(self.n_workers):
            self._spawn_worker()
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        log.info("serving on %s (workers connect to %s)", self.address, self.backend_address)
        try:
            while not self._stop:
                events = dict(poller.poll(200))
                if self.backend in events:
                    self._on_backend()
                if self.frontend in events:
                    self._on_frontend()
                self._check_workers()
                self._heartbeat()
        finally:
            self.close()

    def close(self):
        for worker in self.workers.values():
            try:
                self.backend.send_multipart([worker.name.encode(), STOP], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        deadline = time.monotonic() + 3
        for worker in self.workers.values():
            if worker.process is not None:
                worker.process.join(max(0.1, deadline - time.monotonic()))
                if worker.process.is_alive():
                    worker.process.terminate()
        for job in self.queue:
            self._reply(job.client, error_header(job.request_id, "ServerShutdown", "the server is shutting down"))
        if self.auth is not None:
            self.auth.stop()
        self.frontend.close(0)
        self.backend.close(0)
        self.ctx.term()
        log.info("server stopped")


def serve(**kwargs):
    """Start a server in this process and block; SIGINT/SIGTERM stop it gracefully."""
    server = InferenceServer(**kwargs)
    signal.signal(signal.SIGINT, server.stop)
    signal.signal(signal.SIGTERM, server.stop)
    print(f"liverseg server listening on {server.address}", flush=True)
    server.serve_forever()
