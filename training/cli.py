"""`daeformer train`: train DAE-Former on the synthetic samples (real data formats come with the data sources)."""

from __future__ import annotations

import argparse
import sys

from napari_daeformer.checkpoint import ModelCard
from napari_daeformer.model import DAEFormer, named_config
from napari_daeformer.preprocessing import ct_preprocessing, rgb_preprocessing
from napari_daeformer.sample_data import CT_CLASSES, SKIN_CLASSES

from .augment import AugmentConfig
from .data import synthetic_cases
from .trainer import StepReport, TrainConfig, Trainer, ValReport


def _seeds(text: str) -> list[int]:
    """'1-12' or '1,3,5' -> seeds."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    p.add_argument("--synthetic", choices=("ct", "skin"), required=True,
                   help="train on generated CT phantoms or skin photos (one case per seed)")
    p.add_argument("--out", required=True, help="output folder for best.safetensors and last.safetensors")
    p.add_argument("--config", default="small", help="named architecture: small or paper (default: %(default)s)")
    p.add_argument("--train-seeds", default="1-12", type=_seeds, help="seeds of the training cases (default: 1-12)")
    p.add_argument("--val-seeds", default="13,14", type=_seeds, help="seeds of the validation cases (default: 13,14)")
    p.add_argument("--input-size", type=int, default=224, help="network input side (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=defaults.lr, help="base learning rate (default: %(default)s)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=defaults.optimizer, help="default: %(default)s")
    p.add_argument("--val-every", type=int, default=5, help="epochs between validations (default: %(default)s)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps")
    p.add_argument("--no-flip", action="store_true", help="no flip augmentation (for left/right classes)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="default: %(default)s")


def run(args: argparse.Namespace) -> int:
    ct = args.synthetic == "ct"
    classes = CT_CLASSES if ct else SKIN_CLASSES
    cfg = named_config(args.config, num_classes=len(classes), in_channels=1 if ct else 3)
    card = ModelCard(cfg, classes, input_size=(args.input_size, args.input_size),
                     preprocessing=ct_preprocessing("abdomen") if ct else rgb_preprocessing(),
                     provenance={"data": f"synthetic {args.synthetic}, train seeds {args.train_seeds}, "
                                         f"validation seeds {args.val_seeds}",
                                 "note": "demonstration model trained on synthetic data; not for clinical use"})
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                            val_every=args.val_every, max_steps=args.max_steps, seed=args.seed,
                            augment=AugmentConfig(p_flip=0.0 if args.no_flip else 0.5))
    trainer = Trainer(DAEFormer(cfg), card, synthetic_cases(args.synthetic, args.train_seeds),
                      synthetic_cases(args.synthetic, args.val_seeds), train_cfg, args.out, args.device)
    for report in trainer.fit():
        if isinstance(report, StepReport) and (report.step % 20 == 0 or report.step == 1):
            print(f"epoch {report.epoch} step {report.step}/{trainer.total_steps} loss {report.loss:.4f} "
                  f"lr {report.lr:.5f} {report.slices_per_s:.1f} slices/s", flush=True)
        elif isinstance(report, ValReport):
            per_class = ", ".join(f"{n} {d:.3f}" for n, d in zip(classes[1:], report.dice))
            print(f"validation after epoch {report.epoch}: mean Dice {report.mean_dice:.4f}"
                  f"{' (best)' if report.best else ''} [{per_class}]", flush=True)
    print(f"best mean Dice {trainer.best_dice:.4f}; checkpoints in {args.out}", file=sys.stderr)
    return 0
