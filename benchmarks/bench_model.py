"""Forward time of the `paper` DAE-Former at 224x224: a plain fp32 baseline against our inference settings.

    python benchmarks/bench_model.py [--device cpu|cuda] [--threads N] [--repeats N]

Baseline: `torch.no_grad()`, fp32, contiguous input. Ours: `torch.inference_mode()`, channels-last input, and
bf16 autocast where the engine uses it (CUDA, or a CPU with native bf16). Ratios are within one run.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds  # noqa: E402

from napari_daeformer.devices import autocast, resolve_device, resolve_precision  # noqa: E402
from napari_daeformer.model import DAEFormer, count_parameters, named_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", default="1,8")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = DAEFormer(named_config("paper", num_classes=9, in_channels=1)).to(device).eval()
    x1 = torch.randn(1, 1, 224, 224, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x1)
    flops = counter.get_total_flops()
    amp = resolve_precision("auto", device)
    print(f"device {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}")
    print(f"paper configuration: {count_parameters(model) / 1e6:.2f} M parameters, "
          f"{flops / 2e9:.2f} GMACs ({flops / 1e9:.2f} GFLOPs) per 224x224 slice")
    print(f"{'batch':>5} {'baseline fp32 s':>16} {'ours s':>10} {'ours':>8} {'speed-up':>9} {'slices/s':>9}")
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(batch, 1, 224, 224, device=device)
        x_cl = x.contiguous(memory_format=torch.channels_last)

        def baseline() -> None:
            with torch.no_grad():
                model(x)

        def ours() -> None:
            with torch.inference_mode(), (autocast(device, amp) if amp else nullcontext()):
                model(x_cl)

        base = median_seconds(baseline, device, args.repeats)
        fast = median_seconds(ours, device, args.repeats)
        label = "bf16" if amp == torch.bfloat16 else ("fp16" if amp == torch.float16 else "fp32")
        print(f"{batch:>5} {base:>16.3f} {fast:>10.3f} {label:>8} {base / fast:>8.2f}x {batch / fast:>9.1f}")


if __name__ == "__main__":
    main()
