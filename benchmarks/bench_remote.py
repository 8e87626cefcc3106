"""Local vs remote inference on a real volume, transport overhead, encodings and throughput.

    python benchmarks/bench_remote.py [--input IMAGE] [--repeats 3] [--requests 8]

Starts a real server process (``liverseg serve``) on a loopback port. Prints:
1. local vs remote end-to-end time per case and the transport overhead (remote - server work),
   for each image/label encoding, with the bytes sent and an estimate for a 100 Mbit/s link;
2. requests/s with 1, 2 and 4 concurrent clients (server with 2 workers on this machine).
Aim (issue 3): remote overhead under 10 % of local inference time on loopback.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from LiverSegmentationLogic.remote.client import InferenceClient
from LiverSegmentationLogic.io.volumes import read_volume
from LiverSegmentationLogic.inference.segmenter import Segmenter
from LiverSegmentationLogic.models.model_files import load_model
from LiverSegmentationLogic.inference.pipeline import segment_case
from LiverSegmentationLogic.io.sample import sample_paths

DEFAULT_INPUT = Path(__file__).resolve().parents[1].parent / "shared/data/chaos-mr-t2/image_22.nii.gz"
LINK_BYTES_PER_S = 100e6 / 8  # a 100 Mbit/s hospital network


def start_server(workers: int):
    proc = subprocess.Popen(
        [sys.executable, "-m", "LiverSegmentationLogic.cli", "serve", "--bind", "tcp://127.0.0.1:*",
         "--workers", str(workers)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    address = re.search(r"listening on (tcp://\S+)", proc.stdout.readline()).group(1)
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    with InferenceClient(address) as client:
        while client.info()["workers"] < workers:
            time.sleep(0.2)
    return proc, address


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, default=DEFAULT_INPUT if DEFAULT_INPUT.exists() else sample_paths()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=8, help="requests per client-count in the throughput test")
    args = p.parse_args()

    volume = read_volume(args.input)
    image32 = volume.array.astype(np.float32)
    segmenter = Segmenter(load_model(), device="auto")
    local_s, (result, _) = median_time(lambda: segment_case(segmenter, volume), args.repeats)
    print(f"input {args.input} {volume.array.shape}; local end-to-end {local_s:.3f}s (median of {args.repeats})\n")

    raw_image = image32.nbytes
    raw_labels = result.labels.nbytes
    sizes = {
        ("none", "none"): raw_image + raw_labels,
        ("zlib", "none"): len(zlib.compress(image32.tobytes(), 1)) + raw_labels,
        ("none", "zlib"): raw_image + len(zlib.compress(result.labels.tobytes(), 1)),
        ("zlib", "zlib"): len(zlib.compress(image32.tobytes(), 1)) + len(zlib.compress(result.labels.tobytes(), 1)),
    }
    proc, address = start_server(workers=1)
    try:
        print(f"{'image':>5} {'labels':>6} | {'remote s':>8} | {'server s':>8} | {'overhead s':>10} | "
              f"{'overhead %':>10} | {'bytes':>10} | {'est. 100 Mbit/s':>15}")
        print("-" * 92)
        for image_enc, label_enc in sizes:
            client = InferenceClient(address, compression=image_enc)
            remote_s, (_, readout) = median_time(
                lambda c=client, le=label_enc: c.segment(volume, label_compression=le), args.repeats)
            server_s = readout["timings"]["server_total"]
            overhead = remote_s - server_s
            link = remote_s + sizes[(image_enc, label_enc)] / LINK_BYTES_PER_S
            print(f"{image_enc:>5} {label_enc:>6} | {remote_s:>8.3f} | {server_s:>8.3f} | {overhead:>10.3f} | "
                  f"{100 * overhead / local_s:>9.1f}% | {sizes[(image_enc, label_enc)]:>10} | {link:>14.2f}s")
            client.close()
    finally:
        proc.terminate()
        proc.wait()

    proc, address = start_server(workers=2)
    try:
        print(f"\n{'clients':>7} | {'requests':>8} | {'wall s':>7} | {'req/s':>6}   (server: 2 workers)")
        print("-" * 40)
        for n_clients in (1, 2, 4):
            per_client = max(1, args.requests // n_clients)

            def work(count):
                with InferenceClient(address, idle_timeout_s=300) as c:
                    for _ in range(count):
                        c.segment(volume)

            threads = [threading.Thread(target=work, args=(per_client,)) for _ in range(n_clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            total = per_client * n_clients
            print(f"{n_clients:>7} | {total:>8} | {wall:>7.2f} | {total / wall:>6.2f}")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
