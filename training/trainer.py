"""The training loop: the paper's recipe (SGD, poly decay per iteration, 0.4 CE + 0.6 Dice) on slices,
validation on whole held-out cases (Dice and HD95 in mm), best/last checkpoints and a resumable state,
all written atomically by rank 0. Under torchrun it trains with DistributedDataParallel.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from napari_daeformer.base.atomic import remove_stale_temporaries
from napari_daeformer.base.distributed import DistInfo, all_reduce_sum, barrier
from napari_daeformer.base.errors import TrainingError
from napari_daeformer.base.metrics import evaluate_case
from napari_daeformer.base.threads import ThreadGovernor
from napari_daeformer.engine.devices import autocast, resolve_device
from napari_daeformer.engine.inference import SliceInferer
from napari_daeformer.model import DAEFormer
from napari_daeformer.model.checkpoint import Checkpoint, ModelCard, save_checkpoint

from .augment import AugmentConfig, augment_batch
from .data import Case, SliceDataset, validate_cases
from .losses import DiceCELoss
from .state import load_state, save_state


@dataclass(frozen=True)
class TrainConfig:
    """Every default is the paper's (Azad et al., arXiv 2212.13504, and its released code) unless its comment says otherwise."""

    epochs: int | None = 400         # None: train for `max_steps` whatever the data size (fine-tuning)
    batch_size: int = 24             # global: split across processes under torchrun
    lr: float = 0.05                 # SGD, at batch 24
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9          # lr = base * (1 - it / it_max) ** 0.9, per iteration
    warmup_steps: int = 0            # linear warm-up from 0 before the poly decay (not the paper's; fine-tuning)
    ce_weight: float = 0.4
    dice_weight: float = 0.6
    dice_present_only: bool = False  # Dice over the classes present in the batch (not the paper's; fine-tuning)
    optimizer: Literal["sgd", "adamw"] = "sgd"   # or "adamw" (not the paper's; converges faster on small data)
    val_every: int = 1               # epochs between validations (the paper has no validation split)
    seed: int = 1234
    amp: bool = True                 # bf16 autocast on CUDA
    max_steps: int | None = None     # stop early (tests, smoke runs); the length of the run when epochs is None
    train_parts: str = "all"         # or "decoder": freeze the encoder (fine-tuning)
    sparse: bool = False             # IGNORE (255) voxels are "not annotated" (no loss), not refused (fine-tuning)
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)   # None: no augmentation

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class StepReport:
    epoch: int
    step: int
    total_steps: int
    loss: float
    lr: float
    slices_per_s: float


@dataclass(frozen=True)
class ValReport:
    epoch: int
    step: int
    dice: tuple[float, ...]          # per foreground class, averaged over cases; NaN where absent everywhere
    hd95: tuple[float, ...]          # mm, same convention (see napari_daeformer.base.metrics)
    mean_dice: float
    best: bool


Regulariser = Callable[[torch.nn.Module], torch.Tensor]


class Trainer:
    """Train `model` on slices of `train_cases`, validate on whole `val_cases` (split by case, never by slice).

    Args:
        out_dir: where checkpoints, the log and the resume state go; None writes no file at all (fine-tuning).
        regulariser: an extra loss term computed from the network at every step (added to Dice + CE).
        threads: chooses the CPU thread count before each step (fine-tuning beside other processes); the count in
            force before `fit` comes back when it ends.
        lr_scales: parameters whose name starts with a key learn at the schedule's rate times its value
            (fine-tuning's input calibration).

    The global random state is never touched: data order and augmentation draw from generators seeded by
    `cfg.seed`. Parameters frozen by `train_parts` get their `requires_grad` back when `fit` ends.
    """

    def __init__(self, model: DAEFormer, card: ModelCard, train_cases: Sequence[Case], val_cases: Sequence[Case],
                 cfg: TrainConfig, out_dir: str | Path | None, device: str = "auto", dist: DistInfo | None = None,
                 resume: bool = False, regulariser: Regulariser | None = None,
                 threads: ThreadGovernor | None = None, lr_scales: Mapping[str, float] | None = None,
                 deadline: float | None = None) -> None:
        """`deadline`: a `time.monotonic()` time by which the run ends, its last validation and writes included:
        training stops early enough for them (as long as the last validation took), then validates and saves."""
        self.dist = dist or DistInfo()
        self.deadline, self._val_seconds = deadline, 0.0
        rgb = card.preprocessing.kind == "rgb"
        validate_cases([*train_cases, *val_cases], card.config.num_classes, rgb, cfg.sparse)
        if {c.name for c in train_cases} & {c.name for c in val_cases}:
            raise TrainingError("a case is in both the training and the validation set")
        if cfg.batch_size % self.dist.world_size:
            raise TrainingError(f"batch size {cfg.batch_size} does not split over {self.dist.world_size} processes")
        if cfg.train_parts not in ("all", "decoder"):
            raise TrainingError(f"train_parts must be all or decoder, got {cfg.train_parts!r}")
        if cfg.epochs is None and cfg.max_steps is None:
            raise TrainingError("give a number of epochs or max_steps")
        if resume and out_dir is None:
            raise TrainingError("resuming needs the output folder of the interrupted run")
        self.model, self.card, self.cfg = model, card, cfg
        self.val_cases = list(val_cases)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.device = resolve_device(device)
        self.regulariser, self.threads = regulariser, threads
        self.data = SliceDataset(train_cases, card.preprocessing, card.input_size)
        if len(self.data) < cfg.batch_size:                 # a few annotated slices: one batch of all of them
            if len(self.data) < self.dist.world_size:
                raise TrainingError(f"{len(self.data)} training slices cannot be shared by {self.dist.world_size} "
                                    "processes")
            cfg = replace(cfg, batch_size=len(self.data) - len(self.data) % self.dist.world_size)
            self.cfg = cfg
        per_rank = cfg.batch_size // self.dist.world_size
        self.sampler = DistributedSampler(self.data, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                          shuffle=True, seed=cfg.seed, drop_last=True)
        self.loader = DataLoader(self.data, batch_size=per_rank, sampler=self.sampler, drop_last=True,
                                 generator=torch.Generator().manual_seed(cfg.seed))   # the global RNG stays as it was
        self._grad_flags = [p.requires_grad for p in model.parameters()]
        if cfg.train_parts == "decoder":
            for p in model.encoder.parameters():
                p.requires_grad_(False)
        self.model.to(self.device)
        params = _param_groups(model, lr_scales or {})
        if cfg.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                                                    weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adamw":
            # fused: one kernel for all parameter tensors instead of several per tensor
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                               fused=self.device.type in ("cpu", "cuda"))
        else:
            raise TrainingError(f"unknown optimizer {cfg.optimizer!r}; use sgd or adamw")
        self.net: torch.nn.Module = DistributedDataParallel(model) if self.dist.enabled else model
        self.steps_per_epoch = len(self.loader)
        by_epochs = None if cfg.epochs is None else cfg.epochs * self.steps_per_epoch
        self.total_steps = min(s for s in (by_epochs, cfg.max_steps) if s is not None)
        self.loss_fn = DiceCELoss(cfg.ce_weight, cfg.dice_weight, all_reduce_sum if self.dist.enabled else None,
                                  cfg.dice_present_only)
        self.step, self.epoch, self.best_dice = 0, 0, -1.0
        self.amp_dtype = torch.bfloat16 if cfg.amp and self.device.type == "cuda" else None
        if resume and self.out_dir is not None:
            meta = load_state(self.out_dir / "resume.safetensors", self.model, self.optimizer)
            self.step, self.epoch, self.best_dice = meta["step"], meta["epoch"], meta["best_dice"]

    def lr_at(self, step: int) -> float:
        """Linear warm-up over `warmup_steps`, then poly decay to 0 at the last step."""
        warm = self.cfg.warmup_steps
        if step < warm:
            return self.cfg.lr * (step + 1) / (warm + 1)
        return self.cfg.lr * (1 - (step - warm) / max(self.total_steps - warm, 1)) ** self.cfg.poly_power

    def _train_step(self, image: torch.Tensor, target: torch.Tensor, generator: torch.Generator) -> float:
        if self.threads is not None:
            self.threads.tick()
        image, target = image.to(self.device), target.to(self.device)
        if self.cfg.augment is not None:
            image, target = augment_batch(image, target, self.cfg.augment, generator)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step) * group.get("lr_scale", 1.0)      # a resume file may predate it
        with autocast(self.device, self.amp_dtype):
            logits = self.net(image)
        loss = self.loss_fn(logits, target)
        if self.regulariser is not None:
            loss = loss + self.regulariser(self.net)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at step {self.step}; lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    def evaluate(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-class (Dice, HD95 mm) on the validation cases, each averaged over the cases where defined."""
        if not self.val_cases:
            empty = np.full(self.card.config.num_classes - 1, np.nan)
            return empty, empty.copy()
        self.model.eval()
        inferer = SliceInferer(Checkpoint(self.model, self.card), device=self.device, precision="fp32")
        dice, dist = [], []
        for case in self.val_cases:
            result = inferer.segment(case.image, rgb=self.card.preprocessing.kind == "rgb")
            d, h = evaluate_case(result.labels, case.labels, self.card.config.num_classes, case.spacing or None)
            dice.append(d)
            dist.append(h)
        self.model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)              # all-NaN columns: class never present
            return np.nanmean(np.array(dice), axis=0), np.nanmean(np.array(dist), axis=0)

    def _save(self, name: str, dice: float | None) -> Path:
        card = self.card.with_provenance(trained_steps=self.step, epoch=self.epoch,
                                         val_mean_dice=None if dice is None else round(dice, 4),
                                         train_config=self.cfg.to_dict())
        return save_checkpoint(self.out_dir / name, self.model, card, overwrite=True)

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def fit(self, log_every: int = 10) -> Iterator[StepReport | ValReport]:
        """Train, yielding after every step and validation. Stopping the iteration is a clean cancel:
        the files on disk are those of the last finished epoch."""
        try:
            with self.threads or nullcontext():
                yield from self._fit(log_every)
        finally:
            for p, flag in zip(self.model.parameters(), self._grad_flags):
                p.requires_grad_(flag)

    def _fit(self, log_every: int) -> Iterator[StepReport | ValReport]:
        writes = self.dist.is_main and self.out_dir is not None
        if writes:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out_dir)                   # left by a run killed mid-write
            _truncate_log(self.out_dir / "metrics.jsonl", self.step)
        self.model.train()
        started = time.perf_counter()
        while self.step < self.total_steps:
            self.sampler.set_epoch(self.epoch)
            generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch * 101 + self.dist.rank)
            t0, seen = time.perf_counter(), 0
            for image, target in self.loader:
                loss = self._train_step(image, target, generator)
                seen += len(image) * self.dist.world_size
                report = StepReport(self.epoch, self.step, self.total_steps, loss, self.lr_at(self.step - 1),
                                    seen / (time.perf_counter() - t0))
                if writes and (self.step % log_every == 0 or self.step == 1):
                    self._log({"step": self.step, "epoch": self.epoch, "loss": loss, "lr": report.lr})
                yield report
                if self.step >= self.total_steps or self._out_of_time():
                    break
            self.epoch += 1
            finished = self.step >= self.total_steps or self._out_of_time()
            validate = finished or (bool(self.val_cases) and self.epoch % self.cfg.val_every == 0)
            if writes:
                if validate and not self.val_cases:                 # nothing held out: the last state, no score
                    self._save("last.safetensors", None)
                    self._save("best.safetensors", None)
                elif validate:
                    t_val = time.monotonic()
                    dice, dist = self.evaluate()
                    self._val_seconds = time.monotonic() - t_val
                    mean = float(np.nanmean(dice)) if np.isfinite(dice).any() else 0.0
                    best = mean > self.best_dice
                    self._save("last.safetensors", mean)
                    if best:
                        self.best_dice = mean
                        self._save("best.safetensors", mean)
                    self._log({"step": self.step, "epoch": self.epoch, "val_dice": _clean(dice),
                               "val_hd95_mm": _clean(dist), "val_mean_dice": mean,
                               "seconds": round(time.perf_counter() - started, 1)})   # since this run (or resume) began
                    plot_curves(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png")
                save_state(self.out_dir / "resume.safetensors", self.model, self.optimizer,
                           {"step": self.step, "epoch": self.epoch, "best_dice": self.best_dice,
                            "config": self.cfg.to_dict()})
                if validate and self.val_cases:
                    yield ValReport(self.epoch, self.step, tuple(map(float, dice)), tuple(map(float, dist)),
                                    mean, best)
            barrier(self.dist)
            if finished or self._out_of_time():             # no room for another epoch's steps and validation
                break

    def _out_of_time(self) -> bool:
        """Whether the time budget leaves no room for another step and the last validation; every process
        answers the same (rank 0's clock decides under torchrun)."""
        if self.deadline is None:
            return False
        late = time.monotonic() + self._val_seconds >= self.deadline
        if self.dist.world_size == 1:                       # no tensor, no device sync on every step
            return late
        flag = torch.tensor([float(late)], device=self.device)
        torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())


def _param_groups(model: torch.nn.Module, lr_scales: Mapping[str, float]) -> list[dict[str, Any]]:
    """The trainable parameters, one optimizer group per learning-rate multiplier (1 for the rest)."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = next((v for k, v in lr_scales.items() if name.startswith(k)), 1.0)
            groups.setdefault(float(scale), []).append(p)
    return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]


def _clean(values: np.ndarray) -> list[float | None]:
    return [None if not np.isfinite(v) else round(float(v), 5) for v in values]


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL log; a torn line (a run killed mid-write) or any line that is not a record with a
    step is left out."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines beyond `step` (a resumed run logs those steps again), and torn ones."""
    if not path.exists():
        return
    lines = [json.dumps(r) for r in read_log(path) if r["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def plot_curves(log: Path, out: Path) -> None:
    """PNG of training loss and validation mean Dice from the JSONL log (written atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_daeformer.base.atomic import atomic_write

    records = read_log(log)
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_mean_dice" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot([r["step"] for r in steps], [r["loss"] for r in steps])
    ax1.set(xlabel="step", ylabel="loss (0.4 CE + 0.6 Dice)", title="training loss")
    ax2.plot([r["step"] for r in vals], [r["val_mean_dice"] for r in vals], marker="o")
    ax2.set(xlabel="step", ylabel="mean Dice", title="validation", ylim=(0, 1))
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
