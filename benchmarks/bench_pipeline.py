"""Time each stage of the pipeline on a real volume, the network's arithmetic against this CPU's
own peak, through the API and through `liverseg segment` from a cold start.

    python benchmarks/bench_pipeline.py [--input IMAGE] [--repeats 3] [--cold 3] [--precisions fp32 bf16]
                                        [--engines eager compile bf16 onnx]

Prints:
- the peak this run measures: a large fp32 (and bf16) matmul, and the network's heaviest
  convolution alone, in GFLOP/s;
- per precision, the median seconds per stage (load, preprocess, inference, postprocess, readout
  with a PDFF map, write), end to end, and the network's GFLOP/s;
- `liverseg segment` from a cold start (a new process each time: imports, model loading, the
  whole case, writing), median wall time, and `python -X importtime` of its imports.
- the inference engines on identical inputs (every slice of the volume through the network
  alone): PyTorch eager (what ships: BatchNorm folded, channels-last, fp32), ``torch.compile``
  (its one-off compile time apart), bf16 autocast, and ONNX Runtime (when ``onnxruntime`` is
  installed; the export time apart); seconds, GFLOP/s, and how many model-grid pixels each labels
  differently from eager.
Targets (issue 21, on the bundled 33-slice sample): end to end through the API < 1 s, the CLI
from a cold start < 1.5 s, with the labels of fp32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from LiverSegmentationLogic.inference.contrast_check import contrast_check_enabled
from LiverSegmentationLogic.inference.pipeline import segment_case, write_segmentation
from LiverSegmentationLogic.inference.preprocessing import neighbour_stack, prepare_volume
from LiverSegmentationLogic.inference.segmenter import Segmenter, native_bf16
from LiverSegmentationLogic.io.sample import sample_paths
from LiverSegmentationLogic.io.volumes import Volume, read_volume
from LiverSegmentationLogic.models.model_files import load_model
from LiverSegmentationLogic.models.network import count_flops_per_slice, inference_network

STAGES = ["load", "preprocess", "inference", "postprocess", "readout", "write", "end_to_end"]


def best_of(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / best_of(lambda: a @ b) / 1e9


def heaviest_conv(network: torch.nn.Module, batch: torch.Tensor) -> tuple[str, float]:
    """The network's convolution with the most arithmetic, timed alone on its real input: (shape, GFLOP/s)."""
    seen = []

    def hook(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels
        seen.append((2.0 * k * output.numel(), module, inputs[0].detach().clone()))

    convs = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    handles = [m.register_forward_hook(hook) for m in convs]
    with torch.inference_mode():
        network(batch)
    for h in handles:
        h.remove()
    flops, conv, x = max(seen, key=lambda s: s[0])
    with torch.inference_mode():
        seconds = best_of(lambda: conv(x))
    shape = f"{conv.in_channels}->{conv.out_channels} {conv.kernel_size[0]}x{conv.kernel_size[1]} on {tuple(x.shape)}"
    return shape, flops / seconds / 1e9


def channels_last(network: torch.nn.Module):
    """The network's forward on channels-last batches (how the segmenter runs it on the CPU)."""
    return lambda b: network(b.contiguous(memory_format=torch.channels_last))


def engine_forward(engine: str, network: torch.nn.Module, batches: list) -> tuple:
    """``(forward, one-off seconds)`` of one engine, or None when it is not installed here."""
    eager = channels_last(network)
    if engine == "eager":
        return eager, 0.0
    if engine == "bf16":
        def bf16(b):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return eager(b).float()
        return bf16, 0.0
    if engine == "compile":
        t0 = time.perf_counter()
        compiled = channels_last(torch.compile(network))
        with torch.inference_mode():  # every batch shape once: the compile cost
            for b in {tuple(b.shape): b for b in batches}.values():
                compiled(b)
        return compiled, time.perf_counter() - t0
    if engine == "onnx":
        try:
            import onnxruntime
        except ImportError:
            return None
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "network.onnx"
            torch.onnx.export(network, (batches[0],), dynamic_shapes=({0: torch.export.Dim("batch")},),
                              dynamo=True, verbose=False).save(str(path))
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return (lambda b: torch.from_numpy(session.run(None, {name: b.numpy()})[0])), time.perf_counter() - t0
    raise ValueError(engine)


def compare_engines(network: torch.nn.Module, stacks: torch.Tensor, batch_size: int, gflop: float,
                    engines: list[str], repeats: int) -> None:
    """Each engine over the same slices: seconds per volume (best of ``repeats`` after a warm-up),
    GFLOP/s, and pixels whose label (argmax) differs from eager fp32."""
    batches = list(torch.split(stacks, batch_size))

    def run(forward):
        with torch.inference_mode():
            return torch.cat([forward(b) for b in batches]).argmax(1)

    reference = run(channels_last(network))
    print(f"\ninference engines, the network alone over {len(stacks)} slices (batch {batch_size}):")
    print(f"{'engine':>8} | {'seconds':>8} | GFLOP/s | one-off cost | pixels labelled unlike eager")
    for engine in engines:
        made = engine_forward(engine, network, batches)
        if made is None:
            print(f"{engine:>8} | skipped: onnxruntime is not installed")
            continue
        forward, setup = made
        seconds = best_of(lambda: run(forward), repeats)  # noqa: B023 (timed within this iteration)
        differ = int(torch.count_nonzero(run(forward) != reference))
        print(f"{engine:>8} | {seconds:>7.3f}s | {gflop / seconds:>7.1f} | {setup:>11.1f}s | "
              f"{differ} of {reference.numel()}")


def run_once(path: Path, segmenter: Segmenter, out_dir: Path) -> tuple[dict, np.ndarray]:
    t0 = time.perf_counter()
    volume = read_volume(path)
    load = time.perf_counter() - t0
    # a PDFF map on the same grid so the readout stage includes the fat-fraction path
    ff_map = Volume(np.full(volume.array.shape, 7.0, np.float32), volume.geometry)
    result, readout = segment_case(segmenter, volume, ff_map)
    t0 = time.perf_counter()
    write_segmentation(out_dir / "bench.seg.nrrd", result)
    write = time.perf_counter() - t0
    timings = {"load": load, "write": write}
    for stage, seconds in readout["timings"].items():  # a cascade times each stage twice: "inference (stage 2)"
        stage = stage.split(" (stage")[0]
        timings[stage] = timings.get(stage, 0.0) + seconds
    timings["end_to_end"] = sum(timings.values())
    return timings, result.labels


def cold_cli(path: Path, out_dir: Path, precision: str, runs: int) -> float:
    command = [sys.executable, "-m", "LiverSegmentationLogic.cli", "segment", str(path),
               "-o", str(out_dir / "cold.nrrd"), "-q", "--precision", precision]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def import_seconds(command: list[str]) -> list[tuple[str, float]]:
    """The heaviest top-level imports of a command, from ``python -X importtime``."""
    err = subprocess.run([sys.executable, "-X", "importtime", *command], capture_output=True, text=True).stderr
    top = []
    for line in err.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.split("|")
            if cumulative.strip().isdigit() and not name.startswith("  "):
                top.append((name.strip(), int(cumulative) / 1e6))
    return sorted(top, key=lambda t: -t[1])[:6]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, default=sample_paths()[0], help="default: the bundled 33-slice sample")
    p.add_argument("--model", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cold", type=int, default=3, help="cold CLI runs per precision (0: none)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--engines", nargs="*", default=["eager", "compile", "bf16", "onnx"],
                   choices=["eager", "compile", "bf16", "onnx"], help="inference engines to compare (none: skip)")
    args = p.parse_args()

    model = load_model(args.model)
    volume = read_volume(args.input)
    prepared = prepare_volume(volume.array, volume.geometry, model.preprocess)
    n_slices, h, w = prepared.image.shape
    gflop_slice = count_flops_per_slice(model.network, h, w) / 1e9
    network = inference_network(model.network).to(memory_format=torch.channels_last)
    member = network.members[0] if hasattr(network, "members") else network
    batch = torch.rand(args.batch_size, model.network.config["in_channels"], h, w).contiguous(
        memory_format=torch.channels_last)
    print(f"input {args.input} ({n_slices} slices, model grid {h} x {w}); model {model.name_version}, "
          f"{gflop_slice:.2f} GFLOP/slice")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16()}\n")

    print("peak measured in this run:")
    print(f"  fp32 matmul 2048^3: {matmul_peak(torch.float32):7.1f} GFLOP/s")
    if "bf16" in args.precisions:
        print(f"  bf16 matmul 2048^3: {matmul_peak(torch.bfloat16):7.1f} GFLOP/s")
    shape, conv_peak = heaviest_conv(member, batch)
    print(f"  heaviest conv, fp32 ({shape}): {conv_peak:7.1f} GFLOP/s\n")

    if args.engines:
        stacks = torch.from_numpy(neighbour_stack(prepared.image, np.arange(n_slices), model.preprocess.neighbours))
        compare_engines(network, stacks, args.batch_size, gflop_slice * n_slices, args.engines, args.repeats)
        print()

    # a task with the quality control's contrast check runs the network twice more (abdomen-mr-t2)
    stages = STAGES[:4] + ["contrast check"] + STAGES[4:] if contrast_check_enabled(model.card) else STAGES
    width = {s: max(11, len(s)) for s in stages}
    header = f"{'precision':>9} | " + " | ".join(f"{s:>{width[s]}}" for s in stages) + " | GFLOP/s | % of conv peak"
    print(header)
    print("-" * len(header))
    labels = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions:
            segmenter = Segmenter(model, device="cpu", batch_size=args.batch_size, precision=precision)
            run_once(args.input, segmenter, Path(tmp))  # warm-up
            runs = [run_once(args.input, segmenter, Path(tmp)) for _ in range(args.repeats)]
            labels[precision] = runs[0][1]
            med = {s: statistics.median(r[0][s] for r in runs) for s in stages}
            gflops = gflop_slice * n_slices / med["inference"]
            print(f"{precision:>9} | " + " | ".join(f"{med[s]:>{width[s] - 1}.3f}s" for s in stages)
                  + f" | {gflops:>7.1f} | {100 * gflops / conv_peak:>5.0f} %")
        if "fp32" in labels and "bf16" in labels:
            differ = int(np.count_nonzero(labels["fp32"] != labels["bf16"]))
            print(f"\nbf16 vs fp32: {differ} of {labels['fp32'].size} voxels labelled differently")
        if args.cold:
            print(f"\n`liverseg segment` from a cold start, median of {args.cold}:")
            for precision in args.precisions:
                print(f"  {precision}: {cold_cli(args.input, Path(tmp), precision, args.cold):.2f} s")
            top = import_seconds(["-m", "LiverSegmentationLogic.cli", "segment", str(args.input),
                                  "-o", str(Path(tmp) / "imp.nrrd"), "-q", "--precision", "fp32"])
            print("  heaviest imports (python -X importtime, cumulative): "
                  + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in top))


if __name__ == "__main__":
    main()
