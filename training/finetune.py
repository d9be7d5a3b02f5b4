"""The runner: fine-tune a copy of a model on the user's corrected slices, stage by stage, and never hand back a
worse one.

A run is its settings (`training.settings`; one recipe per task in `training.recipes`, the evidence in
docs/training.md#fine-tuning-recipe). Its stages: `steps` under the full protection (`training.protection`) and,
for a parent that still fits the corrections poorly after them, `steps` again from the parent with the protection
eased; where that beat the parent on the one slice held out, `steps` once more on every corrected slice. The
held-out slices are scored every `score_every` steps, the parent counting as step 0, and a trained state replaces
the parent only where it beats it by more than the held-out evidence can tell from chance (`training.verdict`); a
gain on a single held-out slice is cross-checked: the run is repeated holding out another corrected slice, and
kept only if it beats the parent there too.
Closing the generator (a cancel) leaves the parent exactly as it was: only a copy is trained.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from napari_daeformer.base.threads import ThreadGovernor
from napari_daeformer.engine.devices import resolve_device
from napari_daeformer.engine.inference import SliceInferer
from napari_daeformer.model.checkpoint import Checkpoint, ModelCard
from napari_daeformer.session.agreement import PROVENANCE_KEY, Agreement, as_provenance, history, merged

from .augment import AugmentConfig
from .calibration import calibrated
from .data import Case, network_input
from .losses import IGNORE
from .pairs import Pair, Slices, check_pairs, pair_agreement, split
from .protection import KEPT_DICE, PseudoLabels, PullToParent, kept_dice, new_class_hosts, start_from_hosts
from .recipes import REFINE
from .settings import FinetuneSettings
from .trainer import StepReport, TrainConfig, Trainer
from .verdict import FinetuneProgress, FinetuneResult, pooled_dice, resolvable, slice_scores, unshown_changes


@dataclass(frozen=True)
class Stage:
    """A stretch of `steps` training steps from the parent's weights: `offset` steps before it, the protection at
    `share` of its weight, trained on the held-out slices too where `refit` (then nothing is scored)."""

    name: Literal["held", "eased", "refit"]
    offset: int
    share: float = 1.0
    refit: bool = False


@dataclass(frozen=True)
class _Best:
    dice: float
    step: int
    state: dict[str, torch.Tensor]
    scores: np.ndarray          # (n,) per held-out slice


def finetune(parent: Checkpoint, pairs: Sequence[Pair], settings: FinetuneSettings = REFINE,
             ) -> Generator[FinetuneProgress, None, FinetuneResult]:
    """Fine-tune a copy of `parent` on the corrected slices of `pairs` through the stages of `settings`; yields
    after every step."""
    check_pairs(pairs, parent.card)
    device = resolve_device(settings.device)
    threads = ThreadGovernor() if device.type == "cpu" else None
    with threads or nullcontext():
        run = _Run(parent, pairs, settings, device, threads)
        yield FinetuneProgress(0, settings.steps, None, run.before)
        yield from run.stages()
        result = run.result()
        if not (settings.crosscheck and result.improved and run.split.holdout_slices == 1 and not run.late):
            return result
        check = _Run(parent, pairs, settings, device, threads, avoid=run.split.held, deadline=run.deadline)
        if not check.split.holdout:
            return result
        yield from (replace(p, step=run.step + p.step, total=run.step + p.total) for p in check.stages())
        return crosschecked(result, check.result(), parent)


def crosschecked(result: FinetuneResult, check: FinetuneResult, parent: Checkpoint) -> FinetuneResult:
    """`result` as the cross-check `check` (the same run with another slice held out) leaves it: kept where the
    check beat the parent too, else refused with the parent kept. One held-out slice cannot show a gain that is a
    trade between classes, or chance (docs/training.md#the-verdict)."""
    scores = (check.dice_before, check.dice_after)
    candidate = Checkpoint(result.candidate.model, result.candidate.card.with_provenance(
        crosscheck_dice_before=None if scores[0] is None else round(scores[0], 4),
        crosscheck_dice_after=None if scores[1] is None else round(scores[1], 4), crosscheck_kept=bool(check.improved)))
    return replace(result, crosscheck=scores, improved=bool(check.improved), candidate=candidate,
                   checkpoint=candidate if check.improved else parent)


class _Run:
    """One run's state: the trained copy, its slices, the best held-out state so far and where the run stands."""

    def __init__(self, parent: Checkpoint, pairs: Sequence[Pair], settings: FinetuneSettings, device: torch.device,
                 threads: ThreadGovernor | None, avoid: frozenset[tuple[int, int]] = frozenset(),
                 deadline: float | None = None) -> None:
        self.started = time.monotonic()
        self.deadline = deadline if deadline is not None or settings.minutes is None else \
            self.started + 60.0 * settings.minutes
        self.parent, self.pairs, self.settings, self.device, self.threads = parent, pairs, settings, device, threads
        card = self.card = parent.card
        if threads is not None:
            threads.tick()
        self.n_classes = card.config.num_classes
        self.network = copy.deepcopy(parent.model).to(device).float()
        self.model = calibrated(self.network, card.preprocessing, settings.calibrate).to(device)
        self.fresh = list(card.provenance.get("new_classes") or ()) if settings.task == "add_classes" else []
        first_new = self.n_classes - len(self.fresh)
        self.split = split(pairs, settings, np.random.default_rng(settings.seed), card.preprocessing,
                           first_new if self.fresh else None, avoid)
        self.trained = self.split.trained
        as_input = self.model.input_preprocessing
        self.train_cases = [replace(c, preprocessing=as_input(c.preprocessing)) for c in self.split.train]
        self.held_cases = [Case(f"held-out {k}", h.images, h.labels, preprocessing=as_input(h.prep))
                           for k, h in enumerate(self.split.holdout)]
        self.inferer = SliceInferer(Checkpoint(self.network, card), device=device, precision="fp32",
                                    neighbour_weight=0.0)
        self.uncorrected = [] if settings.task == "new_model" else [          # a new model's labels mean nothing
            Slices(images, prep, self.inferer.segment(images, rgb=self._rgb, preprocessing=prep).labels)
            for images, prep in self.split.uncorrected]
        user = [t.labels for t in self.trained]
        proposed = [self.labels(t) for t in self.trained] if self.fresh or settings.confidence_kept is not None else []
        hosts = new_class_hosts(proposed, user, first_new, self.n_classes) if self.fresh else []
        start_from_hosts(self.network, hosts)
        self.kept = None if settings.confidence_kept is None else kept_dice(proposed, user, first_new)
        self.regulariser: PseudoLabels | PullToParent | None = None
        if settings.protect == "pseudo" and self.uncorrected:
            held = replace(settings, confidence=settings.confidence_kept) if self.kept is not None and \
                self.kept >= KEPT_DICE else settings          # the user kept the parent's labels: hold more of them
            x = torch.cat([network_input(u.images, as_input(u.prep), card.input_size) for u in self.uncorrected])
            self.regulariser = PseudoLabels(self.model, x, held, device, hosts)
        elif settings.protect == "l2sp":
            self.regulariser = PullToParent(self.network, settings.weight, len(self.fresh))
        self.start = copy.deepcopy(self.model.state_dict())
        self.before, self.parent_scores = self.score()
        self.best: _Best | None = None
        self.step, self.total, self.late, self.refitted = 0, 0, False, False
        self.fit: float | None = None
        self.share = 1.0

    @property
    def _rgb(self) -> bool:
        return self.card.preprocessing.kind == "rgb"

    def labels(self, part: Slices) -> np.ndarray:
        """(S, Y, X) the engine's labels with the current state, the calibration folded into the normalisation."""
        return self.inferer.segment(part.images, rgb=self._rgb, preprocessing=self.model.folded(part.prep)).labels

    def score(self) -> tuple[float | None, np.ndarray | None]:
        """The held-out slices' pooled Dice and each slice's own (`slice_scores`); None, None without any."""
        if not self.split.holdout:
            return None, None
        pred, truth = [self.labels(h) for h in self.split.holdout], [h.labels for h in self.split.holdout]
        return pooled_dice(pred, truth, self.n_classes), slice_scores(pred, truth, self.n_classes)

    def _trainer(self, stage: Stage) -> Trainer:
        s = self.settings
        cases = [*self.train_cases, *self.held_cases] if stage.refit else self.train_cases
        cfg = TrainConfig(epochs=None, max_steps=s.steps, batch_size=min(s.batch_size, self.split.train_slices),
                          lr=s.lr, warmup_steps=min(s.warmup_steps, s.steps - 1), optimizer="adamw", weight_decay=0.0,
                          dice_present_only=True, train_parts=s.train_parts, seed=s.seed, sparse=True,
                          augment=AugmentConfig(p_flip=0.0) if s.augment else None)
        head = s.new_class_lr_scale if self.fresh else 1.0
        scales = {"log_scale": s.calibration_lr_scale, "shift": s.calibration_lr_scale, "head.": head,
                  "net.head.": head}
        return Trainer(self.model, self.card, cases, [], cfg, None, device=str(self.device),  # type: ignore[arg-type]
                       regulariser=self.regulariser, threads=self.threads, lr_scales=scales)

    def stages(self) -> Iterator[FinetuneProgress]:
        """Every stage of the run, one after another, until none follows or the time budget ends it."""
        stage: Stage | None = Stage("held", 0)
        while stage is not None:
            yield from self.train(stage)
            stage = None if self.late else self.next_stage(stage)

    def train(self, stage: Stage) -> Iterator[FinetuneProgress]:
        """Run `stage` from the parent's weights, scoring the held-out slices and keeping the best state."""
        self.model.load_state_dict(self.start)
        if self.regulariser is not None:
            self.regulariser.weight = self.settings.weight * stage.share
        self.refitted = stage.refit
        trainer = self._trainer(stage)
        self.total = stage.offset + trainer.total_steps
        for report in trainer.fit():
            if not isinstance(report, StepReport):
                continue
            self.step, dice = stage.offset + report.step, None
            self.late = self.deadline is not None and time.monotonic() > self.deadline
            due = self.step % self.settings.score_every == 0 or self.step == self.total or self.late
            if self.split.holdout and not stage.refit and due:
                dice, scores = self.score()
                if self.best is None or dice > self.best.dice:  # type: ignore[operator]
                    self.best = _Best(dice, self.step, copy.deepcopy(self.model.state_dict()), scores)  # type: ignore[arg-type]
            yield FinetuneProgress(self.step, self.expected_total(), report.loss, dice)
            if self.late:                                               # the budget ends the run
                return

    def expected_total(self) -> int:
        """The steps this run will take: the stages' steps, or, under a time budget, as many as the pace so far
        fits into it (a bar that counts against the budget, not against `steps`)."""
        if self.late:
            return self.step
        if self.deadline is None or self.step == 0:
            return self.total
        pace = self.step / max(time.monotonic() - self.started, 1e-6)
        return min(self.total, max(self.step, round(pace * (self.deadline - self.started))))

    def next_stage(self, done: Stage) -> Stage | None:
        """The stage after `done`: eased where the parent still fits the trained slices poorly under the full
        protection; a refit where the eased stage beat the parent on a single held-out slice; else none."""
        s = self.settings
        if done.name == "held" and self.regulariser is not None and s.adaptive:
            self.fit = pooled_dice([self.labels(t) for t in self.trained], [t.labels for t in self.trained],
                                   self.n_classes)
            self.share = s.protection_share(self.fit)
            return Stage("eased", s.steps, self.share) if self.share < 1.0 else None
        won = self.best is not None and self.best.step > s.steps and self.before is not None and \
            self.best.dice > self.before + s.min_gain
        if done.name == "eased" and s.refit and won and self.split.holdout_slices == 1:
            return Stage("refit", 2 * s.steps, self.share, refit=True)
        return None

    def result(self) -> FinetuneResult:
        """The verdict, and the candidate with its card (the best held-out state, else the last)."""
        refit = self.refitted and self.step == self.total                  # a refit cut by the budget is dropped
        best = self.best
        if best is not None and not refit:
            self.model.load_state_dict(best.state)
        after = None if best is None else best.dice
        best_step = best.step if best is not None and not refit else self.step
        resolution = None if best is None or self.parent_scores is None else \
            resolvable(self.parent_scores, best.scores, self.settings.min_gain)
        self.model.eval()
        changed, unshown = None, []
        if self.uncorrected:
            labels = [self.labels(u) for u in self.uncorrected]
            changed = sum(int((a != u.labels).sum()) for a, u in zip(labels, self.uncorrected)) / \
                sum(u.labels.size for u in self.uncorrected)
            shown = {int(k) for h in [*self.split.holdout, *self.trained] for k in np.unique(h.labels) if k != IGNORE}
            unshown = unshown_changes([u.labels for u in self.uncorrected], labels, shown, self.n_classes)
        improved = None if resolution is None or after is None else \
            bool(after > self.before + resolution) and not unshown  # type: ignore[operator]
        agreement = pair_agreement(self.pairs, self.n_classes)
        new_card = self._card(agreement, refit, best_step, after, changed)
        candidate = Checkpoint(self.network.cpu(), new_card)
        new_model = self.settings.task == "new_model"
        old, new = self.card.preprocessing.describe(), new_card.preprocessing.describe()
        return FinetuneResult(
            checkpoint=candidate if improved or new_model else self.parent, candidate=candidate,
            dice_before=self.before, dice_after=after, improved=improved, best_step=best_step,
            changed_uncorrected=changed, uncorrected_slices=sum(len(u.labels) for u in self.uncorrected),
            train_slices=self.split.train_slices, holdout_slices=self.split.holdout_slices,
            agreement=tuple(agreement), fit=self.fit, protection_share=self.share, refit=refit, new_model=new_model,
            calibration=None if old == new else f"{old} → {new.removeprefix('CT window ').removeprefix('RGB, ')}",
            resolution=resolution, unshown=tuple(self.card.class_names[k] for k in unshown))

    def _card(self, agreement: list[Agreement], refit: bool, best_step: int, after: float | None,
              changed: float | None) -> ModelCard:
        """The candidate's card: the calibration folded in, and the run recorded in its provenance."""
        card, s = self.card, self.settings
        volumes = any(p.labels.ndim == 3 for p in self.pairs)
        weight = card.neighbour_weight if s.neighbour_weight is None or not volumes else s.neighbour_weight
        n_hold = self.split.holdout_slices

        def rounded(x: float | None, digits: int = 4) -> float | None:
            return None if x is None else round(x, digits)

        return replace(card, preprocessing=self.model.folded(card.preprocessing), neighbour_weight=weight
                       ).with_provenance(
            **{PROVENANCE_KEY: as_provenance(merged(history(card.provenance), agreement))},
            parent=str(self.parent.path) if self.parent.path else None, task=s.task,
            finetuned_slices=self.split.train_slices + (n_hold if refit else 0), holdout_slices=n_hold, refit=refit,
            finetune_settings=asdict(s), finetune_best_step=best_step,
            holdout_dice_before=rounded(self.before), holdout_dice_after=rounded(after),
            changed_uncorrected=rounded(changed, 5), trust_fit=rounded(self.fit), protection_share=round(self.share, 4),
            parent_kept=rounded(self.kept),
            pseudo_confidence=self.regulariser.confidence if isinstance(self.regulariser, PseudoLabels) else None,
            untrained=False, new_classes=[], added_classes=[*card.provenance.get("added_classes", []), *self.fresh])


def next_version_path(parent: str | None, folder: str | None = None) -> str:
    """`liver.safetensors` -> `liver-ft1.safetensors` (then -ft2, ...) beside it or in `folder`; never an
    existing file."""
    base = Path(parent) if parent else Path("model.safetensors")
    where = Path(folder) if folder else base.parent
    stem = base.name.removesuffix(".safetensors")
    stem = stem.rsplit("-ft", 1)[0] if "-ft" in stem and stem.rsplit("-ft", 1)[1].isdigit() else stem
    n = 1
    while (where / f"{stem}-ft{n}.safetensors").exists():
        n += 1
    return str(where / f"{stem}-ft{n}.safetensors")
