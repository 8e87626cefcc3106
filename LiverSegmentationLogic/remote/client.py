"""Client of the inference server: the same segment/readout result as local inference.

Uses a DEALER socket and request ids: progress events stream in while a job runs, and a request
with no answer is retried on a fresh socket (the Lazy Pirate pattern) before the server is
declared unreachable.
"""

from __future__ import annotations

import time
import uuid
from typing import Callable, Optional, Sequence, Union

import numpy as np
import zmq
import zmq.auth

from ..errors import (
    CancelledError,
    CurveKeyError,
    MessageTooLargeError,
    ProtocolVersionError,
    RemoteError,
    ServerTimeoutError,
    ServerUnreachableError,
)
from ..readouts.audit import array_sha256
from ..io.volumes import Volume, channel_array
from ..inference.results import ProgressCallback, SegmentationResult
from .protocol import PROTOCOL_VERSION, channel_array_name, decode_array, encode_array, pack, unpack

HEARTBEAT_S = 1.0  # well under the server's client timeout (10 s by default)


def curve_options(server_key_file: Optional[str], client_cert_file: Optional[str]) -> dict:
    """The :class:`InferenceClient` options for a CurveZMQ-secured server, from the server's public
    certificate and this client's secret certificate (``liverseg keys`` writes both); ``{}`` when
    neither is given (a server on this machine).

    Raises:
        CurveKeyError: one file without the other, a file that cannot be read, or a certificate
            without its secret key.
    """
    server_key_file, client_cert_file = str(server_key_file or "").strip(), str(client_cert_file or "").strip()
    if not server_key_file and not client_cert_file:
        return {}
    if not (server_key_file and client_cert_file):
        raise CurveKeyError("CurveZMQ needs both the server's public key file and this client's secret certificate "
                            "(or neither, for a server on this machine)")
    try:
        server_key = zmq.auth.load_certificate(server_key_file)[0]
        secret = zmq.auth.load_certificate(client_cert_file)[1]
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read the CurveZMQ key files: {exc}") from exc
    if secret is None:
        raise CurveKeyError(f"{client_cert_file} holds no secret key: give this client's .key_secret file")
    return {"curve_server_key": server_key, "curve_client_cert": client_cert_file}


class InferenceClient:
    """Talk to a ``liverseg serve`` server.

    Args:
        address: e.g. ``tcp://127.0.0.1:5555``.
        connect_timeout_s: how long to wait for the first answer to a request before retrying.
        idle_timeout_s: how long a running request may stay silent (the server sends progress
            events and queue heartbeats, so silence means it is gone).
        retries: extra tries on a fresh socket when the first answer does not come.
        compression: image buffer compression, ``"none"`` or ``"zlib"``.
        curve_server_key / curve_client_cert: the server's public key and this client's secret
            certificate file, to talk to a CurveZMQ-secured server.
        session: a name the clients of one job share (the threads of a batch), so that the server
            counts them as one client for its limits and fair share (with CurveZMQ the key does).
    """

    def __init__(
        self,
        address: str,
        connect_timeout_s: float = 5.0,
        idle_timeout_s: float = 60.0,
        retries: int = 1,
        compression: str = "none",
        curve_server_key: Optional[bytes] = None,
        curve_client_cert: Optional[str] = None,
        session: Optional[str] = None,
    ):
        self.address = address
        self.session = session
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.retries = retries
        self.compression = compression
        self.curve = None
        if curve_client_cert:
            public, secret = zmq.auth.load_certificate(curve_client_cert)
            if secret is None or curve_server_key is None:
                raise CurveKeyError("CurveZMQ needs this client's secret certificate and the server's public key")
            self.curve = (public, secret, curve_server_key)
        self.ctx = zmq.Context.instance()
        self.sock = None
        self.server_info: Optional[dict] = None  # from the first info(), which checks the protocol
        self.last_request_id: Optional[str] = None

    # ------------------------------------------------------------------ socket
    def _new_socket(self):
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if self.curve:
            self.sock.curve_publickey, self.sock.curve_secretkey, self.sock.curve_serverkey = self.curve
        self.sock.connect(self.address)

    def close(self):
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ requests
    def request(
        self,
        op: str,
        arrays=(),
        options: Optional[dict] = None,
        progress: Optional[Callable[[dict], None]] = None,
        cancel=None,
        extra: Optional[dict] = None,
    ) -> tuple[dict, list]:
        """Send one request and wait for its final reply; returns (header, buffers).

        Raises:
            MessageTooLargeError: the request exceeds the server's size limit (known after ``info``).
            ServerUnreachableError: no answer at all after the retries.
            ServerTimeoutError: the server answered, then went silent.
            RemoteError / ProtocolVersionError: the server replied with an error.
            CancelledError: the request was cancelled.
        """
        request_id = self.last_request_id = uuid.uuid4().hex
        descs, buffers = [a[0] for a in arrays], [a[1] for a in arrays]
        header = {"protocol": PROTOCOL_VERSION, "op": op, "id": request_id, "arrays": descs,
                  "options": options or {}, **({"session": self.session} if self.session else {}), **(extra or {})}
        frames = pack(header, buffers)
        limit = (self.server_info or {}).get("max_message_bytes")
        size = sum(len(memoryview(f).cast("B")) for f in frames)
        if isinstance(limit, int) and size > limit:  # the server would cut the connection without a reply
            raise MessageTooLargeError(
                f"the request is {size / 2**20:.1f} MB; the server at {self.address} accepts at most "
                f"{limit / 2**20:.1f} MB (its --max-message-mb)")
        is_cancelled = (cancel.is_set if hasattr(cancel, "is_set") else cancel) if cancel else (lambda: False)
        for attempt in range(self.retries + 1):
            if self.sock is None or attempt > 0:
                self._new_socket()
            self._send(frames)
            heard = False
            cancel_sent = False
            deadline = time.monotonic() + self.connect_timeout_s
            next_heartbeat = time.monotonic() + HEARTBEAT_S
            while True:
                if time.monotonic() >= next_heartbeat:  # tells the server this client still waits
                    self._send(pack({"protocol": PROTOCOL_VERSION, "op": "heartbeat",
                                     "id": uuid.uuid4().hex, "target": request_id}))
                    next_heartbeat = time.monotonic() + HEARTBEAT_S
                if not cancel_sent and is_cancelled():
                    self._send_cancel(request_id)
                    cancel_sent = True
                    deadline = time.monotonic() + self.connect_timeout_s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if not self.sock.poll(min(remaining, 0.1) * 1000):
                    continue
                reply_header, reply_buffers = unpack(self.sock.recv_multipart())
                if reply_header.get("id") != request_id and not (
                    reply_header.get("id") is None and reply_header.get("status") == "error"
                ):
                    continue  # a late answer to an earlier, abandoned request
                heard = True
                deadline = time.monotonic() + self.idle_timeout_s
                status = reply_header.get("status")
                if status == "event":
                    if progress is not None:
                        progress(reply_header)
                    continue
                if status == "ok":
                    return reply_header, reply_buffers
                if status == "cancelled":
                    raise CancelledError(reply_header.get("message", "cancelled"))
                error = reply_header.get("error") or {}
                kind, message = error.get("type", "Error"), error.get("message", "unknown error")
                if kind == "ProtocolVersionError":
                    raise ProtocolVersionError(message)
                raise RemoteError(kind, message)
            self._new_socket()  # a socket with a request in flight cannot be reused (Lazy Pirate)
            if heard:
                raise ServerTimeoutError(
                    f"inference server at {self.address} stopped answering for {self.idle_timeout_s:g}s"
                )
        raise ServerUnreachableError(
            f"inference server unreachable at {self.address} "
            f"(no answer in {self.connect_timeout_s:g}s, {self.retries + 1} tries)"
        )

    def _send(self, frames) -> bool:
        """Send without ever blocking: with no live connection (server down, or a CurveZMQ
        handshake refused) a DEALER send would wait forever; the reply timeout reports it instead."""
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def _send_cancel(self, target: str):
        header = {"protocol": PROTOCOL_VERSION, "op": "cancel", "id": uuid.uuid4().hex, "target": target}
        self._send(pack(header))

    def info(self) -> dict:
        """The server's versions, protocols, capabilities, model and devices."""
        header, _ = self.request("info")
        info = header["info"]
        if PROTOCOL_VERSION not in info.get("protocols", []):
            raise ProtocolVersionError(
                f"server speaks protocol {info.get('protocols')}, this client {PROTOCOL_VERSION}: "
                "upgrade the extension or the server so they match"
            )
        self.server_info = info
        return info

    def _negotiate(self):
        """Check versions once, before the first real request, so a mismatch is a clear error on
        connect rather than a failure in the middle of a job."""
        if self.server_info is None:
            self.info()

    def segment(
        self,
        volume: Union[Volume, Sequence[Volume]],
        ff_map: Optional[Volume] = None,
        margin_mm: float = 3.0,
        ff_unit: str = "auto",
        progress: Optional[ProgressCallback] = None,
        cancel=None,
        label_compression: str = "zlib",
        study: Optional[str] = None,
    ) -> tuple[SegmentationResult, dict]:
        """Remote :func:`inference.pipeline.segment_case`: same result, same progress callback.

        ``volume`` is the scan, or one scan per input channel of a multi-channel model.
        ``label_compression`` is how the server sends the labelmap back (zlib shrinks a labelmap
        about 50-fold for a few milliseconds; see benchmarks/bench_remote.py). ``study``: the server
        segments with that study's active model version."""
        self._negotiate()
        volumes = [volume] if isinstance(volume, Volume) else list(volume)
        arrays = [encode_array(channel_array_name(i), _sendable(v.array), v.geometry, self.compression)
                  for i, v in enumerate(volumes)]
        if ff_map is not None:
            arrays.append(encode_array("ff_map", _sendable(ff_map.array), ff_map.geometry, self.compression))

        def on_event(event):
            if progress is not None and event.get("event") == "progress":
                progress(event["done"], event["total"], event["stage"])

        t0 = time.perf_counter()
        header, buffers = self.request(
            "segment",
            arrays,
            {"margin_mm": margin_mm, "ff_unit": ff_unit, "label_compression": label_compression,
             **({"study": study} if study else {})},
            progress=on_event,
            cancel=cancel,
        )
        labels, geometry = decode_array(header["arrays"][0], buffers[0])
        readout = header["readout"]
        readout["timings"]["client_total"] = time.perf_counter() - t0
        # the server hashed what it received (float32 for float images); the audit names the
        # caller's own array
        readout["audit"]["input"]["sha256"] = array_sha256(channel_array(volumes))
        result = SegmentationResult(
            labels=labels, geometry=geometry, classes=header["classes"], model=readout["model"],
            timings=readout["timings"],
        )
        return result, readout


    def submit(self, image: Volume, label: np.ndarray, meta: Optional[dict] = None,
               labels: Optional[dict] = None, on_duplicate: str = "replace") -> dict:
        """Send a corrected case to the server's fine-tuning queue; returns its queue record."""
        self._negotiate()
        arrays = [
            encode_array("image", _sendable(image.array), image.geometry, self.compression),
            encode_array("label", np.asarray(label, dtype=np.uint8), image.geometry, "zlib"),
        ]
        options = {"meta": meta or {}, "labels": labels, "on_duplicate": on_duplicate}
        header, _ = self.request("submit", arrays, options)
        return header["record"]


    # ------------------------------------------------------------------ models and fine-tuning
    def _model_op(self, op: str, **options) -> dict:
        self._negotiate()
        header, _ = self.request(op, options={k: v for k, v in options.items() if v is not None})
        return header

    def models(self, model: Optional[str] = None, study: Optional[str] = None) -> list:
        """The server's versions of a model (default: its own), with the one active for ``study``."""
        return self._model_op("models", model=model, study=study)["models"]

    def train(self, model: Optional[str] = None, study: Optional[str] = None, time_budget_s: float = 300.0) -> dict:
        """Start fine-tuning ``model`` (the study's line) on the server's queue; trainers only.
        Returns its status (``train_status`` follows it)."""
        return self._model_op("train", model=model, study=study, time_budget_s=time_budget_s)["train"]

    def train_status(self) -> dict:
        """State, epoch, loss, outcome and log tail of the current or last fine-tuning."""
        return self._model_op("train_status")["train"]

    def train_cancel(self) -> dict:
        return self._model_op("train_cancel")["train"]

    def activate(self, ref: str, study: Optional[str] = None) -> str:
        """Make ``name@version`` active on the server (for ``study``); trainers only."""
        return self._model_op("activate", model=ref, study=study)["active"]

    def rollback(self, model: str, study: Optional[str] = None) -> str:
        """Undo the last activation of ``model`` on the server (for ``study``); trainers only."""
        return self._model_op("rollback", model=model, study=study)["active"]


def _sendable(array: np.ndarray) -> np.ndarray:
    """Send images as float32 or their own integer type: the model reads float32 anyway
    (see preprocessing.normalise_intensity), so float64 would only double the bytes."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.name in ("uint8", "int8", "uint16", "int16"):
        return array
    return array.astype(np.float32)
