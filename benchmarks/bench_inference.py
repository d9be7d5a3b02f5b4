"""Segment a 512x512x200 volume with the `paper` DAE-Former: the official model and a naive loop against our engine.

    python benchmarks/bench_inference.py [--device cpu|cuda] [--slices 200] [--threads N] [--rounds 3] [--isa avx2]
                                         [--variants official,naive,ours-fp32,ours-bf16,ours-int8,ours-int8dynamic,
                                                     ours-auto,ours-fp32-neighbours]

Naive loop: fp32, one slice at a time, every slice's full-resolution logits kept and stacked, argmax at the
end; `official` is that loop around the official code's arithmetic and layout (`_official_layout.py`), `naive`
around our model. Ours: the engine (`segment`: batches, inference_mode, the numeric path of `--precision`, labels
only). Each variant runs the whole volume once to warm up (kernel selection, allocator) and is timed on a second
pass (read and write excluded), in its own process so that its peak RSS (and peak CUDA memory) is its own; the
variants run in turn for `--rounds` rounds and the median speed is reported (memory: the first round's). Weights
are random: speed and memory do not depend on them, and label agreement (the loops with each other, each engine path
with the engine's fp32) is a lower bound: a random network's classes are near ties (`bench_model.py` measures
agreement on the trained CT model). `--isa avx2`: as on a CPU without AVX-512, bf16 or VNNI (`_isa.py`).
`ours-int8`: static int8, its package compiled in the first round (`prepare_s`, into a fresh folder unless
$DAEFORMER_CACHE is set) without the agreement gate, which random weights cannot pass; `ours-int8dynamic`: `int8`
on a machine without a C++ compiler (int8 dynamic). `ours-fp32-neighbours`: fp32 with each slice averaged with its
neighbours at 0.3 (`neighbours`: the probabilities come back to the host, which makes the labels).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _isa import ISAS, isa_in_use, limit_isa  # noqa: E402
from _official_layout import official_forward  # noqa: E402
from _timing import cpu_name  # noqa: E402

from napari_daeformer.engine import package_cache, static_int8
from napari_daeformer.engine.devices import resolve_device
from napari_daeformer.engine.inference import SliceInferer, calibration_batches, default_batch_size
from napari_daeformer.engine.stages import SliceSource
from napari_daeformer.model import DAEFormer, named_config
from napari_daeformer.model.checkpoint import Checkpoint, ModelCard
from napari_daeformer.model.preprocessing import ct_preprocessing


def run_variant(variant: str, device_name: str, slices: int, threads: int | None, labels_to: str) -> dict[str, float]:
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device_name)
    torch.manual_seed(0)
    model = DAEFormer(named_config("paper", num_classes=9, in_channels=1)).eval().to(device)
    card = ModelCard(model.cfg, tuple(f"c{i}" for i in range(9)), preprocessing=ct_preprocessing())
    volume = np.random.default_rng(0).normal(0, 300, (slices, 512, 512)).astype(np.int16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if variant in ("naive", "official"):
        prep = card.preprocessing
        forward = official_forward(model) if variant == "official" else model

        def naive(vol: np.ndarray) -> np.ndarray:
            logits = []
            with torch.no_grad():
                for plane in vol:
                    x = torch.from_numpy(prep.apply(plane))[None, None].to(device)
                    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
                    logits.append(F.interpolate(forward(x), size=plane.shape, mode="bilinear", align_corners=False))
            return torch.cat(logits).argmax(1).cpu().numpy().astype(np.uint8)

        naive(volume)                         # warm-up: the same shapes as the timed run
        start = time.perf_counter()
        labels = naive(volume)
    else:
        ckpt = Checkpoint(model, card)
        precision = "int8" if variant.startswith("ours-int8") else variant.split("-")[1]
        if variant == "ours-int8":                        # made once, as `segment` would for a trained model
            batch = default_batch_size(ckpt, torch.device("cpu"))
            t0 = time.perf_counter()
            if static_int8.load(model, batch, card.input_size) is None:
                source = SliceSource(volume, np.arange(slices), False, card.preprocessing.for_image(volume), 255.0,
                                     card.input_size, device)
                static_int8.build(model, calibration_batches(source, batch), batch, card.input_size, min_agreement=0.0)
            prepare = time.perf_counter() - t0
        weight = 0.3 if variant.endswith("-neighbours") else 0.0
        SliceInferer(ckpt, device=device, precision=precision, neighbour_weight=weight).segment(volume)   # warm-up
        start = time.perf_counter()
        result = SliceInferer(ckpt, device=device, precision=precision, neighbour_weight=weight).segment(volume)
        labels = result.labels
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "slices_per_s": slices / seconds,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if variant not in ("naive", "official"):
        out["batch_size"], out["path"] = result.batch_size, str(result.numeric_path)
    if variant == "ours-int8":
        out["prepare_s"] = prepare
    np.save(labels_to, labels)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--slices", type=int, default=200)
    p.add_argument("--threads", type=int)
    p.add_argument("--variants", default="official,naive,ours-fp32,ours-auto")
    p.add_argument("--rounds", type=int, default=3, help="runs of every variant, in turn; the median is reported")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--labels-to", help=argparse.SUPPRESS)
    p.add_argument("--isa", choices=ISAS, default="native", help="avx2: as on a CPU without AVX-512 (bf16, VNNI)")
    args = p.parse_args()
    limit_isa(args.isa)                                    # the variants' processes inherit the caps
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.device, args.slices, args.threads, args.labels_to)))
        return
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {isa_in_use()}"
    print(f"{args.slices} x 512 x 512 volume, paper configuration, {device} ({name}), torch {torch.__version__}")
    runs: dict[str, list[dict[str, float]]] = {}
    labels = {}
    with tempfile.TemporaryDirectory() as folder:          # each variant's labels, read back and then removed
        for _ in range(args.rounds):                       # variants in turn, so that a slow spell hits them alike
            for variant in args.variants.split(","):
                labels_path = Path(folder) / f"{variant}.npy"
                cmd = [sys.executable, __file__, "--variant", variant, "--device", args.device, "--slices",
                       str(args.slices), "--labels-to", str(labels_path)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                env = {**os.environ, package_cache.CACHE_ENV: os.environ.get(package_cache.CACHE_ENV, folder)}
                if variant == "ours-int8dynamic":
                    env["CXX"] = "no-compiler-here"           # static int8 unavailable: int8 runs dynamic
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                runs.setdefault(variant, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
                labels[variant] = np.load(labels_path)
                print(variant, runs[variant][-1], flush=True)
    results = {variant: {**rs[0], "slices_per_s": statistics.median(r["slices_per_s"] for r in rs)}
               for variant, rs in runs.items()}
    base = results.get("official") or results.get("naive")
    if base:
        name = "official" if "official" in results else "naive"
        print(f"| variant | slices/s | x {name} | peak RSS GB | peak CUDA GB | labels equal to |")
        print("|---|---:|---:|---:|---:|---:|")
        for variant, r in results.items():
            # the loops against each other; the engine's paths against its fp32 (the loops resize without antialiasing)
            ref = ("naive" if variant == "official" else "official") if variant in ("naive", "official") else "ours-fp32"
            same = f"{100 * float((labels[variant] == labels[ref]).mean()):.2f}% of {ref}" if ref in labels else ""
            print(f"| {variant} | {r['slices_per_s']:.2f} | {r['slices_per_s'] / base['slices_per_s']:.2f}x | "
                  f"{r['peak_rss_gb']:.2f} | {r.get('peak_cuda_gb', float('nan')):.2f} | {same} |")


if __name__ == "__main__":
    main()
