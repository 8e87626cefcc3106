"""The ZeroMQ inference server: a ROUTER front end that balances requests over worker processes.

    clients (DEALER) --> [frontend ROUTER | broker | backend ROUTER (CurveZMQ)] <-- workers (DEALER)

Load balancing: a worker (:mod:`worker`) says READY (with its model info) and is given one job at
a time; it runs exactly :func:`inference.pipeline.segment_case`, the code of local inference.

Broker and workers speak their own small protocol: every job carries a token of the broker's, and a
reply is forwarded only when it comes from the worker that holds that job, for that job. Workers
send heartbeats; one that dies or stays silent for ``worker_timeout_s`` is dropped, its client gets
a ``WorkerDiedError``, and a local one is killed and replaced. The backend always uses CurveZMQ:
local workers get a key pair made at start-up; workers on other machines (``liverseg worker``)
need a key whose public half is in the allowed-workers folder. So no other process can register
as a worker, receive a scan or forge a result.

Every message on either port is checked before use (sizes, JSON depth, shapes, geometry, option
types; see :mod:`protocol`); a handler that fails answers (or drops) that one message and the
server goes on. Admission control bounds the waiting requests in count and bytes, in all and per
client; corrected cases are written into the queue by a thread of their own, off the event loop.
Model versions can be listed by anyone; fine-tuning (in a process of its own) and activation are
for trainers only (clients whose CurveZMQ key is in the trainers folder).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue as queue_module
import signal
import threading
import time
import uuid
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
    check_request,
    TRAINER_OPS,
    loads_header,
    model_options,
    pack,
    request_id_of,
    submit_options,
    unpack,
    volume_from,
)
from .worker import CANCEL, JOB, READY, REPLY, STOP, error_header, worker_main

log = logging.getLogger("liverseg.server")

FINAL_STATUSES = ("ok", "error", "cancelled")
MODEL_OPS = ("models", "train", "train_status", "train_cancel", "activate", "rollback")
HEARTBEAT_S = 1.0  # queued requests get an event this often, so clients know the server lives
DEFAULT_WORKER_TIMEOUT_S = 10.0  # a worker silent for this long is dead (killed, hung or cut off)
DEFAULT_CLIENT_TIMEOUT_S = 10.0  # a job whose client sent no heartbeat for this long is abandoned
MAX_FAILED_STARTS = 3  # a worker that cannot even load its model is not restarted for ever
DEFAULT_MAX_QUEUED = 32  # requests waiting (not yet on a worker), all clients together
DEFAULT_MAX_QUEUED_PER_CLIENT = 4


def _is_loopback(address: str) -> bool:
    return address.startswith(("ipc://", "inproc://")) or any(
        host in address for host in ("//127.", "//localhost:", "//[::1]:"))


class _AllowedKeys:
    """A ZAP credentials provider: the CurveZMQ public keys (Z85) that may connect."""

    def __init__(self, keys=()):
        self.keys = set(keys)

    def callback(self, domain, key) -> bool:
        return key in self.keys


def _public_keys(folder: Optional[str], what: str) -> set:
    import zmq.auth

    if not folder or not Path(folder).is_dir():
        raise ValueError(f"{what}: {folder!r} is not a folder of public certificates (*.key)")
    return set(zmq.auth.load_certificates(str(folder)))


# --------------------------------------------------------------------------------------- broker
def _task_listing() -> dict:
    """Task name -> its active model on this server's machine (None where none is trained)."""
    from ..models.catalog import active_models
    from ..models.tasks import list_tasks

    active = active_models()
    return {task.name: active[task.name].ref if task.name in active else None for task in list_tasks()}



@dataclass
class _Job:
    client: bytes  # the client connection's ROUTER identity
    owner: bytes  # who the per-client limits count against (the CurveZMQ key, else the connection)
    request_id: str
    frames: Optional[list]  # released once the job is on a worker
    size: int
    token: bytes = field(default_factory=lambda: uuid.uuid4().hex.encode())
    last_seen: float = field(default_factory=time.monotonic)  # the client's last heartbeat
    abandoned: bool = False


@dataclass
class _Worker:
    name: str
    process: Optional[mp.Process] = None
    info: dict = field(default_factory=dict)
    job: Optional[_Job] = None
    last_seen: float = field(default_factory=time.monotonic)


def _worker_info(frame) -> dict:
    """A READY message's info, checked (it names the model and device in ``info`` replies)."""
    info = loads_header(frame)
    model = info.get("model")
    if (not isinstance(model, dict) or not isinstance(model.get("name"), str)
            or not isinstance(info.get("device"), str) or not isinstance(info.get("classes"), list)):
        raise ProtocolError("READY info needs model.name, device and classes")
    return info


class InferenceServer:
    """Broker plus local worker processes.

    Args:
        bind: front-end address for clients (loopback by default).
        workers: number of local worker processes (0: only remote workers connecting to ``backend``).
        model: model name or path (default: the active default model).
        device: worker device (``auto``, ``cpu``, ``cuda``...).
        backend: address workers connect to; an ephemeral loopback port by default.
        max_message_bytes: larger requests are refused with an error reply (and a single frame
            larger than this is cut off by libzmq).
        curve_secret_file: the server's CurveZMQ secret certificate (``liverseg keys``); enables Curve
            for clients, and is the key remote workers check the server by.
        curve_clients_dir: folder of allowed client public certificates (required with Curve).
        curve_workers_dir: folder of public certificates of workers allowed to connect from other
            machines (``liverseg worker``); needs ``curve_secret_file``.
        client_timeout_s: a request whose client sent no heartbeat for this long (the client was
            killed or lost its network) is dropped from the queue or cancelled on its worker.
        worker_timeout_s: a worker silent (no heartbeat) for this long is declared dead.
        queue_dir: the fine-tuning queue that ``submit`` requests write into (none: refused).
        curve_trainers_dir: public certificates of the clients allowed to start fine-tuning and to
            change the active model (needs ``curve_secret_file``); nobody may without it.
        replay_dir: the base model's training data (replay cases and the validation gate); without
            it a fine-tuned version is never activated.
        auto_finetune_every: fine-tune a study's line after every k queued cases of it (0: off).
        finetune_budget_s: training time of an automatic fine-tune.
        max_queued, max_queued_per_client: waiting requests (segment and submit), in all and per client.
        max_queued_bytes, max_queued_bytes_per_client: their bytes (default: 4 and 2 messages' worth).
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
        curve_workers_dir: Optional[str] = None,
        client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S,
        worker_timeout_s: float = DEFAULT_WORKER_TIMEOUT_S,
        queue_dir: Optional[str] = None,
        curve_trainers_dir: Optional[str] = None,
        replay_dir: Optional[str] = None,
        auto_finetune_every: int = 0,
        finetune_budget_s: float = 300.0,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_queued_per_client: int = DEFAULT_MAX_QUEUED_PER_CLIENT,
        max_queued_bytes: Optional[int] = None,
        max_queued_bytes_per_client: Optional[int] = None,
    ):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if min(max_queued, max_queued_per_client) < 1 or max_message_bytes < 1:
            raise ValueError("queue limits and the message size limit must be positive")
        if curve_workers_dir and not curve_secret_file:
            raise ValueError("remote workers (--curve-workers) need the server's certificate (--curve-secret), "
                             "so that they can authenticate the server")
        self.model, self.device, self.n_workers = model, device, workers
        self.client_timeout_s, self.worker_timeout_s = client_timeout_s, worker_timeout_s
        self.queue_dir = queue_dir
        self.replay_dir = replay_dir
        self.auto_finetune_every, self.finetune_budget_s = auto_finetune_every, finetune_budget_s
        self.finetune = None  # the current or last FinetuneRun
        self._new_cases: dict = {}  # study -> cases queued since its last automatic fine-tune
        if curve_trainers_dir and not curve_secret_file:
            raise ValueError("trainers (--curve-trainers) are told apart by their CurveZMQ keys: --curve-secret needed")
        self.trainer_keys = set()
        if curve_trainers_dir:
            self.trainer_keys = _public_keys(curve_trainers_dir, "trainers (--curve-trainers)")
        self.max_bytes = max_message_bytes
        self.limits = {
            "max_queued": max_queued,
            "max_queued_per_client": max_queued_per_client,
            "max_queued_bytes": max_queued_bytes or 4 * max_message_bytes,
            "max_queued_bytes_per_client": max_queued_bytes_per_client or 2 * max_message_bytes,
        }
        self.ctx = zmq.Context()
        self.auth = self._start_authenticator(curve_secret_file, curve_clients_dir, curve_workers_dir)

        self.frontend = self.ctx.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.LINGER, 0)
        # libzmq cuts off a peer that sends a larger frame; below it, unpack() answers an error reply
        self.frontend.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        if self.client_curve:
            self.frontend.zap_domain = b"clients"
            self.frontend.curve_publickey, self.frontend.curve_secretkey = self.server_keys
            self.frontend.curve_server = True
        self.frontend.bind(bind)
        self.address = self.frontend.getsockopt(zmq.LAST_ENDPOINT).decode()

        self.backend = self.ctx.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.LINGER, 0)
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished worker fails, not vanishes
        self.backend.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes + (1 << 20))
        self.backend.zap_domain = b"workers"
        self.backend.curve_publickey, self.backend.curve_secretkey = self.server_keys
        self.backend.curve_server = True
        if backend:
            self.backend.bind(backend)
        else:
            self.backend.bind_to_random_port("tcp://127.0.0.1")
        self.backend_address = self.backend.getsockopt(zmq.LAST_ENDPOINT).decode()
        if not _is_loopback(self.backend_address) and not curve_workers_dir:
            log.warning("the backend listens on %s but no --curve-workers folder is given: only this "
                        "machine's own workers can connect", self.backend_address)

        # corrected cases are written by a thread of their own; it hands the replies back here
        self.submit_results = self.ctx.socket(zmq.PULL)
        self._submit_address = f"inproc://liverseg-submits-{uuid.uuid4().hex}"
        self.submit_results.bind(self._submit_address)
        self._submit_jobs: queue_module.Queue = queue_module.Queue()
        self._submit_thread = threading.Thread(target=self._submit_loop, name="queue-writer", daemon=True)
        self._submit_thread.start()

        self.workers: dict[str, _Worker] = {}
        self.free: deque[str] = deque()
        self.queue: deque[_Job] = deque()
        self._served: dict[bytes, int] = {}  # owner -> when a worker last took one of its jobs (a count)
        self._dispatched = 0
        self.submitting: dict[bytes, _Job] = {}  # by token, until the writer thread answers
        self._spawned = 0
        self._failed_starts = 0  # workers that died before becoming ready, in a row
        self._stop = False
        self._last_heartbeat = time.monotonic()

    def _start_authenticator(self, secret_file, clients_dir, workers_dir):
        """CurveZMQ keys and the ZAP handler: clients (optional) and workers (always)."""
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        if secret_file:
            public, secret = zmq.auth.load_certificate(secret_file)
            if secret is None:
                raise ValueError(f"{secret_file} holds no secret key; pass the server's .key_secret file")
            self.server_keys = (public, secret)
        else:
            self.server_keys = zmq.curve_keypair()
        self.local_worker_keys = zmq.curve_keypair()  # handed to this server's own workers only
        self.client_curve = bool(secret_file)
        auth = ThreadAuthenticator(self.ctx)
        auth.start()
        worker_keys = {self.local_worker_keys[0]}
        if workers_dir:
            worker_keys |= _public_keys(workers_dir, "allowed workers (--curve-workers)")
        auth.configure_curve_callback(domain="workers", credentials_provider=_AllowedKeys(worker_keys))
        if secret_file:
            if not clients_dir:
                auth.stop()
                raise ValueError("CurveZMQ needs a folder of allowed client public keys (--curve-clients)")
            clients = _public_keys(clients_dir, "allowed clients (--curve-clients)")
            auth.configure_curve_callback(domain="clients", credentials_provider=_AllowedKeys(clients))
        return auth

    # ---------------------------------------------------------------- workers
    def _spawn_worker(self):
        self._spawned += 1
        name = f"worker-{self._spawned}"
        threads = max(1, (os.cpu_count() or 1) // max(1, self.n_workers))
        curve = (self.server_keys[0], *self.local_worker_keys)
        process = mp.get_context("spawn").Process(
            target=worker_main,
            args=(self.backend_address, self.model, self.device, name, threads, self.max_bytes, curve),
            name=name,
            daemon=True,
        )
        process.start()
        self.workers[name] = _Worker(name, process)
        log.info("started %s (pid %s)", name, process.pid)

    def _check_workers(self):
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if worker.process is not None and not worker.process.is_alive():
                reason = f"exit code {worker.process.exitcode}"
            elif worker.info and now - worker.last_seen > self.worker_timeout_s:
                reason = f"no heartbeat for {now - worker.last_seen:.0f}s"
            else:
                continue
            self._drop_worker(worker, reason)

    def _drop_worker(self, worker: _Worker, reason: str, job_delivered: bool = True):
        """Remove a dead worker; its job is answered (or put back if it never reached the worker)."""
        log.error("%s is dead (%s)", worker.name, reason)
        if worker.process is not None and worker.process.is_alive():
            worker.process.kill()  # hung or stopped: it must not come back holding a job
            worker.process.join(5)
        self.workers.pop(worker.name, None)
        if worker.name in self.free:
            self.free.remove(worker.name)
        job, worker.job = worker.job, None
        if job is not None and job_delivered:
            self._reply(job.client, error_header(
                job.request_id, "WorkerDiedError",
                f"the worker running this request died ({reason}); the request was not completed, please retry"))
        elif job is not None:
            self.queue.appendleft(job)
        if worker.process is None:
            return  # a remote worker: it may connect again by itself
        self._failed_starts = 0 if worker.info else self._failed_starts + 1
        if self._failed_starts >= MAX_FAILED_STARTS:
            log.error("workers die before they are ready (%d in a row; see the log above): not restarting",
                      self._failed_starts)
            for waiting in self.queue:
                self._reply(waiting.client, error_header(waiting.request_id, "WorkerStartError",
                                                         self._broken_message()))
            self.queue.clear()
        elif not self._stop:
            self._spawn_worker()

    # ---------------------------------------------------------------- messages
    def _reply(self, client: bytes, header: dict, buffers=()):
        self._send_client([client] + pack(header, buffers))

    def _send_client(self, frames):
        try:
            self.frontend.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # the client is gone or not reading: nothing more to do
            log.warning("reply to a client dropped: %s", exc)

    def _info(self) -> dict:
        ready = [w.info for w in self.workers.values() if w.info]
        return {
            "server_version": __version__,
            "protocol": PROTOCOL_VERSION,
            "protocols": list(SUPPORTED_PROTOCOLS),
            "capabilities": ["segment", "progress", "cancel", "heartbeat", "zlib", "models", "study"]
            + (["submit", "train"] if self.queue_dir else []),
            "client_timeout_s": self.client_timeout_s,
            "worker_timeout_s": self.worker_timeout_s,
            "workers": len(ready),
            "busy": sum(1 for w in self.workers.values() if w.job),
            "queued": len(self.queue),
            "models": ready[0]["model"] if ready else None,
            "tasks": _task_listing(),
            "worker_list": [
                {"name": w.name, "pid": w.info.get("pid"), "host": w.info.get("host"), "busy": w.job is not None}
                for w in self.workers.values()
                if w.info
            ],
            "devices": sorted({w["device"] for w in ready}),
            "max_message_bytes": self.max_bytes,
            "limits": dict(self.limits),
        }

    def _curve_key(self, identity_frame) -> Optional[bytes]:
        """The client's CurveZMQ public key (None without CurveZMQ)."""
        if self.client_curve:
            try:
                return identity_frame.get("User-Id").encode()
            except (zmq.ZMQError, AttributeError):
                pass
        return None

    def _owner(self, identity_frame, header: dict) -> bytes:
        """Who a request counts against (limits, fair share): the client's CurveZMQ key; without
        CurveZMQ the session it names (the sockets of one batch share one), else its connection."""
        key = self._curve_key(identity_frame)
        if key is not None:
            return key
        if header.get("session"):
            return b"session:" + header["session"].encode()
        return identity_frame.bytes

    def _on_frontend(self):
        identity, *frames = self.frontend.recv_multipart(copy=False)
        client = identity.bytes
        if not frames:
            return  # nothing to answer: a frame with no message
        request_id = None
        try:
            header, _ = unpack([f.buffer for f in frames], self.max_bytes)
            request_id = request_id_of(header)
            check_request(header, self.max_bytes)
        except ProtocolVersionError as exc:
            self._reply(client, error_header(request_id, "ProtocolVersionError", str(exc)))
            return
        except ProtocolError as exc:
            log.warning("bad request from %s: %s", client.hex(), exc)
            self._reply(client, error_header(request_id or request_id_of({"id": exc.request_id}),
                                             "ProtocolError", str(exc)))
            return
        op = header["op"]
        size = sum(len(f) for f in frames)
        log.info("request %s op=%s %d bytes", request_id, op, size)
        if op == "info":
            self._reply(client, {"protocol": PROTOCOL_VERSION, "id": request_id, "status": "ok", "info": self._info()})
        elif op == "cancel":
            self._cancel(client, header)
        elif op == "heartbeat":
            job = self._find_job(client, header["target"])
            if job is not None:
                job.last_seen = time.monotonic()
        elif op in MODEL_OPS:
            self._model_op(client, identity, header)
        elif op == "submit" and not self.queue_dir:
            self._reply(client, error_header(request_id, "ProtocolError",
                                             "this server has no fine-tuning queue (start it with --queue DIR)"))
        elif op == "segment" and self._failed_starts >= MAX_FAILED_STARTS and not self.free:
            self._reply(client, error_header(request_id, "WorkerStartError", self._broken_message()))
        else:
            job = _Job(client, self._owner(identity, header), request_id, frames, size)
            busy = self._admission_refusal(job)
            if busy:
                log.warning("request %s refused: %s", request_id, busy)
                self._reply(client, error_header(request_id, "ServerBusy", f"server busy ({busy}); retry later"))
            elif op == "submit":
                self.submitting[job.token] = job
                self._submit_jobs.put(job)
            else:
                self.queue.append(job)
                self._reply(client, {"protocol": PROTOCOL_VERSION, "id": request_id, "status": "event",
                                     "event": "accepted", "queue_position": len(self.queue)})
                self._dispatch()

    def _admission_refusal(self, job: _Job) -> Optional[str]:
        """Why the job cannot wait for a worker now (None: it can)."""
        waiting = [*self.queue, *self.submitting.values()]
        mine = [j for j in waiting if j.owner == job.owner]
        limits = self.limits
        if len(waiting) >= limits["max_queued"]:
            return f"{len(waiting)} requests waiting"
        if len(mine) >= limits["max_queued_per_client"]:
            return f"this client already has {len(mine)} requests waiting"
        if sum(j.size for j in waiting) + job.size > limits["max_queued_bytes"]:
            return f"{sum(j.size for j in waiting) / 2**20:.0f} MB of requests waiting"
        if sum(j.size for j in mine) + job.size > limits["max_queued_bytes_per_client"]:
            return f"this client already has {sum(j.size for j in mine) / 2**20:.0f} MB of requests waiting"
        return None

    # ---------------------------------------------------------------- submits (writer thread)
    def _submit_loop(self):
        results = self.ctx.socket(zmq.PUSH)
        results.setsockopt(zmq.LINGER, 0)
        results.connect(self._submit_address)
        try:
            while (job := self._submit_jobs.get()) is not None:
                header = self._write_case(job)
                results.send_multipart([job.token, job.client] + pack(header))
        finally:
            results.close()

    def _write_case(self, job: _Job) -> dict:
        """Write a corrected case into this server's fine-tuning queue -> the reply header."""
        from ..io.volumes import validate_volume
        from ..studies.case_queue import CaseQueue

        try:
            header, buffers = unpack([f.buffer for f in job.frames], self.max_bytes)
            options = submit_options(header.get("options") or {})
            image = volume_from(header, buffers, "image", self.max_bytes)
            label = volume_from(header, buffers, "label", self.max_bytes)
            if image is None or label is None:
                raise ProtocolError("a submit request needs arrays named 'image' and 'label'")
            validate_volume(image, "image")
            queue = CaseQueue(self.queue_dir, labels=options["labels"], modality=options["meta"].get("modality"))
            record = queue.add(image, label.array, options["meta"], on_duplicate=options["on_duplicate"])
            log.info("request %s queued case %s", job.request_id, record["case_id"])
            return {"protocol": PROTOCOL_VERSION, "id": job.request_id, "status": "ok", "record": record}
        except LiverSegError as exc:
            return error_header(job.request_id, type(exc).__name__, str(exc))
        except Exception as exc:  # never let one case stop the writer
            log.exception("request %s: the case could not be queued", job.request_id)
            return error_header(job.request_id, "InternalError", f"{type(exc).__name__}: {exc}")

    def _on_submit_result(self):
        token, client, *reply = self.submit_results.recv_multipart()
        self.submitting.pop(token, None)
        self._send_client([client, *reply])
        header = json.loads(reply[0])
        if header.get("status") == "ok" and self.auto_finetune_every:
            self._count_for_auto_finetune(header["record"].get("study"))

    # ---------------------------------------------------------------- models and fine-tuning
    def _is_trainer(self, identity) -> bool:
        return self._curve_key(identity) in self.trainer_keys  # a key, never a name a client chose

    def _model_op(self, client: bytes, identity, header: dict):
        """models (anyone), and for trainers only: train, train_cancel, activate, rollback."""
        from ..models import catalog

        op, request_id = header["op"], header["id"]
        try:
            options = model_options(header.get("options") or {})
            if op in TRAINER_OPS and not self._is_trainer(identity):
                raise PermissionError("only trainers may start training or change the active model: connect with "
                                      "CurveZMQ using a key in the server's --curve-trainers folder")
            name = options["model"] or self.model or catalog.DEFAULT_MODEL
            if op == "models":
                active = catalog.active_models(options["study"]).get(name.partition("@")[0])
                answer = {"models": [{"ref": e.ref, "bundled": e.bundled, "active": e == active,
                                      "promotion": e.card.get("promotion", {}).get("reason")}
                                     for e in catalog.list_models() if e.name == name.partition("@")[0]]}
            elif op == "activate":
                entry = catalog.activate(name, study=options["study"])
                answer = {"active": catalog.find_model(entry.name, options["study"]).ref}
            elif op == "rollback":
                answer = {"active": catalog.rollback(name, study=options["study"]).ref}
            elif op == "train":
                answer = {"train": self._start_finetune(name, options["study"], options["time_budget_s"]).status()}
            elif self.finetune is None:
                raise LookupError("no fine-tuning has run on this server yet")
            else:
                if op == "train_cancel":
                    self.finetune.cancel()
                answer = {"train": self.finetune.status()}
            self._reply(client, {"protocol": PROTOCOL_VERSION, "id": request_id, "status": "ok", **answer})
        except PermissionError as exc:
            self._reply(client, error_header(request_id, "NotAllowed", str(exc)))
        except (LiverSegError, LookupError, ValueError) as exc:
            self._reply(client, error_header(request_id, type(exc).__name__, str(exc)))

    def _start_finetune(self, model: str, study: Optional[str], time_budget_s: float):
        from .finetune_runs import RUNNING, FinetuneRun

        if not self.queue_dir:
            raise LookupError("this server has no fine-tuning queue (start it with --queue DIR)")
        if self.finetune is not None and self.finetune.state == RUNNING:
            raise LookupError(f"a fine-tuning is already running ({self.finetune.id}); wait for it or cancel it")
        self.finetune = FinetuneRun(model, self.queue_dir, study, self.replay_dir, time_budget_s, self.device)
        log.info("fine-tuning %s started (%s, study %s)", self.finetune.id, model, study)
        return self.finetune

    def _count_for_auto_finetune(self, study: Optional[str]):
        """Auto mode: fine-tune a study's line after every k new cases of it (when nothing runs)."""
        from .finetune_runs import RUNNING

        key = study or ""
        self._new_cases[key] = self._new_cases.get(key, 0) + 1
        if self._new_cases[key] >= self.auto_finetune_every and not (
                self.finetune is not None and self.finetune.state == RUNNING):
            from ..models.catalog import DEFAULT_MODEL

            self._new_cases[key] = 0
            try:
                self._start_finetune(self.model or DEFAULT_MODEL, study, self.finetune_budget_s)
            except (LiverSegError, LookupError, OSError) as exc:
                log.error("automatic fine-tuning for study %s could not start: %s", study, exc)

    # ---------------------------------------------------------------- jobs
    def _broken_message(self) -> str:
        return (f"the server's workers cannot start (the model {self.model or 'default'!s} failed to load "
                "on the server, see its log); nothing can be segmented until it is restarted")

    def _find_job(self, client: bytes, request_id) -> Optional[_Job]:
        running = [w.job for w in self.workers.values() if w.job]
        return next((j for j in [*self.queue, *running] if j.client == client and j.request_id == request_id), None)

    def _send_worker(self, worker: _Worker, frames) -> bool:
        try:
            self.backend.send_multipart([worker.name.encode(), *frames], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: it disconnected; EAGAIN: it stopped reading
            self._drop_worker(worker, f"unreachable: {exc}", job_delivered=False)
            return False

    def _cancel(self, client: bytes, header: dict):
        target = header["target"]
        job = self._find_job(client, target)
        if job is not None and job in self.queue:
            self.queue.remove(job)
            self._reply(client, {"protocol": PROTOCOL_VERSION, "id": target, "status": "cancelled",
                                 "message": "cancelled before it started"})
        elif job is not None:
            worker = next(w for w in self.workers.values() if w.job is job)
            self._send_worker(worker, [CANCEL, job.token])
        self._reply(client, {"protocol": PROTOCOL_VERSION, "id": header["id"], "status": "ok"})

    def _on_backend(self):
        frames = self.backend.recv_multipart(copy=False)
        if len(frames) < 2:
            return
        name = frames[0].bytes.decode("utf-8", "replace")
        kind = frames[1].bytes
        worker = self.workers.get(name)
        if kind == READY and len(frames) == 3:
            try:
                info = _worker_info(frames[2].buffer)
            except ProtocolError as exc:
                log.warning("worker %r sent a bad READY: %s", name, exc)
                return
            if worker is not None and worker.job is not None:  # it restarted while holding a job
                self._drop_worker(worker, "it registered again in the middle of a job")
                if worker.process is not None:
                    return
            worker = self.workers.setdefault(name, _Worker(name))  # remote workers register here
            worker.info, worker.job, worker.last_seen = info, None, time.monotonic()
            if name not in self.free:
                self.free.append(name)
            log.info("%s ready: %s on %s", name, info["model"]["name"], info["device"])
            self._dispatch()
            return
        if worker is None or not worker.info:
            log.warning("message from unregistered worker %r dropped", name)
            return
        worker.last_seen = time.monotonic()
        if kind != REPLY:
            return  # a heartbeat, or nothing we know
        job = worker.job
        if len(frames) < 4 or job is None or frames[2].bytes != job.token:
            log.warning("%s sent a reply for a job it does not hold: dropped", name)
            return
        try:
            header = loads_header(frames[3].buffer)
            status = header.get("status")
            if header.get("id") != job.request_id or status not in (*FINAL_STATUSES, "event"):
                raise ProtocolError(f"reply with id {header.get('id')!r:.40} and status {status!r:.20}")
        except ProtocolError as exc:
            log.error("%s sent a malformed reply (%s): the request fails", name, exc)
            header, status = error_header(job.request_id, "InternalError", "the worker sent a malformed reply"), "error"
            self._reply(job.client, header)
        else:
            self._send_client([job.client] + frames[3:])
        if status in FINAL_STATUSES:
            worker.job = None
            self.free.append(name)
            self._dispatch()

    def _dispatch(self):
        while self.queue and self.free:
            name = self.free.popleft()
            worker = self.workers.get(name)
            if worker is None or worker.job is not None:
                continue
            job = self._next_job()
            worker.job = job
            if self._send_worker(worker, [JOB, job.token, *job.frames]):
                job.frames = None  # the broker no longer needs the bytes

    def _next_job(self) -> _Job:
        """The waiting job of the client served longest ago, first come first served within a
        client: a client that keeps many requests waiting (a batch) cannot starve another."""
        job = min(self.queue, key=lambda j: self._served.get(j.owner, -1))  # min keeps the first of equals
        self.queue.remove(job)
        self._dispatched += 1
        self._served[job.owner] = self._dispatched
        if len(self._served) > 1024:  # forget clients with nothing waiting (new connections keep coming)
            waiting = {j.owner for j in self.queue}
            self._served = {owner: n for owner, n in self._served.items() if owner in waiting}
        return job

    def _heartbeat(self):
        now = time.monotonic()
        if now - self._last_heartbeat < HEARTBEAT_S:
            return
        self._last_heartbeat = now
        for job in [j for j in self.queue if now - j.last_seen > self.client_timeout_s]:
            log.warning("request %s dropped from the queue: its client is gone", job.request_id)
            self.queue.remove(job)
        for worker in list(self.workers.values()):
            job = worker.job
            if job and not job.abandoned and now - job.last_seen > self.client_timeout_s:
                log.warning("request %s cancelled on %s: its client is gone", job.request_id, worker.name)
                job.abandoned = True
                self._send_worker(worker, [CANCEL, job.token])
        for position, job in enumerate(self.queue, 1):
            self._reply(job.client, {"protocol": PROTOCOL_VERSION, "id": job.request_id, "status": "event",
                                     "event": "queued", "queue_position": position})

    # ---------------------------------------------------------------- loop
    def stop(self, *_):
        self._stop = True

    def _safely(self, handler, what: str):
        """One message's handling: whatever goes wrong is logged, and the server goes on."""
        try:
            handler()
        except Exception:
            log.exception("unexpected failure handling a %s message; the server goes on", what)

    def serve_forever(self):
        """Run until :meth:`stop` (also bound to SIGINT/SIGTERM in the main thread)."""
        for _ in range(self.n_workers):
            self._spawn_worker()
        poller = zmq.Poller()
        for sock in (self.frontend, self.backend, self.submit_results):
            poller.register(sock, zmq.POLLIN)
        log.info("serving on %s (workers connect to %s)", self.address, self.backend_address)
        try:
            while not self._stop:
                events = dict(poller.poll(200))
                if self.backend in events:
                    self._safely(self._on_backend, "worker")
                if self.submit_results in events:
                    self._safely(self._on_submit_result, "queue writer")
                if self.frontend in events:
                    self._safely(self._on_frontend, "client")
                self._safely(self._check_workers, "worker check")
                self._safely(self._heartbeat, "heartbeat")
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
        if self.finetune is not None:
            self.finetune.cancel()  # the active version stays as it was
        self._submit_jobs.put(None)
        self._submit_thread.join(30)  # a case being written is finished, not cut in half
        while self.submit_results.poll(0):
            self._on_submit_result()
        if self.auth is not None:
            self.auth.stop()
        for sock in (self.frontend, self.backend, self.submit_results):
            sock.close(0)
        self.ctx.term()
        log.info("server stopped")


def serve(**kwargs):
    """Start a server in this process and block; SIGINT/SIGTERM stop it gracefully."""
    server = InferenceServer(**kwargs)
    signal.signal(signal.SIGINT, server.stop)
    signal.signal(signal.SIGTERM, server.stop)
    print(f"liverseg server listening on {server.address}", flush=True)
    server.serve_forever()
