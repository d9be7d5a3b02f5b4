"""The `paper` DAE-Former's forward pass at 224x224: the official model against each of our numeric paths, in one run.

    python benchmarks/bench_model.py [--device cpu|cuda] [--threads 2] [--batches 1,8] [--rounds 7] [--isa avx2]
                                     [--paths fp32,bf16-autocast,bf16-weights,int8-dynamic,int8-static,...]

Official: the official code's arithmetic and data layout over the same weights (`_official_layout.py`: its first
Mix-FFN Linear evaluated twice, 1x1 convolutions on images, its copies), in fp32 and under bf16 autocast (the
baselines of issue 15). Ours: the model as the engine runs it, by each path (`devices.PATHS`; `int8-static` is
`static_int8`'s package, compiled into a fresh folder unless $DAEFORMER_CACHE is set: its one-time cost is the
"prepare" column), plus opt-in candidates that were measured and not adopted: `compile-*` (torch.compile, inductor) and
`onnxruntime` (if installed).

Speed: seconds per slice (a forward pass over the batch divided by its size), the median of `--rounds` rounds in
which every path runs in turn, so that a slow spell of a shared machine hits every path alike; in its turn a path
runs twice and the second pass is timed, as the engine runs one path batch after batch (the first pass after
another path pays for that path's memory). Random weights. `--isa avx2` caps the instruction set at AVX2
(`_isa.py`): a CPU without bf16 or VNNI, where the baseline is the official model in fp32 only.
Agreement: each path applied to the bundled CT model (`small`, trained) on the held-out phantom (seed 0): the share
of voxels whose label equals our fp32's and the change of mean Dice against the truth. A path is fit for
`--precision auto` when it keeps 99.5% of the voxels and moves the Dice by less than 0.002.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _isa import ISAS, isa_in_use, limit_isa  # noqa: E402
from _official_layout import official_forward  # noqa: E402
from _timing import cpu_name  # noqa: E402

from napari_daeformer.base.metrics import dice_per_class  # noqa: E402
from napari_daeformer.engine import package_cache, probes, static_int8  # noqa: E402
from napari_daeformer.engine.devices import resolve_device, resolve_path  # noqa: E402
from napari_daeformer.engine.inference import calibration_batches, default_batch_size  # noqa: E402
from napari_daeformer.engine.probes import cpu_has_int8_kernels, cpu_has_native_bf16  # noqa: E402
from napari_daeformer.engine.stages import Accumulator, Predictor, SliceSource  # noqa: E402
from napari_daeformer.io.sample_data import synthetic_ct  # noqa: E402
from napari_daeformer.model import DAEFormer, count_parameters, named_config  # noqa: E402
from napari_daeformer.model.bundled import bundled_model  # noqa: E402
from napari_daeformer.model.checkpoint import Checkpoint, ModelCard, load_checkpoint  # noqa: E402
from napari_daeformer.model.preprocessing import ct_preprocessing  # noqa: E402

Forward = Callable[[torch.Tensor], torch.Tensor]
ENGINE = {"fp32": "fp32", "bf16-autocast": "bf16 autocast", "fp16-autocast": "fp16 autocast",
          "bf16-weights": "bf16 weights", "int8-dynamic": "int8 dynamic"}
CANDIDATES = ("compile-fp32", "compile-bf16-weights", "onnxruntime")


def official(model: torch.nn.Module, device: torch.device, amp: torch.dtype | None) -> Forward:
    forward = official_forward(model)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return forward(x).float()
    return run


def build(path: str, model: torch.nn.Module, device: torch.device, example: torch.Tensor,
          calibration: list[torch.Tensor] | None = None) -> tuple[Forward, float]:
    """A forward function of `model` by `path` and the seconds it took to prepare (quantise, calibrate, compile,
    export). Static quantisation observes its activations on `calibration` batches (default: `example`)."""
    t0 = time.perf_counter()
    if path == "official-fp32":
        fwd = official(model, device, None)
    elif path == "official-bf16":
        fwd = official(model, device, torch.bfloat16)
    elif path in ENGINE:
        fwd = Predictor(model, device, ENGINE[path])      # makes the quantised / low-precision copy, once
    elif path.startswith("compile-"):
        inner = Predictor(model, device, ENGINE[path.removeprefix("compile-")])
        inner.model = torch.compile(inner.model, dynamic=False)
        fwd = inner
        fwd(example)                                      # the compilation itself (cached by inductor on disk)
    elif path == "int8-static":                           # the engine's: compiled once per model, cached
        ckpt = Checkpoint(model, ModelCard(model.cfg, tuple(f"c{i}" for i in range(model.cfg.num_classes)),
                                           input_size=tuple(example.shape[-2:]), preprocessing=ct_preprocessing()))
        batch = default_batch_size(ckpt, torch.device("cpu"))
        compiled = static_int8.load(model, batch, ckpt.card.input_size) or \
            static_int8.build(model, calibration or [example], batch, ckpt.card.input_size, min_agreement=0.0)[0]
        fwd = Predictor(model, device, "int8 static", compiled)  # agreement is measured on the trained model instead
    elif path == "onnxruntime":
        import onnxruntime as ort

        onnx_path = Path(tempfile.mkdtemp()) / "daeformer.onnx"
        torch.onnx.export(copy.deepcopy(model).cpu(), (example.cpu(),), str(onnx_path), input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

        def fwd(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    else:
        raise SystemExit(f"unknown path {path!r}")
    return fwd, time.perf_counter() - t0


def agreement(paths: list[str], device: torch.device) -> dict[str, tuple[float, float]]:
    """Per path: (share of voxels equal to our fp32 labels, mean Dice change) of the bundled CT model on the sample."""
    ckpt = load_checkpoint(bundled_model("ct"))
    model = ckpt.model.to(device).eval()
    n, batch = ckpt.card.config.num_classes, 8

    def slices(image: np.ndarray) -> SliceSource:
        prep = ckpt.card.preprocessing.for_image(image)
        return SliceSource(image, np.arange(len(image)), False, prep, 255.0, ckpt.card.input_size, device)

    sample = synthetic_ct(seed=0)
    source = slices(sample.image)
    calibration = None
    if "int8-static" in paths:                            # as the engine would on another phantom segmented first
        calibration = calibration_batches(slices(synthetic_ct(seed=1).image), default_batch_size(ckpt, device))

    def labels(path: str) -> np.ndarray:
        fwd = build(path, model, device, source.batch(0, batch)[1], calibration)[0]
        out = Accumulator(len(sample.image), source.size, n)
        with torch.inference_mode():
            for start in range(0, len(sample.image), batch):
                idx, x = source.batch(start, start + batch)
                if len(idx) < batch and path.startswith("compile"):   # static shapes: pad the last batch
                    x = torch.cat([x, x[-1:].expand(batch - len(idx), -1, -1, -1)])
                out.store(idx, [t.numpy() for t in out.outputs(fwd(x)[:len(idx)].float())])
        return out.labels

    base = labels("fp32")
    dice = float(np.nanmean(dice_per_class(base, sample.labels, n)))
    result = {}
    for path in paths:
        other = labels(path)
        result[path] = (float((other == base).mean()), float(np.nanmean(dice_per_class(other, sample.labels, n))) - dice)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--paths", help=f"default: the engine's paths for the device; candidates: {', '.join(CANDIDATES)}")
    p.add_argument("--isa", choices=ISAS, default="native", help="avx2: as on a CPU without AVX-512 (bf16, VNNI)")
    args = p.parse_args()
    limit_isa(args.isa)
    os.environ.setdefault(package_cache.CACHE_ENV, tempfile.mkdtemp(prefix="daeformer-int8-"))   # prepare: from cold
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.paths:
        paths = [x for x in args.paths.split(",") if x]
    elif device.type == "cuda":
        paths = ["fp32", "bf16-autocast", "bf16-weights", "fp16-autocast"]
    else:
        bf16 = ["bf16-autocast", "bf16-weights"] if cpu_has_native_bf16() else []
        int8 = ["int8-dynamic"] + ([] if probes.static_int8_unavailable() else ["int8-static"])
        paths = ["fp32", *bf16] + (int8 if cpu_has_int8_kernels() else [])
    bf16_baseline = device.type == "cuda" or cpu_has_native_bf16()
    baselines = ["official-fp32"] + (["official-bf16"] if bf16_baseline else [])
    torch.manual_seed(0)
    model = DAEFormer(named_config("paper", num_classes=9, in_channels=1)).to(device).eval()
    x1 = torch.randn(1, 1, 224, 224, device=device)
    flops = {}
    for name, fwd in (("ours", model), ("official", official_forward(model))):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fwd(x1)
        flops[name] = counter.get_total_flops() / 1e9
    where = cpu_name() + f", native bf16: {cpu_has_native_bf16()}, int8 kernels: {cpu_has_int8_kernels()}, " \
        f"{torch.get_num_threads()} threads, {isa_in_use()}" if device.type == "cpu" else torch.cuda.get_device_name(device)
    auto = resolve_path("auto", device)
    print(f"# {where}; torch {torch.__version__}; `precision auto` here: {auto}")
    print(f"# paper, 224x224: {count_parameters(model) / 1e6:.2f} M parameters, {flops['ours']:.1f} GFLOPs per slice "
          f"(official layout {flops['official']:.1f}); seconds per slice, median of {args.rounds} rounds")
    batches = [int(b) for b in args.batches.split(",")]
    times: dict[str, list[float]] = {}
    prepare: dict[str, float] = {}
    for b in batches:
        x = torch.randn(b, 1, 224, 224, device=device)
        fwds = {}
        for path in baselines + paths:
            try:
                fwds[path], seconds = build(path, model, device, x)
            except Exception as e:                            # a path this machine cannot run: say why, go on
                print(f"# {path}: failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                continue
            prepare[path] = max(prepare.get(path, 0.0), seconds)
        rounds: dict[str, list[float]] = {path: [] for path in fwds}
        with torch.inference_mode():
            for fwd in fwds.values():
                fwd(x)
            for _ in range(args.rounds):
                for path, fwd in fwds.items():
                    fwd(x)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fwd(x)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    rounds[path].append((time.perf_counter() - t0) / b)
        for path, ts in rounds.items():
            times.setdefault(path, []).append(statistics.median(ts))
    agree = agreement([p for p in paths if p in times and p != "fp32"] + ["official-fp32"], device)
    agree["fp32"] = (1.0, 0.0)
    head = " | ".join(f"b{b} s/slice" for b in batches)
    ratios = " | ".join(" | ".join(f"x {base.replace('-', ' ')} (b{b})" for base in baselines) for b in batches)
    print(f"| path | {head} | {ratios} | prepare s | labels = fp32 | Dice change |")
    print("|---|" + "---:|" * ((1 + len(baselines)) * len(batches) + 3))
    for path, ts in times.items():
        cells = [f"{t:.4f}" for t in ts]
        for i, t in enumerate(ts):
            cells += [f"{times[base][i] / t:.2f}x" for base in baselines]
        same, change = agree.get(path, (float("nan"), float("nan")))
        print(f"| {path} | " + " | ".join(cells) + f" | {prepare[path]:.1f} | {100 * same:.3f}% | {change:+.4f} |")


if __name__ == "__main__":
    main()
