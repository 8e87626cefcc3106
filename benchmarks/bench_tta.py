"""Test-time augmentation as a lever (issue 17), measured on cross-validation fold models without
changing the product: every network the segmenter builds averages its class probabilities (as
the ensembles do) over the slice and transformed copies of it, each mapped back, then
``scripts/cross_validate.py evaluate`` runs as usual.

    # the MR folds, their contrast averaged over gamma 0.8 and 1.25 (within the training's gamma):
    python benchmarks/bench_tta.py --tta gamma evaluate --work cv/mr-tta
    # in-plane zoom 0.9 and 1.1 (the training's scale range), or both (five passes):
    python benchmarks/bench_tta.py --tta scale evaluate --work cv/mr-tta
    python benchmarks/bench_tta.py --tta gamma,scale evaluate --work cv/mr-tta
    # left-right mirroring, the second stage of a cascade only:
    python benchmarks/bench_tta.py --tta mirror --second-stage-only evaluate --work cv/lesion-tta --first-stage cv/ct

The work folder is a copy of a cross-validation's ``plan.json`` and ``fold*/`` (its
``cv_results.json`` is overwritten; every patient is segmented again, as ``evaluate --again``).
Without ``--second-stage-only`` every network of a cascade is augmented. The lesion mirroring
figures in ``Docs/accuracy.md`` came from this file's predecessor, ``bench_mirroring.py``, which
averaged the two views' logits instead of their probabilities.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import LiverSegmentationLogic.inference.segmenter as segmenter

GAMMAS = (0.8, 1.25)
ZOOMS = (0.9, 1.1)


def _zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` (B, C, H, W) enlarged about its centre by ``factor`` (< 1 shrinks); outside: 0."""
    theta = torch.tensor([[1 / factor, 0, 0], [0, 1 / factor, 0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Augmented(torch.nn.Module):
    """Log of the mean class probability over the input and its ``transforms``.

    Args:
        transforms: names in ``mirror`` (last axis), ``gamma`` (:data:`GAMMAS` on the 0-1 input),
            ``scale`` (:data:`ZOOMS`; each voxel averaged over the views that see it).
    """

    def __init__(self, network: torch.nn.Module, transforms: list[str]):
        super().__init__()
        self.network, self.transforms = network, transforms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.softmax(self.network(x).float(), 1)
        weight = torch.ones_like(total[:, :1])
        if "mirror" in self.transforms:
            total = total + torch.softmax(self.network(x.flip(-1)).float(), 1).flip(-1)
            weight = weight + 1
        if "gamma" in self.transforms:
            for gamma in GAMMAS:
                total = total + torch.softmax(self.network(x.clamp(0, 1) ** gamma).float(), 1)
                weight = weight + 1
        if "scale" in self.transforms:
            for factor in ZOOMS:
                probs = torch.softmax(self.network(_zoom(x, factor)).float(), 1)
                seen = _zoom(torch.ones_like(x[:, :1]), factor)
                total = total + _zoom(probs * seen, 1 / factor)
                weight = weight + _zoom(seen, 1 / factor)
        return (total / weight).clamp_min(1e-7).log()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tta", required=True, help="comma-separated: mirror, gamma, scale")
    p.add_argument("--second-stage-only", action="store_true", help="a cascade's first stage as it is")
    args, rest = p.parse_known_args()
    transforms = args.tta.split(",")
    unknown = set(transforms) - {"mirror", "gamma", "scale"}
    if unknown:
        p.error(f"unknown --tta {', '.join(sorted(unknown))}")
    if "evaluate" in rest and "--again" not in rest:
        rest.append("--again")  # the rows an earlier evaluation left were not augmented
    build, built = segmenter.inference_network, []

    def augmented(network):
        # a cascade's Segmenter builds its own (second-stage) network first, then its first stage's
        built.append(network)
        if args.second_stage_only and len(built) % 2 == 0:
            return build(network)
        return Augmented(build(network), transforms)

    segmenter.inference_network = augmented
    sys.argv = ["cross_validate.py", *rest]
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "cross_validate.py"), run_name="__main__")


if __name__ == "__main__":
    main()
