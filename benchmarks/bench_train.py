"""Training speed: the `paper` step against a plain fp32 loop, and CPU minutes from one annotated volume to a model.

    python benchmarks/bench_train.py [--device cpu|cuda] [--steps 5] [--threads N]
    python benchmarks/bench_train.py --one-volume [--kind ct|mr] [--minutes 15] [--target 0.8] [--threads 2]

Plain loop: fp32 forward, 0.4 CE + 0.6 Dice, backward, SGD step, no augmentation. Ours: the Trainer's step
(on-device augmentation; bf16 autocast on CUDA, which the plain loop lacks). On CUDA both AMP on and off are shown.

`--one-volume`: what a researcher with one annotated scan gets. One phantom volume (48 x 192 x 192, CT in HU or MR-like
in arbitrary units with a bias field) is written in the nnU-Net layout and `daeformer train --arch small` runs on it on
the CPU with the settings below (a slab of slices held out for validation, normalisation detected from the data; no
flips, since the phantom has a left and a right kidney).
The run is stopped at `--minutes`; metrics.jsonl then gives the wall time of each validation, and the table the
first time the held-out slab's mean Dice reached `--target`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cpu_name, median_seconds  # noqa: E402
from napari_daeformer_training.augment import AugmentConfig  # noqa: E402
from napari_daeformer_training.data import Case  # noqa: E402
from napari_daeformer_training.losses import DiceCELoss  # noqa: E402
from napari_daeformer_training.trainer import TrainConfig, Trainer  # noqa: E402

from napari_daeformer.engine.devices import resolve_device  # noqa: E402
from napari_daeformer.model import DAEFormer, named_config  # noqa: E402
from napari_daeformer.model.checkpoint import ModelCard  # noqa: E402
from napari_daeformer.model.preprocessing import ct_preprocessing  # noqa: E402

ONE_VOLUME_SETTINGS = ["--arch", "small", "--input-size", "224", "--batch-size", "8", "--optimizer", "adamw", "--lr", "2e-3",
                       "--weight-decay", "1e-4", "--epochs", "100000", "--val-every", "25", "--no-flip", "--device", "cpu", "--quiet"]


def one_volume(kind: str, minutes: float, target: float, threads: int | None) -> None:
    import json
    import subprocess
    import tempfile
    import time

    from napari_daeformer.io import write_labels
    from napari_daeformer.io.nifti import write_nifti
    from napari_daeformer.io.record import default_affine
    from napari_daeformer.io.sample_data import synthetic_ct, synthetic_mr

    root = Path(tempfile.mkdtemp(prefix="bench_one_volume_"))
    s = (synthetic_ct if kind == "ct" else synthetic_mr)(seed=3)
    affine = default_affine(s.spacing)
    write_nifti(root / "data" / "imagesTr" / "case_000_0000.nii.gz", s.image, affine)
    write_labels(root / "data" / "labelsTr" / "case_000.nii.gz", s.labels,
                 {"affine": affine.tolist(), "spacing": list(s.spacing), "spatial_shape": list(s.labels.shape)})
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    cmd = [sys.executable, "-m", "napari_daeformer.app", "train", "--data", str(root / "data"), "--out", str(root / "out"),
           *ONE_VOLUME_SETTINGS]
    print(f"# one {kind.upper()} volume {s.image.shape}, {cpu_name()}, {threads or 'default'} threads, "
          f"stopped after {minutes:g} min: daeformer train ... {' '.join(ONE_VOLUME_SETTINGS)}", flush=True)
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, env=env, timeout=minutes * 60, check=True)
    except subprocess.TimeoutExpired:
        pass                                                  # the planned stop: checkpoints are written atomically
    wall = time.perf_counter() - t0
    vals = [r for r in map(json.loads, (root / "out" / "metrics.jsonl").read_text().splitlines()) if "val_dice" in r]
    print("| minutes | step | slab mean Dice | per class |")
    print("|---:|---:|---:|---|")
    for r in vals:
        print(f"| {r['seconds'] / 60:.1f} | {r['step']} | {r['val_mean_dice']:.3f} | "
              f"{' '.join('-' if d is None else f'{d:.2f}' for d in r['val_dice'])} |")
    reached = next((r for r in vals if r["val_mean_dice"] >= target), None)
    best = max((r["val_mean_dice"] for r in vals), default=float("nan"))
    when = f"{reached['seconds'] / 60:.1f} min (step {reached['step']})" if reached else "not reached"
    print(f"\nmean Dice {target} on the held-out slab: {when}; best {best:.3f} in {wall / 60:.1f} min of wall time")




def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (median)")
    p.add_argument("--threads", type=int)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--one-volume", action="store_true", help="CPU minutes from one annotated volume to a model")
    p.add_argument("--kind", choices=("ct", "mr"), default="ct", help="--one-volume: CT or MR-like phantom")
    p.add_argument("--minutes", type=float, default=15.0, help="--one-volume: stop the run after this long")
    p.add_argument("--target", type=float, default=0.8, help="--one-volume: held-out mean Dice to reach")
    args = p.parse_args()
    if args.one_volume:
        one_volume(args.kind, args.minutes, args.target, args.threads)
        return
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
