"""Cost of one readout update after a Segment Editor stroke, on a large PDFF map.

    python benchmarks/bench_readout.py [--repeats 5]

A 300 x 512 x 512 float32 PDFF map and a 2.2 L liver on a 60 x 320 x 320 MR grid. Prints the
median time of fat_fraction_readout (what the panel reruns after each stroke, with the unit known),
of the unit detection (once per map), and, once, of the old way (mask resampled onto the whole map
and eroded there). The panel runs the readout in a thread after edits pause, so these times are not
spent on the GUI thread; what the GUI thread spends per stroke is measured in
Testing/Python/test_panel_controller.py (test_a_stroke_costs_the_gui_thread_little_on_a_large_map).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from LiverSegmentationLogic.io.volumes import Geometry, Volume
from LiverSegmentationLogic.readouts.measurements import (
    detect_fat_fraction_unit,
    erode_mm,
    fat_fraction_readout,
    resample_mask_to,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ff = Volume(rng.uniform(0, 30, (300, 512, 512)).astype(np.float32),
                Geometry((0.78, 0.78, 1.0), (-200.0, -200.0, -150.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    labels = np.zeros((60, 320, 320), bool)
    zz, yy, xx = np.ogrid[:60, :320, :320]
    labels[((zz - 30) / 18.0) ** 2 + ((yy - 150) / 80.0) ** 2 + ((xx - 140) / 95.0) ** 2 <= 1] = True
    liver = Volume(labels, Geometry((1.25, 1.25, 2.5), (-200.0, -200.0, -75.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    print(f"PDFF map {ff.array.shape}, liver {labels.sum() * 1.25 * 1.25 * 2.5 / 1000:.0f} mL on {labels.shape}")

    def median_time(fn):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t0 = time.perf_counter()
    erode_mm(resample_mask_to(liver, ff.geometry, ff.array.shape), ff.geometry.spacing[::-1], 3.0)
    t_whole = time.perf_counter() - t0
    t_detect = median_time(lambda: detect_fat_fraction_unit(ff.array))
    t_stroke = median_time(lambda: fat_fraction_readout(liver, ff, margin_mm=3.0, unit="percent"))
    print(f"{'step':<40} {'median s':>9}")
    print(f"{'unit detection (once per map)':<40} {t_detect:9.3f}")
    print(f"{'fat-fraction readout per stroke':<40} {t_stroke:9.3f}")
    print(f"{'the old way: whole map (once)':<40} {t_whole:9.3f}")


if __name__ == "__main__":
    main()
