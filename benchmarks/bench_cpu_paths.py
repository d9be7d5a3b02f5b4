"""CPU inference paths side by side in one run: plain fp32 (the official code's arithmetic) against each candidate.

    python benchmarks/bench_cpu_paths.py [--threads 2] [--batches 1,8] [--repeats 5] [--paths fp32,bf16-autocast,...]

Speed: the `paper` configuration (random weights) at 224x224, median seconds per slice (a forward pass over the batch,
divided by its size) after warm-ups; a path
that compiles or exports states that one-time cost. Agreement: the same path applied to the bundled CT model
(`small`, trained) on the held-out phantom (seed 0): the share of voxels whose label equals fp32's and the change of
mean Dice against the truth. A path is fit for `--precision auto` when it agrees on at least 99.5% of the voxels and
moves the Dice by less than 0.002. Paths:

- fp32-copies: `torch.no_grad()`, the Mix-FFN's depthwise convolution fed through transposed copies of its hidden
  tokens, as the official code (and this project before) did: the baseline.
- fp32: `torch.no_grad()` with the Mix-FFN as it is now (a channels-last view, no copies).
- bf16-copies: bf16 autocast with the old Mix-FFN layout (the engine's CPU path before).
- fp32-cl: `inference_mode`, channels-last input.
- bf16-autocast: bf16 autocast (the engine's CPU path where the CPU has native bf16).
- bf16-weights: the model stored in bf16.
- int8-dynamic: `torch.ao.quantization.quantize_dynamic` of every Linear (int8 weights, activations quantised on the
  fly), the rest fp32.
- compile / compile-bf16: `torch.compile` (inductor, C++/OpenMP kernels) in fp32 / under bf16 autocast.
- onnxruntime: the graph exported with `torch.onnx.export`, run by ONNX Runtime's CPU provider (if installed).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cpu_name, median_seconds  # noqa: E402

from napari_daeformer.bundled import bundled_model  # noqa: E402
from napari_daeformer.checkpoint import load_checkpoint  # noqa: E402
from napari_daeformer.devices import cpu_has_native_bf16  # noqa: E402
from napari_daeformer.metrics import dice_per_class  # noqa: E402
from napari_daeformer.model import DAEFormer, named_config  # noqa: E402
from napari_daeformer.model.layers import MixFFN, image_to_tokens, tokens_to_image  # noqa: E402
from napari_daeformer.sample_data import synthetic_ct  # noqa: E402
from napari_daeformer.stages import Accumulator, SliceSource  # noqa: E402

Forward = Callable[[torch.Tensor], torch.Tensor]
PATHS = ("fp32-copies", "fp32", "bf16-copies", "fp32-cl", "bf16-autocast", "bf16-weights", "int8-dynamic", "compile",
         "compile-bf16", "onnxruntime")


def _mixffn_through_copies(self: MixFFN, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The Mix-FFN as the official code lays it out: (B, N, C) tokens transposed and copied to (B, C, H, W) and back."""
    h = self.fc1(x)
    mixed = image_to_tokens(self.dwconv(tokens_to_image(h, hw))) + h
    return self.fc2(self.act(self.norm(mixed)))


def _with_copies(fwd: Forward) -> Forward:
    def run(x: torch.Tensor) -> torch.Tensor:
        current = MixFFN.forward
        MixFFN.forward = _mixffn_through_copies                 # type: ignore[method-assign]
        try:
            return fwd(x)
        finally:
            MixFFN.forward = current                            # type: ignore[method-assign]
    return run


def build(path: str, model: torch.nn.Module, example: torch.Tensor) -> tuple[Forward, float]:
    """A forward function of `model` by `path` and the seconds it took to prepare (compile, export, quantise)."""
    if path.endswith("-copies"):
        fwd, seconds = build(path.removesuffix("-copies").replace("bf16", "bf16-autocast"), model, example)
        return _with_copies(fwd), seconds
    t0 = time.perf_counter()
    model = copy.deepcopy(model).eval()
    if path == "fp32":
        def fwd(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model(x)
    elif path == "fp32-cl":
        def fwd(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(x.contiguous(memory_format=torch.channels_last))
    elif path == "bf16-autocast":
        def fwd(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x).float()
    elif path == "bf16-weights":
        low = model.to(torch.bfloat16)

        def fwd(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return low(x.to(torch.bfloat16)).float()
    elif path == "int8-dynamic":
        q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

        def fwd(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return q(x)
    elif path in ("compile", "compile-bf16"):
        compiled = torch.compile(model, dynamic=False)
        amp = path == "compile-bf16"

        def fwd(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                return compiled(x).float()
        fwd(example)                                          # the compilation itself
    elif path == "onnxruntime":
        import onnxruntime as ort

        onnx_path = Path(tempfile.mkdtemp()) / "daeformer.onnx"
        torch.onnx.export(model, (example,), str(onnx_path), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

        def fwd(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    else:
        raise SystemExit(f"unknown path {path!r}; choose from {', '.join(PATHS)}")
    return fwd, time.perf_counter() - t0


def agreement(path: str) -> tuple[float, float]:
    """(share of voxels equal to fp32's labels, mean Dice change) of the bundled CT model on the held-out phantom."""
    ckpt = load_checkpoint(bundled_model("ct"))
    sample = synthetic_ct(seed=0)
    prep = ckpt.card.preprocessing.for_image(sample.image)
    source = SliceSource(sample.image, np.arange(len(sample.image)), False, prep, 255.0, ckpt.card.input_size,
                         torch.device("cpu"))
    example = source.batch(0, 8)[1]

    def labels(fwd: Forward) -> np.ndarray:
        out = Accumulator(len(sample.image), source.size, ckpt.card.config.num_classes)
        for start in range(0, len(sample.image), 8):
            idx, x = source.batch(start, start + 8)
            with torch.inference_mode():
                if len(idx) < 8 and path.startswith("compile"):      # static shapes: pad the last batch
                    x = torch.cat([x, x[-1:].expand(8 - len(idx), -1, -1, -1)])
                out.add(idx, fwd(x)[:len(idx)].float())
        return out.labels

    base = labels(build("fp32-copies", ckpt.model, example)[0])
    other = labels(build(path, ckpt.model, example)[0])
    n = ckpt.card.config.num_classes
    change = np.nanmean(dice_per_class(other, sample.labels, n)) - np.nanmean(dice_per_class(base, sample.labels, n))
    return float((other == base).mean()), float(change)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int)
    p.add_argument("--batches", default="1,2,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--paths", default=",".join(PATHS))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [x for x in args.paths.split(",") if x]
    cpu = torch.device("cpu")
    model = DAEFormer(named_config("paper", num_classes=9, in_channels=1)).eval()
    batches = [int(b) for b in args.batches.split(",")]
    print(f"# {cpu_name()}, native bf16: {cpu_has_native_bf16()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; `paper` at 224x224, seconds per slice (median of {args.repeats})")
    print("| path | " + " | ".join(f"batch {b} s/slice" for b in batches) + " | " +
          " | ".join(f"x baseline (b{b})" for b in batches) + " | prepare s | labels = fp32 | Dice change |")
    print("|---|" + "---:|" * (2 * len(batches) + 3))
    baseline: dict[int, float] = {}
    for path in paths:
        try:
            times = []
            prepare = 0.0
            for b in batches:
                x = torch.randn(b, 1, 224, 224)
                fwd, seconds = build(path, model, x)
                prepare = max(prepare, seconds)
                times.append(median_seconds(lambda: fwd(x), cpu, args.repeats, warmup=1) / b)
            same, change = agreement(path)
        except Exception as e:                                  # a path this machine cannot run: say why, go on
            print(f"| {path} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} |", flush=True)
            continue
        if path == "fp32-copies":
            baseline = dict(zip(batches, times))
        ratios = [baseline[b] / t if baseline else float("nan") for b, t in zip(batches, times)]
        print(f"| {path} | " + " | ".join(f"{t:.3f}" for t in times) + " | " + " | ".join(f"{r:.2f}x" for r in ratios)
              + f" | {prepare:.1f} | {100 * same:.3f}% | {change:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
