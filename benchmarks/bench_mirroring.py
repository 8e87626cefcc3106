"""Test-time mirroring as a lever (issue 17), measured on cross-validation fold models without
changing the product: every network the segmenter builds averages its logits over the slice and
its left-right mirror, then ``scripts/cross_validate.py evaluate`` runs as usual.

    # both stages of a cascade (or a one-stage model) mirrored:
    python benchmarks/bench_mirroring.py evaluate --work cv/lesion-mirrored --first-stage cv/ct
    # the second stage of a cascade only:
    python benchmarks/bench_mirroring.py --second-stage-only evaluate --work cv/lesion-mirrored --first-stage cv/ct

The work folder is a copy of a cross-validation's ``plan.json`` and ``fold*/`` (its
``cv_results.json`` is overwritten; every patient is segmented again, as ``evaluate --again``).
Without ``--second-stage-only`` every network is mirrored.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch

import LiverSegmentationLogic.inference.segmenter as segmenter


class Mirrored(torch.nn.Module):
    """Logits averaged over the input and its left-right mirror (the last axis)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.network(x) + self.network(x.flip(-1)).flip(-1)) / 2


def main():
    args = sys.argv[1:]
    second_stage_only = "--second-stage-only" in args
    args = [a for a in args if a != "--second-stage-only"]
    if "evaluate" in args and "--again" not in args:
        args.append("--again")  # the rows an earlier evaluation left were not mirrored
    build, built = segmenter.inference_network, []

    def mirrored(network):
        # a cascade's Segmenter builds its own (second-stage) network first, then its first stage's
        built.append(network)
        if second_stage_only and len(built) % 2 == 0:
            return build(network)
        return Mirrored(build(network))

    segmenter.inference_network = mirrored
    sys.argv = ["cross_validate.py", *args]
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "cross_validate.py"), run_name="__main__")


if __name__ == "__main__":
    main()
