"""Teaching while the user paints: the `new_model` task run in short rounds on the runner (`training.finetune`),
each round from the last round's model on the slices painted by then, so a slice painted a moment ago is trained
on at the next round (seconds later) and nothing waits for a button. The blocking `daeformer train --image` and this
are one task on one runner; only the length of a run differs (`recipes.TEACH_ROUND`).

`Teaching` is shared between the thread that trains (iterating `rounds()`: one training step per item) and the
thread that shows proposals (`propose`): the painted slices go in with `update`, the latest model comes out as
`checkpoint`. A proposal is computed between two steps, never beside one, so the slice on screen gets the cores.
Plain Python: no Qt, no napari (docs/annotate.md#teach-while-you-paint).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from napari_daeformer.base.errors import TrainingError
from napari_daeformer.engine.inference import SliceInferer
from napari_daeformer.model.checkpoint import Checkpoint, save_or_rescue

from .finetune import finetune
from .losses import IGNORE
from .pairs import Pair
from .recipes import TEACH_ROUND
from .settings import FinetuneSettings

TURN_S = 0.05           # how long a proposal after a proposal leaves a waiting trainer to start its step
ROUND_S = 4.0           # a round's length where steps are slow (512 x 512 slices, a busy CPU): 20 steps of a
#                         128 x 128 chest take 4-5 s on 2 cores; rounds of 10 steps lost 0.01-0.02 Dice at equal steps
MIN_ROUND_STEPS = 5


@dataclass(frozen=True)
class TeachProgress:
    """After one training step: the model version being trained (1 during the first round), the step within the
    round, its loss, the slices it trains on and the seconds trained so far (all rounds)."""

    version: int
    step: int
    steps: int
    loss: float | None
    slices: int
    seconds: float
    published: bool = False           # this step finished a round: `Teaching.version` is now `version`


@dataclass(frozen=True)
class Proposal:
    """The model's labels on some slices: (n, Y, X) `labels` of `slices` (n,), made by model `version`, with each
    slice's mean entropy in nats (`uncertainty`, (n,)) and the seconds it took."""

    slices: np.ndarray
    labels: np.ndarray
    uncertainty: np.ndarray
    version: int
    seconds: float


class Teaching:
    """One teaching session on one image.

    Args:
        image: (S, Y, X) the volume, the slice axis first (the axis the user paints along).
        start: the model to continue from: a new model (`teach.model_for`) or an earlier version.
        settings: one round's run (`recipes.TEACH_ROUND`).
        name: the pair's name in messages.
    """

    def __init__(self, image: np.ndarray, start: Checkpoint, settings: FinetuneSettings = TEACH_ROUND,
                 name: str = "painted slices") -> None:
        if np.asarray(image).ndim != 3:
            raise TrainingError(f"teaching needs a volume (slices, rows, columns); got {np.asarray(image).ndim}D")
        if settings.task != "new_model":
            raise TrainingError("a teaching round is the new-model task (its model is kept whatever it scores)")
        self.image, self.name, self.settings = np.asarray(image), name, settings
        self._model, self.version = start, 0
        self._labels: np.ndarray | None = None
        self._painted = np.zeros(len(self.image), bool)
        self._lock = threading.Condition()
        self._waiting, self._stepping, self._proposing, self._stepped = 0, False, False, True
        self.seconds, self.rounds_done, self.trained_on = 0.0, 0, np.zeros(len(self.image), bool)
        self.steps_done = 0
        self._inferer: tuple[int, SliceInferer] | None = None

    # ---- what the user painted ---------------------------------------------------------------------------
    def update(self, labels: np.ndarray, painted: np.ndarray) -> None:
        """The user's (S, Y, X) labels and the (S,) bool slices they painted (or accepted): the next round trains on
        those slices (a painted slice with no label is "nothing here")."""
        labels, painted = np.asarray(labels), np.asarray(painted, bool)
        if labels.shape != self.image.shape or painted.shape != (len(self.image),):
            raise TrainingError(f"labels {labels.shape} and painted flags {painted.shape} do not fit the image "
                                f"{self.image.shape}")
        with self._lock:
            self._labels, self._painted = np.array(labels, copy=True), painted.copy()

    @property
    def painted(self) -> np.ndarray:
        with self._lock:
            return self._painted.copy()

    def _pair(self) -> Pair | None:
        with self._lock:
            if self._labels is None or not self._painted.any():
                return None
            labels = np.where(self._painted[:, None, None], self._labels, IGNORE).astype(np.uint8)
            return Pair(name=self.name, image=self.image, labels=labels, slices=self._painted.copy())

    # ---- the trainer's side ------------------------------------------------------------------------------
    def rounds(self, idle_s: float = 0.2) -> Generator[TeachProgress, None, None]:
        """Train round after round until closed; one item per step (a round's parent counts as none). With nothing
        painted it waits, yielding every `idle_s`. Closing it mid-round keeps the last finished round's model."""
        while True:
            pair = self._pair()
            if pair is None:
                time.sleep(idle_s)
                yield TeachProgress(self.version, 0, self.settings.steps, None, 0, self.seconds)
                continue
            yield from self._round(pair)

    def round_steps(self) -> int:
        """The next round's steps: `settings.steps`, fewer where steps are slow, so that a round lasts about ROUND_S
        (a slice painted now is trained on within two rounds) but never fewer than MIN_ROUND_STEPS."""
        if not self.steps_done:
            return self.settings.steps
        pace = self.seconds / self.steps_done
        return int(np.clip(ROUND_S / pace, min(MIN_ROUND_STEPS, self.settings.steps), self.settings.steps))

    def _round(self, pair: Pair) -> Iterator[TeachProgress]:
        steps = self.round_steps()
        settings = replace(self.settings, steps=steps, warmup_steps=min(self.settings.warmup_steps, steps - 1))
        job = finetune(self._model, [pair], settings)
        slices = int(pair.slices.sum())
        while True:
            started = time.perf_counter()
            try:
                with self._step():
                    progress = next(job)
            except StopIteration as stop:
                with self._lock:
                    self._model, self.version = stop.value.candidate, self.version + 1
                    self.rounds_done, self.trained_on = self.rounds_done + 1, self.trained_on | pair.slices
                yield TeachProgress(self.version, steps, steps, None, slices, self.seconds, published=True)
                return
            self.seconds += time.perf_counter() - started
            if progress.step:
                self.steps_done += 1
                yield TeachProgress(self.version + 1, progress.step, steps, progress.loss, slices, self.seconds)

    @contextmanager
    def _step(self) -> Iterator[None]:
        """One training step, while no proposal runs; where one waits, only the first step since the last one (the
        two take turns: a proposal waits at most one step, and proposals one after another never starve training)."""
        with self._lock:
            self._lock.wait_for(lambda: not self._proposing and not (self._waiting and self._stepped))
            self._stepping = True
        try:
            yield
        finally:
            with self._lock:
                self._stepping, self._stepped = False, True
                self._lock.notify_all()

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """A proposal's turn on the cores: after the step under way, before the next; after another proposal, once a
        training step has run (or TURN_S has passed without one starting: nothing is training)."""
        with self._lock:
            self._waiting += 1
            self._lock.wait_for(lambda: self._stepping or self._stepped, timeout=TURN_S)   # a trainer takes its turn
            self._lock.wait_for(lambda: not self._stepping and not self._proposing)
            self._waiting, self._proposing = self._waiting - 1, True
        try:
            yield
        finally:
            with self._lock:
                self._proposing, self._stepped = False, False
                self._lock.notify_all()

    # ---- the viewer's side -------------------------------------------------------------------------------
    @property
    def checkpoint(self) -> Checkpoint:
        """The latest round's model (the start before the first round ends)."""
        with self._lock:
            return self._model

    def propose(self, slices: Sequence[int]) -> Proposal:
        """The latest model's labels on `slices`, computed between two training steps."""
        index = np.array(sorted({int(z) for z in slices if 0 <= int(z) < len(self.image)}), int)
        if not len(index):
            raise TrainingError("no slice to propose")
        with self._turn():
            model, version = self.checkpoint, self.version
            started = time.perf_counter()
            if self._inferer is None or self._inferer[0] != version:
                self._inferer = (version, SliceInferer(model, device=self.settings.device, precision="fp32"))
            only = np.zeros(len(self.image), bool)
            only[index] = True
            out = self._inferer[1].segment(self.image, only=only, slice_uncertainty=True)
            return Proposal(index, out.labels[index], np.asarray(out.slice_uncertainty)[index], version,
                            time.perf_counter() - started)

    def suggest(self, proposal: Proposal) -> int | None:
        """Of `proposal`'s slices, the unpainted one where the model is least sure (None: all painted)."""
        open_ = ~self.painted[proposal.slices]
        if not open_.any():
            return None
        return int(proposal.slices[open_][np.argmax(proposal.uncertainty[open_])])

    def save(self, path: Path, overwrite: bool = False) -> Path:
        """The latest model, written atomically with the session's provenance (slices trained on, rounds, seconds)."""
        model = self.checkpoint
        if self.version == 0:
            raise TrainingError("nothing trained yet: paint a slice and let a round finish")
        card = replace(model.card).with_provenance(
            task="new_model", teaching_rounds=self.rounds_done, teaching_seconds=round(self.seconds, 1),
            trained_slices=[int(z) for z in np.flatnonzero(self.trained_on)],
            classes=list(model.card.class_names))
        return save_or_rescue(path, model.model, card, overwrite=overwrite)
