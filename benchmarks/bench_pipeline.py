"""Time each stage of the pipeline on a real volume and the model's arithmetic throughput.

    python benchmarks/bench_pipeline.py [--input IMAGE] [--repeats 3]

Prints a table: median seconds per stage (load, preprocess, inference, postprocess, readout, write),
end-to-end time, the model's GFLOP per slice and achieved GFLOP/s, for channels-last on and off.
Target (issue 2): a 40-slice MRI volume end to end in under 3 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from LiverSegmentationLogic.io.volumes import Volume, read_volume
from LiverSegmentationLogic.inference.segmenter import Segmenter
from LiverSegmentationLogic.models.model_files import load_model
from LiverSegmentationLogic.models.network import count_flops_per_slice
from LiverSegmentationLogic.inference.pipeline import segment_case, write_segmentation
from LiverSegmentationLogic.inference.preprocessing import prepare_volume
from LiverSegmentationLogic.io.sample import sample_paths

DEFAULT_INPUT = Path(__file__).resolve().parents[1].parent / "shared/data/chaos-mr-t2/image_22.nii.gz"


def run_once(path: Path, segmenter: Segmenter, out_dir: Path) -> dict:
    t0 = time.perf_counter()
    volume = read_volume(path)
    load = time.perf_counter() - t0
    # a PDFF map on the same grid so the readout stage includes the fat-fraction path
    ff_map = Volume(np.full(volume.array.shape, 7.0, np.float32), volume.geometry)
    result, readout = segment_case(segmenter, volume, ff_map)
    t0 = time.perf_counter()
    write_segmentation(out_dir / "bench.seg.nrrd", result)
    write = time.perf_counter() - t0
    timings = {"load": load, **readout["timings"], "write": write}
    timings["end_to_end"] = sum(timings.values())
    return timings


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, default=DEFAULT_INPUT if DEFAULT_INPUT.exists() else sample_paths()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()

    model = load_model(args.model)
    volume = read_volume(args.input)
    prepared = prepare_volume(volume.array, volume.geometry, model.preprocess)
    n_slices, h, w = prepared.image.shape
    gflop_slice = count_flops_per_slice(model.network, h, w) / 1e9
    print(f"input {args.input} ({n_slices} slices, model grid {h} x {w}); model {model.name_version}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}; median of {args.repeats} runs after a warm-up\n")
    stages = ["load", "preprocess", "inference", "postprocess", "readout", "write", "end_to_end"]
    header = f"{'channels_last':>13} | " + " | ".join(f"{s:>11}" for s in stages) + " | GFLOP/slice | GFLOP/s"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for channels_last in (True, False):
            segmenter = Segmenter(model, device="auto", batch_size=args.batch_size, channels_last=channels_last)
            run_once(args.input, segmenter, Path(tmp))  # warm-up
            runs = [run_once(args.input, segmenter, Path(tmp)) for _ in range(args.repeats)]
            med = {s: statistics.median(r[s] for r in runs) for s in stages}
            gflops = gflop_slice * n_slices / med["inference"]
            print(f"{str(channels_last):>13} | " + " | ".join(f"{med[s]:>10.3f}s" for s in stages)
                  + f" | {gflop_slice:>11.2f} | {gflops:>7.1f}")


if __name__ == "__main__":
    main()
