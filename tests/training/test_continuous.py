"""Teaching while the user paints (`training.continuous`): rounds on the runner that pick up each painted slice, a
model that learns, proposals between steps from another thread, a close that keeps the last round, provenance."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from napari_daeformer_training.continuous import Teaching
from napari_daeformer_training.recipes import TEACH_ROUND
from napari_daeformer_training.teach import model_for, teach_pair

from napari_daeformer.base.errors import TrainingError
from napari_daeformer.base.metrics import dice_per_class
from napari_daeformer.io.sample_data import synthetic_chest
from napari_daeformer.model.checkpoint import load_checkpoint

ROUND = replace(TEACH_ROUND, steps=10, device="cpu")
CLASSES = ("background", "lung")


@pytest.fixture(scope="module")
def chest() -> tuple[np.ndarray, np.ndarray]:
    """(12, 96, 96) chest phantom: the image and a lung mask (class 1: both lungs)."""
    s = synthetic_chest(0, shape=(12, 96, 96))
    lungs = np.isin(s.labels, [s.class_names.index(n) for n in s.class_names if "lung" in n]).astype(np.uint8)
    return np.asarray(s.image), lungs


def teaching(image: np.ndarray, truth: np.ndarray, painted: list[int]) -> Teaching:
    done = np.zeros(len(truth), bool)
    done[painted] = True
    start, _ = model_for(teach_pair("t", image, np.where(done[:, None, None], truth, 255)), CLASSES)
    t = Teaching(image, start, ROUND)
    t.update(truth, done)
    return t


def run_rounds(t: Teaching, n: int) -> list:
    out, rounds = [], t.rounds()
    while sum(p.published for p in out) < n:
        out.append(next(rounds))
    rounds.close()
    return out


def test_a_painted_slice_joins_the_next_round_and_the_model_learns(chest) -> None:  # type: ignore[no-untyped-def]
    image, truth = chest
    t = teaching(image, truth, [3])
    before = t.propose([8]).labels[0]
    progress = run_rounds(t, 1)
    assert t.version == 1 and progress[-1].published and progress[-1].slices == 1
    assert t.trained_on.tolist() == [z == 3 for z in range(12)]
    assert [p.step for p in progress[:-1]] == list(range(1, ROUND.steps + 1))       # one item per step, in order
    painted = np.zeros(12, bool)
    painted[[3, 8]] = True
    t.update(truth, painted)                                      # slice 8 painted meanwhile: in the next round
    run_rounds(t, 3)
    assert t.version == 4 and t.trained_on[[3, 8]].all() and t.trained_on.sum() == 2
    after = t.propose([5, 6])
    assert after.version == 4 and after.labels.shape == (2, 96, 96)
    gained = [dice_per_class(p, truth[z], 2)[0] for p, z in zip(after.labels, (5, 6))]
    assert min(gained) > 0.6, gained                              # slices never painted, learnt from two others
    assert dice_per_class(before, truth[8], 2)[0] < min(gained)


def test_closing_mid_round_keeps_the_last_finished_round(chest) -> None:  # type: ignore[no-untyped-def]
    image, truth = chest
    t = teaching(image, truth, [4])
    run_rounds(t, 1)
    kept = t.checkpoint
    rounds = t.rounds()
    for _ in range(4):                                            # into the second round
        next(rounds)
    rounds.close()
    assert t.version == 1 and t.checkpoint is kept


def test_proposals_from_another_thread_between_steps(chest, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import napari_daeformer_training.continuous as continuous

    image, truth = chest
    t = teaching(image, truth, [4, 7])
    stepping_while_proposing = []

    class Watched(continuous.SliceInferer):
        def segment(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            stepping_while_proposing.append(t._stepping)
            return super().segment(*args, **kwargs)

    monkeypatch.setattr(continuous, "SliceInferer", Watched)
    stop = threading.Event()

    def train() -> None:
        rounds = t.rounds()
        while not stop.is_set():
            next(rounds)
        rounds.close()

    trainer = threading.Thread(target=train)
    trainer.start()
    versions = []
    try:
        while t.version < 2 and len(versions) < 500:
            p = t.propose([1, 2])
            assert p.labels.shape == (2, 96, 96)
            versions.append(p.version)
    finally:
        stop.set()
        trainer.join(60)
    assert not trainer.is_alive() and t.version >= 2
    assert versions == sorted(versions) and versions[-1] >= 1      # each proposal from the latest round's model
    assert len(stepping_while_proposing) == len(versions) and not any(stepping_while_proposing)


def test_rounds_shorten_where_steps_are_slow(chest) -> None:  # type: ignore[no-untyped-def]
    from napari_daeformer_training.continuous import MIN_ROUND_STEPS, ROUND_S

    image, truth = chest
    t = Teaching(image, teaching(image, truth, [4]).checkpoint, replace(TEACH_ROUND, device="cpu"))
    assert t.round_steps() == TEACH_ROUND.steps                   # no pace measured yet
    t.steps_done, t.seconds = 10, 10 * ROUND_S / TEACH_ROUND.steps / 2
    assert t.round_steps() == TEACH_ROUND.steps                   # fast steps: full rounds
    t.seconds = 10 * ROUND_S / 8
    assert t.round_steps() == 8                                    # a round lasts about ROUND_S
    t.seconds = 10 * 60.0
    assert t.round_steps() == MIN_ROUND_STEPS


def test_suggest_points_to_the_least_sure_unpainted_slice(chest) -> None:  # type: ignore[no-untyped-def]
    image, truth = chest
    t = teaching(image, truth, [4])
    p = t.propose([2, 4, 9])
    p = replace(p, uncertainty=np.array([0.1, 0.9, 0.5]))       # slice 4 is the least sure but painted
    assert t.suggest(p) == 9
    assert t.suggest(replace(p, slices=np.array([4, 4, 4]))) is None


def test_saved_model_records_the_session_and_refusals(chest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image, truth = chest
    t = teaching(image, truth, [4, 7])
    with pytest.raises(TrainingError, match="nothing trained yet"):
        t.save(tmp_path / "m.safetensors")
    with pytest.raises(TrainingError, match="do not fit the image"):
        t.update(truth[:5], np.ones(5, bool))
    with pytest.raises(TrainingError, match="needs a volume"):
        Teaching(image[0], t.checkpoint, ROUND)
    run_rounds(t, 1)
    path = t.save(tmp_path / "m.safetensors")
    card = load_checkpoint(path).card
    assert card.class_names == CLASSES and card.provenance["trained_slices"] == [4, 7]
    assert card.provenance["teaching_rounds"] == 1 and card.provenance["teaching_seconds"] > 0
