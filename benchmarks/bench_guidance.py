"""How well the review guidance finds the errors: on held-out cases, the share of all error voxels
(false positives + false negatives) that lie in the slices it flags (top 10 % by uncertainty).

    python benchmarks/bench_guidance.py [--data ../shared/data/chaos-mr-t2] [--fraction 0.1]

Baselines: flagging at random finds `fraction` of the error on average; flagging the slices with
the largest predicted liver area is the naive alternative.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from LiverSegmentationLogic.models.catalog import CARD_NAME, resolve_model_folder
from LiverSegmentationLogic.inference.guidance import error_share_in_top, slices_to_check
from LiverSegmentationLogic.io.volumes import read_volume
from LiverSegmentationLogic.inference.segmenter import Segmenter
from LiverSegmentationLogic.models.model_files import load_model
from LiverSegmentationLogic.inference.preprocessing import AxialReorientation

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/chaos-mr-t2"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--model", default=None)
    p.add_argument("--fraction", type=float, default=0.1)
    args = p.parse_args()
    card = json.loads((resolve_model_folder(args.model) / CARD_NAME).read_text())
    # cards name held-out cases "<dataset folder>/<patient>"
    patients = [str(c).rsplit("/", 1)[-1] for c in card["validation"]["validation_cases"]]
    segmenter = Segmenter(load_model(args.model))
    print(f"model {card['name']} {card['version']}; held-out patients {patients}; "
          f"flagging the top {args.fraction:.0%} of slices\n")
    print(f"{'patient':>7} | {'slices':>6} | {'flagged':>7} | {'error in flagged (uncertainty)':>30} | "
          f"{'(largest area)':>14} | {'(random)':>8}")
    print("-" * 90)
    shares = []
    for n in patients:
        image = read_volume(args.data / f"image_{n}.nii.gz")
        ref = np.rint(read_volume(args.data / f"label_{n}.nii.gz", validate=False).array) == 1
        result = segmenter.segment(image)
        reorient = AxialReorientation(image.geometry)
        pred_ax, ref_ax = reorient.forward(result.labels == 1), reorient.forward(ref)
        errors = (pred_ax ^ ref_ax).sum(axis=(1, 2))
        share = error_share_in_top(result.slice_uncertainty, errors, args.fraction)
        area_share = error_share_in_top(pred_ax.sum(axis=(1, 2)), errors, args.fraction)
        flagged = len(slices_to_check(result.slice_uncertainty, args.fraction))
        shares.append((share, area_share))
        print(f"{n:>7} | {len(errors):>6} | {flagged:>7} | {share:>30.1%} | {area_share:>14.1%} | "
              f"{flagged / len(errors):>8.1%}")
    mean = np.mean(shares, axis=0)
    print(f"{'mean':>7} | {'':>6} | {'':>7} | {mean[0]:>30.1%} | {mean[1]:>14.1%} |")


if __name__ == "__main__":
    main()
