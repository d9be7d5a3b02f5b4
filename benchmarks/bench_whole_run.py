"""A whole `daeformer segment` per numeric path, as a user runs it: seconds from the command to its exit (start-up,
reading, the model's load, int8's package load, inference, writing), in one run, rounds interleaved.

    python benchmarks/bench_whole_run.py [--slices 48,160] [--paths fp32,bf16,int8,int8-dynamic,auto] [--rounds 2]
                                         [--threads 1] [--isa avx2]

The bundled CT model on the generated abdomen (192 x 192 slices). `int8` is static int8: compiled once before the
timing (into $DAEFORMER_CACHE if set, else a fresh folder); `int8-dynamic` is `--precision int8` with no C++
compiler (CXX pointing nowhere), so the engine runs torch's dynamic quantisation. `--isa avx2` caps every library
at AVX2 (`_isa.py`), as on a CPU without AVX-512. `auto` must be the fastest column wherever it runs
(docs/troubleshooting.md#int8).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _isa import ISAS, isa_in_use, limit_isa  # noqa: E402
from _timing import cpu_name  # noqa: E402


def _run(volume: Path, out: Path, path: str, env: dict[str, str]) -> float:
    precision = "int8" if path.startswith("int8") else path
    env = {**env, "CXX": "/nonexistent"} if path == "int8-dynamic" else env
    t0 = time.perf_counter()
    subprocess.run(["daeformer", "segment", str(volume), str(out), "--precision", precision, "--device", "cpu",
                    "--overwrite"], env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", default="48,160")
    p.add_argument("--paths", default="fp32,bf16,int8,int8-dynamic,auto")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--isa", choices=ISAS, default="native")
    args = p.parse_args()
    limit_isa(args.isa)
    from napari_daeformer.engine import probes
    from napari_daeformer.io.nifti import write_nifti
    from napari_daeformer.io.orientation import radiological_affine
    from napari_daeformer.io.sample_data import synthetic_ct

    folder = Path(tempfile.mkdtemp())
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env.setdefault("DAEFORMER_CACHE", str(folder / "cache"))
    paths = [x for x in args.paths.split(",") if x != "bf16" or probes.cpu_has_native_bf16()]
    volumes = {}
    for n in map(int, args.slices.split(",")):
        sample = synthetic_ct(seed=0, shape=(n, 192, 192))
        volumes[n] = write_nifti(folder / f"ct{n}.nii.gz", sample.image, radiological_affine(sample.spacing))
    if "int8" in paths:
        _run(volumes[min(volumes)], folder / "out.nii.gz", "int8", env)          # the one-time compile, untimed
    print(f"CPU: {cpu_name()}, {args.threads} thread(s), {isa_in_use()}")
    print("| slices | " + " | ".join(paths) + " |")
    print("|---:|" + "---:|" * len(paths))
    for n, volume in volumes.items():
        times: dict[str, list[float]] = {path: [] for path in paths}
        for _ in range(args.rounds):
            for path in paths:
                times[path].append(_run(volume, folder / "out.nii.gz", path, env))
        print(f"| {n} | " + " | ".join(f"{min(t):.1f}-{max(t):.1f}" for t in times.values()) + " |")


if __name__ == "__main__":
    main()
