"""Read and write a 512x512x300 int16 NIfTI (.nii and .nii.gz): our I/O layer against plain nibabel.

    python benchmarks/bench_io.py [--slices 300]

Our writes fsync the temporary file before the atomic rename (so a crash never leaves a half-written
mask under the final name); nibabel's plain save leaves the data in the page cache, hence the gap on
uncompressed files. Peak memory is the largest traced allocation total (tracemalloc, numpy included) during each call,
as a multiple of the array size (150 MiB at full size).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_daeformer.io import read_image, write_labels
from napari_daeformer.io.nifti import write_nifti


def measure(fn: Callable[[], object]) -> tuple[float, int]:
    tracemalloc.start()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=300)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    volume = (rng.normal(0, 300, (args.slices, 512, 512))).astype(np.int16)     # (Z, Y, X)
    labels = (volume > 200).astype(np.uint8)
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    size = volume.nbytes
    print(f"volume {volume.shape} int16 = {size / 2**20:.0f} MiB")
    print(f"{'task':<30} {'nibabel s':>10} {'ours s':>8} {'ratio':>6} {'ours peak / array':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".nii", ".nii.gz"):
            src = Path(tmp) / f"ct{suffix}"
            base_w, _ = measure(lambda: nib.save(nib.Nifti1Image(volume.T, affine), str(Path(tmp) / f"b{suffix}")))
            ours_w, peak_w = measure(lambda: write_nifti(src, volume, affine, overwrite=True))
            print(f"{'write image ' + suffix:<30} {base_w:>10.2f} {ours_w:>8.2f} {ours_w / base_w:>6.2f} "
                  f"{peak_w / size:>18.2f}")
            # Uncompressed files come back memory-mapped: sum() makes both sides really read the data.
            base_r, _ = measure(lambda: np.asanyarray(nib.load(str(src)).dataobj).sum())
            ours_r, peak_r = measure(lambda: read_image(src).data.sum())
            print(f"{'read image ' + suffix:<30} {base_r:>10.2f} {ours_r:>8.2f} {ours_r / base_r:>6.2f} "
                  f"{peak_r / size:>18.2f}")
            base_l, _ = measure(lambda: nib.save(nib.Nifti1Image(labels.T, affine), str(Path(tmp) / f"bl{suffix}")))
            ours_l, peak_l = measure(lambda: write_labels(Path(tmp) / f"l{suffix}", labels,
                                                          {"affine": affine.tolist(), "spacing": [2.5, 0.7, 0.7],
                                                           "spatial_shape": list(labels.shape)}, overwrite=True))
            print(f"{'write labels ' + suffix:<30} {base_l:>10.2f} {ours_l:>8.2f} {ours_l / base_l:>6.2f} "
                  f"{peak_l / size:>18.2f}")


if __name__ == "__main__":
    main()
