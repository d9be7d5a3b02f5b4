"""The training loop: the paper's recipe (SGD, poly decay per iteration, 0.4 CE + 0.6 Dice) on slices,
validation on whole held-out volumes, best and last checkpoints written atomically.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from napari_daeformer.checkpoint import ModelCard, save_checkpoint
from napari_daeformer.devices import autocast, resolve_device
from napari_daeformer.errors import TrainingError
from napari_daeformer.inference import run_segmentation, segment
from napari_daeformer.checkpoint import Checkpoint
from napari_daeformer.model import DAEFormer

from .augment import AugmentConfig, augment_batch
from .data import Case, SliceDataset, validate_cases
from .losses import DiceCELoss
from napari_daeformer.metrics import dice_per_class


@dataclass(frozen=True)
class TrainConfig:
    """Every default is the paper's (PAPER.md section 3) unless its comment says otherwise."""

    epochs: int = 400
    batch_size: int = 24
    lr: float = 0.05                 # at batch 24; SGD momentum 0.9
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9          # lr = base * (1 - it / it_max) ** 0.9, per iteration
    ce_weight: float = 0.4
    dice_weight: float = 0.6
    optimizer: str = "sgd"           # or "adamw" (not the paper's; converges faster on small data)
    val_every: int = 1               # epochs between validations
    seed: int = 1234
    amp: bool = True                 # bf16 autocast on CUDA
    max_steps: int | None = None     # stop early (tests, smoke runs)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class StepReport:
    epoch: int
    step: int
    loss: float
    lr: float
    slices_per_s: float


@dataclass(frozen=True)
class ValReport:
    epoch: int
    step: int
    dice: tuple[float, ...]          # per foreground class, NaN where absent everywhere
    mean_dice: float
    best: bool


class Trainer:
    """Train `model` on slices of `train_cases`, validate on whole `val_cases` (split by case, never by slice)."""

    def __init__(self, model: DAEFormer, card: ModelCard, train_cases: Sequence[Case], val_cases: Sequence[Case],
                 cfg: TrainConfig, out_dir: str | Path, device: str = "auto") -> None:
        rgb = card.preprocessing.kind == "rgb"
        validate_cases([*train_cases, *val_cases], card.config.num_classes, rgb)
        if {c.name for c in train_cases} & {c.name for c in val_cases}:
            raise TrainingError("a case is in both the training and the validation set")
        self.model, self.card, self.cfg = model, card, cfg
        self.val_cases = list(val_cases)
        self.out_dir = Path(out_dir)
        self.device = resolve_device(device)
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.data = SliceDataset(train_cases, card.preprocessing, card.input_size)
        self.loader = DataLoader(self.data, batch_size=cfg.batch_size, shuffle=True, drop_last=len(self.data) > cfg.batch_size,
                                 generator=self.generator)
        self.model.to(self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                                                    weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            raise TrainingError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adamw")
        self.total_steps = cfg.epochs * len(self.loader)
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.loss_fn = DiceCELoss(cfg.ce_weight, cfg.dice_weight)
        self.step = 0
        self.best_dice = -1.0
        self.amp_dtype = torch.bfloat16 if cfg.amp and self.device.type == "cuda" else None

    def lr_at(self, step: int) -> float:
        return self.cfg.lr * (1 - step / max(self.total_steps, 1)) ** self.cfg.poly_power

    def _train_step(self, image: torch.Tensor, target: torch.Tensor) -> float:
        image, target = image.to(self.device), target.to(self.device)
        image, target = augment_batch(image, target, self.cfg.augment, self.generator)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        with autocast(self.device, self.amp_dtype):
            logits = self.model(image)
        loss = self.loss_fn(logits, target)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at step {self.step}; lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    def evaluate(self) -> np.ndarray:
        """Per-class Dice on the validation cases, averaged over cases; shape (num_classes - 1,)."""
        self.model.eval()
        ckpt = Checkpoint(self.model, self.card)
        scores = []
        for case in self.val_cases:
            result = run_segmentation(segment(case.image, ckpt, rgb=self.card.preprocessing.kind == "rgb",
                                              device=self.device, precision="fp32"))
            scores.append(dice_per_class(result.labels, case.labels, self.card.config.num_classes))
        self.model.train()
        with np.errstate(all="ignore"):
            return np.nanmean(np.array(scores), axis=0) if scores else np.array([])

    def _save(self, name: str, epoch: int, dice: float) -> Path:
        card = self.card.with_provenance(trained_steps=self.step, epoch=epoch, val_mean_dice=round(dice, 4),
                                         train_config=json.loads(json.dumps(asdict(self.cfg))))
        return save_checkpoint(self.out_dir / name, self.model, card, overwrite=True)

    def fit(self) -> Iterator[StepReport | ValReport]:
        """Train, yielding after every step and validation. Stopping the iteration is a clean cancel."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model.train()
        epoch = 0
        while self.step < self.total_steps:
            t0, seen = time.perf_counter(), 0
            for image, target in self.loader:
                loss = self._train_step(image, target)
                seen += len(image)
                yield StepReport(epoch, self.step, loss, self.lr_at(self.step - 1),
                                 seen / (time.perf_counter() - t0))
                if self.step >= self.total_steps:
                    break
            epoch += 1
            if epoch % self.cfg.val_every == 0 or self.step >= self.total_steps:
                dice = self.evaluate()
                mean = float(np.nanmean(dice)) if np.isfinite(dice).any() else 0.0
                best = mean > self.best_dice
                self._save("last.safetensors", epoch, mean)
                if best:
                    self.best_dice = mean
                    self._save("best.safetensors", epoch, mean)
                yield ValReport(epoch, self.step, tuple(float(d) for d in dice), mean, best)
