"""Training steps per second of the `paper` DAE-Former at batch 24, 224x224: our step against a plain fp32 loop.

    python benchmarks/bench_train.py [--device cpu|cuda] [--steps 5] [--threads N]

Plain loop: fp32 forward, 0.4 CE + 0.6 Dice, backward, SGD step, no augmentation. Ours: the Trainer's step
(on-device augmentation; bf16 autocast on CUDA, which the plain loop lacks). On CUDA both AMP on and off are shown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds  # noqa: E402

from napari_daeformer.checkpoint import ModelCard  # noqa: E402
from napari_daeformer.devices import resolve_device  # noqa: E402
from napari_daeformer.model import DAEFormer, named_config  # noqa: E402
from napari_daeformer.preprocessing import ct_preprocessing  # noqa: E402
from training.augment import AugmentConfig  # noqa: E402
from training.data import Case  # noqa: E402
from training.losses import DiceCELoss  # noqa: E402
from training.trainer import TrainConfig, Trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median)")
    p.add_argument("--threads", type=int)
    p.add_argument("--batch-size", type=int, default=24)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    B = args.batch_size
    cfg = named_config("paper", num_classes=9, in_channels=1)
    card = ModelCard(cfg, tuple(f"c{i}" for i in range(9)), preprocessing=ct_preprocessing())
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(B, 1, 224, 224, generator=gen).to(device)
    target = torch.randint(0, 9, (B, 224, 224), generator=gen).to(device)
    print(f"paper configuration, batch {B}, 224x224, {device}, torch {torch.__version__}")

    model = DAEFormer(cfg).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = DiceCELoss()

    def plain() -> None:
        loss = loss_fn(model(image), target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    base = median_seconds(plain, device, args.steps, warmup=2)
    print(f"plain fp32 loop: {1 / base:.3f} steps/s ({B / base:.1f} slices/s)")
    cases = [Case("bench", torch.zeros(B, 224, 224).numpy(), torch.zeros(B, 224, 224, dtype=torch.uint8).numpy())]
    for amp in ([True, False] if device.type == "cuda" else [False]):
        trainer = Trainer(DAEFormer(cfg), card, cases, [], TrainConfig(batch_size=B, lr=0.01, amp=amp,
                          augment=AugmentConfig()), "/tmp/bench_train", device=str(device))
        generator = torch.Generator().manual_seed(1)
        ours = median_seconds(lambda: trainer._train_step(image, target, generator), device, args.steps, warmup=2)
        label = "bf16 autocast" if amp else "fp32"
        print(f"trainer step ({label}, with augmentation): {1 / ours:.3f} steps/s ({B / ours:.1f} slices/s), "
              f"{base / ours:.2f}x the plain loop")


if __name__ == "__main__":
    main()
