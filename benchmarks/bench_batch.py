"""Batch throughput on a folder of synthetic CT volumes: prefetching reads against reading in turn.

    python benchmarks/bench_batch.py [--files 6] [--slices 40] [--side 512] [--device auto] [--threads N]

Device idle fraction = 1 - (time inside the engine) / (wall time). Same folder, same model (the bundled `ct`),
both variants in one run; outputs go to fresh folders so nothing is skipped.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from napari_daeformer.base.jobs import drain
from napari_daeformer.io.nifti import write_nifti
from napari_daeformer.io.record import default_affine
from napari_daeformer.tasks.batch import BatchJob, run_batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=6)
    p.add_argument("--slices", type=int, default=40)
    p.add_argument("--side", type=int, default=512)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        for i in range(args.files):
            volume = rng.normal(0, 300, (args.slices, args.side, args.side)).astype(np.int16)
            write_nifti(src / f"case{i:03d}.nii.gz", volume, default_affine((2.5, 0.7, 0.7)))
        print(f"{args.files} files of {args.slices}x{args.side}x{args.side} int16 (.nii.gz), bundled ct model, "
              f"device {args.device}, torch {torch.__version__}")
        drain(run_batch(BatchJob(src, Path(tmp) / "warm", patterns=("case000.nii.gz",), device=args.device)))
        rates = {}
        for prefetch in (False, True):
            summary = drain(run_batch(BatchJob(src, Path(tmp) / f"out{prefetch}", device=args.device,
                                               prefetch=prefetch)))
            rate = args.files / summary.wall_seconds
            idle = 1 - summary.compute_seconds / summary.wall_seconds
            rates[prefetch] = rate
            print(f"prefetch {'on ' if prefetch else 'off'}: {rate:.3f} files/s, device idle {idle:.0%} "
                  f"({summary.wall_seconds:.1f} s wall, {summary.compute_seconds:.1f} s in the engine)")
        print(f"prefetch speed-up: {rates[True] / rates[False]:.2f}x")


if __name__ == "__main__":
    main()
