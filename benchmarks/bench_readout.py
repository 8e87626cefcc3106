"""Cost of one readout update after a Segment Editor stroke: what the liver costs, and what a large
PDFF map adds.

    python benchmarks/bench_readout.py [--repeats 5]

A 2.2 L liver on a 60 x 320 x 320 MR grid (1.25 x 1.25 x 2.5 mm) and three PDFF maps:
- on the liver's own grid (60 x 320 x 320): what the liver costs;
- 300 x 512 x 512 at the same spacing, holding that grid (another field of view): what the map's
  extent adds (target, issue 21: < 50 ms);
- 300 x 512 x 512 at 0.78 x 0.78 x 1.0 mm, 10 times finer than the liver's grid: the liver then
  covers 3.6 million map voxels, each of which is read.
Prints the median time of fat_fraction_readout with the unit known (what the panel reruns after a
stroke), of the unit detection (once per map), and, once, of the old way on the fine map (mask
resampled onto the whole map and eroded with a distance map there). The panel runs the readout in
a thread after edits pause, so these times are not spent on the GUI thread; what the GUI thread
spends per stroke is measured in Testing/Python/test_panel_controller.py
(test_a_stroke_costs_the_gui_thread_little_on_a_large_map).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy import ndimage

from LiverSegmentationLogic.io.volumes import Geometry, Volume
from LiverSegmentationLogic.readouts.measurements import (
    detect_fat_fraction_unit,
    fat_fraction_readout,
    resample_mask_to,
)

IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    labels = np.zeros((60, 320, 320), bool)
    zz, yy, xx = np.ogrid[:60, :320, :320]
    labels[((zz - 30) / 18.0) ** 2 + ((yy - 150) / 80.0) ** 2 + ((xx - 140) / 95.0) ** 2 <= 1] = True
    mr = Geometry((1.25, 1.25, 2.5), (-200.0, -200.0, -75.0), IDENTITY)
    liver = Volume(labels, mr)
    print(f"liver {labels.sum() * mr.voxel_volume_ml:.0f} mL on {labels.shape}")

    own = Volume(rng.uniform(0, 30, labels.shape).astype(np.float32), mr)
    wide = np.zeros((300, 512, 512), np.float32)
    wide[100:160, 50:370, 60:380] = own.array  # the same voxels in a larger field of view
    wide_origin = (-200.0 - 60 * 1.25, -200.0 - 50 * 1.25, -75.0 - 100 * 2.5)
    maps = {
        "on the liver's grid, 60 x 320 x 320": own,
        "300 x 512 x 512, same spacing": Volume(wide, Geometry(mr.spacing, wide_origin, IDENTITY)),
        "300 x 512 x 512, 0.78 x 0.78 x 1 mm": Volume(rng.uniform(0, 30, (300, 512, 512)).astype(np.float32),
                                                      Geometry((0.78, 0.78, 1.0), (-200.0, -200.0, -150.0), IDENTITY)),
    }

    def median_time(fn):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    print(f"\n{'PDFF map':<40} {'readout per stroke':>18} {'unit detection (once)':>22}")
    results = {}
    for name, ff in maps.items():
        results[name] = fat_fraction_readout(liver, ff, margin_mm=3.0, unit="percent")
        t_stroke = median_time(lambda ff=ff: fat_fraction_readout(liver, ff, margin_mm=3.0, unit="percent"))
        t_detect = median_time(lambda ff=ff: detect_fat_fraction_unit(ff.array))
        print(f"{name:<40} {t_stroke * 1000:>15.1f} ms {t_detect * 1000:>19.1f} ms")
    first, second = list(results.values())[:2]
    assert first == second, "the same map voxels in a larger field of view must give the same readout"

    fine = list(maps.values())[2]
    t0 = time.perf_counter()
    ndimage.distance_transform_edt(resample_mask_to(liver, fine.geometry, fine.array.shape),
                                   sampling=fine.geometry.spacing[::-1])
    print(f"{'the old way, fine map (once)':<40} {(time.perf_counter() - t0) * 1000:>15.1f} ms")


if __name__ == "__main__":
    main()
