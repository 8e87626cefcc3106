"""Helpers for tests that run a real ``liverseg serve`` process on loopback."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import zmq
import zmq.auth

from LiverSegmentationLogic.remote.client import InferenceClient
from LiverSegmentationLogic.remote.protocol import unpack


def start_server(*args, workers=2, cwd=None):
    proc = subprocess.Popen(
        [sys.executable, "-m", "LiverSegmentationLogic.cli", "serve", "--bind", "tcp://127.0.0.1:*",
         "--workers", str(workers), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
    )
    line = proc.stdout.readline()
    match = re.search(r"listening on (tcp://\S+)", line)
    assert match, line + proc.stdout.read()
    # keep draining the log (so the server never blocks on a full pipe) into proc.log
    proc.log = []
    threading.Thread(target=lambda: proc.log.extend(proc.stdout), daemon=True).start()
    return proc, match.group(1)


def wait_ready(address, workers, timeout=120):
    deadline = time.monotonic() + timeout
    with InferenceClient(address, connect_timeout_s=2) as client:
        while time.monotonic() < deadline:
            info = client.info()
            if info["workers"] >= workers:
                return info
            time.sleep(0.2)
    raise TimeoutError(f"server at {address} did not get {workers} workers ready")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def raw_request(address, frames, timeout_ms=30000):
    """Send frames on a bare DEALER and return the final reply header (skipping events)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        while True:
            assert sock.poll(timeout_ms), "no reply from the server"
            header, _ = unpack(sock.recv_multipart())
            if header["status"] != "event":
                return header
    finally:
        sock.close()


def operator_and_trainer_keys(folder):
    """CurveZMQ certificates for a server with two clients, operator 'ana' and trainer 'lea':
    ``(server_options, files)``; the options are ``liverseg serve`` arguments, ``files`` the
    server's public key and each client's public and secret certificate."""
    keys, clients, trainers = folder / "keys", folder / "clients", folder / "trainers"
    for sub in (keys, clients, trainers):
        sub.mkdir()
    files = {}
    files["server"], server_secret = zmq.auth.create_certificates(str(keys), "server")
    for name in ("ana", "lea"):
        files[name + "_public"], files[name] = zmq.auth.create_certificates(str(keys), name)
        shutil.copy(files[name + "_public"], clients)
    shutil.copy(files["lea_public"], trainers)
    options = ["--curve-secret", server_secret, "--curve-clients", clients, "--curve-trainers", trainers]
    return options, files
