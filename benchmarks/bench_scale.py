"""Studies per hour against the number of inference workers, with `liverseg batch --server`; and
what the broker itself can route.

    python benchmarks/bench_scale.py [--cases 8] [--workers 1 2 4] [--remote 1 2]

A study of ``--cases`` scans (the bundled 33-slice MR sample and its mirror image, alternately;
the cost of a case does not depend on what the model makes of it) is run through a server on
loopback:
- with W local worker processes (``liverseg serve --workers W``);
- with W workers started as separate ``liverseg worker`` processes that connect to the server's
  backend with their own CurveZMQ keys, as workers on other machines do (clients use CurveZMQ too);
- once locally, without a server (``liverseg batch`` alone), for reference.
Each row: wall time of the batch, cases per hour, and a study of 100 cases per hour. Then the
broker alone: round trips per second of the smallest request (``info``), and the MB/s at which it
takes in a 35 MB segment request (33 x 512 x 512 float32) (a server with no worker and room for one waiting request
refuses the rest as busy once each is read and checked: the cost of receiving and validating).
The workers share this machine's cores (each gets cores / W threads): past W = cores the line
flattens, and more workers need more machines or GPUs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import zmq
import zmq.auth

from LiverSegmentationLogic.errors import RemoteError
from LiverSegmentationLogic.io.sample import sample_paths
from LiverSegmentationLogic.io.volumes import Volume, read_volume
from LiverSegmentationLogic.remote.client import InferenceClient

CLI = [sys.executable, "-m", "LiverSegmentationLogic.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_study(folder: Path, n: int) -> Path:
    image = read_volume(sample_paths()[0])
    for i in range(n):
        array = image.array if i % 2 == 0 else image.array[:, :, ::-1]
        scan = Volume(np.ascontiguousarray(array), image.geometry)
        sitk.WriteImage(scan.to_sitk(), str(folder / f"case{i:03d}.nrrd"))
    return folder


def start_server(*args, workers: int):
    proc = subprocess.Popen([*CLI, "serve", "--bind", "tcp://127.0.0.1:*", "--workers", str(workers), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    match = re.search(r"listening on (tcp://\S+)", proc.stdout.readline())
    assert match, "the server did not start"
    threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()  # drain its log
    return proc, match.group(1)


def wait_workers(client: InferenceClient, n: int, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while client.info()["workers"] < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} workers did not come up")
        time.sleep(0.2)


def timed_batch(study: Path, out: Path, *options) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([*CLI, "batch", str(study), "-o", str(out), "-q", *map(str, options)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def row(name: str, seconds: float, cases: int):
    per_hour = 3600 * cases / seconds
    print(f"| {name} | {seconds:.1f} s | {seconds / cases:.2f} s | {per_hour:.0f} | {per_hour / 100:.1f} |", flush=True)


def local_workers(study: Path, work: Path, workers: int, cases: int):
    proc, address = start_server(workers=workers)  # the server shares the cores between its workers
    try:
        with InferenceClient(address, connect_timeout_s=5) as client:
            wait_workers(client, workers)
        row(f"{workers} local worker process(es)", timed_batch(study, work / "out", "--server", address), cases)
    finally:
        proc.terminate()
        proc.wait(30)


def remote_workers(study: Path, work: Path, workers: int, cases: int):
    keys, allowed, clients = work / "keys", work / "allowed-workers", work / "allowed-clients"
    for folder in (keys, allowed, clients):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    server_public, server_secret = zmq.auth.create_certificates(str(keys), "server")
    _, client_secret = zmq.auth.create_certificates(str(clients), "operator")
    secrets = []
    for i in range(workers):  # allowed before the server starts: it reads the folder then
        public, secret = zmq.auth.create_certificates(str(keys), f"box{i}")
        os.replace(public, allowed / f"box{i}.key")
        secrets.append(secret)
    backend = f"tcp://127.0.0.1:{free_port()}"
    proc, address = start_server("--backend", backend, "--curve-secret", server_secret, "--curve-clients", clients,
                                 "--curve-workers", allowed, workers=0)
    started = []
    threads = max(1, (os.cpu_count() or 1) // workers)  # as the server gives its own workers
    try:
        for secret in secrets:
            started.append(subprocess.Popen([*CLI, "worker", "--connect", backend, "--server-key", server_public,
                                             "--worker-cert", secret, "--threads", str(threads)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        server_key = zmq.auth.load_certificate(server_public)[0]
        with InferenceClient(address, curve_server_key=server_key, curve_client_cert=client_secret) as client:
            wait_workers(client, workers)
        seconds = timed_batch(study, work / "out", "--server", address, "--curve-server-key", server_public,
                              "--curve-client-cert", client_secret)
        row(f"{workers} worker(s) as separate processes (CurveZMQ)", seconds, cases)
    finally:
        for worker in started:
            worker.terminate()
        proc.terminate()
        proc.wait(30)
        for worker in started:
            worker.wait(30)


def broker_limits():
    proc, address = start_server("--max-queued", 1, workers=0)
    try:
        with InferenceClient(address, connect_timeout_s=5) as client:
            client.info()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 3:
                client.info()
                n += 1
            round_trips = n / (time.perf_counter() - t0)
            image = read_volume(sample_paths()[0])
            big = Volume(np.ascontiguousarray(np.tile(image.array, (1, 2, 2))), image.geometry)  # 35 MB of float32
            size = big.array.astype(np.float32).nbytes
            holder = threading.Thread(target=_hold_the_queue, args=(address, big), daemon=True)
            holder.start()  # one request waits for a worker that never comes; the rest are refused
            time.sleep(1.0)
            refused, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 5:
                try:
                    client.segment(big)
                except RemoteError as exc:
                    assert exc.kind == "ServerBusy", exc
                    refused += 1
            seconds = time.perf_counter() - t0
        print(f"\nbroker alone: {round_trips:.0f} info round trips/s (one client, one request at a time); "
              f"takes in {refused / seconds:.1f} segment requests/s of {size / 1e6:.1f} MB = "
              f"{refused * size / seconds / 1e6:.0f} MB/s (each read, checked and refused as busy)")
    finally:
        proc.terminate()
        proc.wait(30)


def _hold_the_queue(address: str, volume: Volume):
    try:
        with InferenceClient(address, idle_timeout_s=3600) as client:
            client.segment(volume)
    except Exception:
        pass  # ends with the server


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--remote", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="liverseg-bench-scale-"))
    (work / "study").mkdir()
    study = make_study(work / "study", args.cases)
    print(f"{args.cases} cases (33-slice MR), {os.cpu_count()} CPU cores shared by the workers\n")
    print("| setup | batch wall time | per case | cases/hour | studies of 100 cases/hour |\n|---|---|---|---|---|")
    row("no server (liverseg batch, this process)", timed_batch(study, work / "out"), args.cases)
    for workers in args.workers:
        local_workers(study, work, workers, args.cases)
    for workers in args.remote:
        remote_workers(study, work, workers, args.cases)
    broker_limits()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
