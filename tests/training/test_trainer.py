"""The trainer learns, resumes exactly, and splits by case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from napari_daeformer_training.augment import AugmentConfig
from napari_daeformer_training.sources import split_cases
from napari_daeformer_training.trainer import StepReport, TrainConfig, Trainer, ValReport

from napari_daeformer.base.errors import TrainingError
from napari_daeformer.model import DAEFormer
from napari_daeformer.model.checkpoint import load_checkpoint

from .helpers import SMALL_CT, ct_card, ct_case


@pytest.mark.slow
def test_short_run_lowers_loss_and_raises_dice(tmp_path: Path) -> None:
    """About 20 s on 2 cores: 150 AdamW steps on four 24-slice phantoms, validated on a fifth."""
    torch.manual_seed(0)
    trainer = Trainer(DAEFormer(SMALL_CT), ct_card(), [ct_case(s) for s in (1, 2, 3, 4)], [ct_case(9)],
                      TrainConfig(epochs=100, batch_size=8, max_steps=150, optimizer="adamw", lr=2e-3, val_every=6,
                                  augment=None), tmp_path, device="cpu")
    losses, vals = [], []
    for report in trainer.fit():
        (losses if isinstance(report, StepReport) else vals).append(report)
    first, last = np.mean([r.loss for r in losses[:10]]), np.mean([r.loss for r in losses[-10:]])
    assert last < 0.35 * first, (first, last)
    assert vals[-1].mean_dice > 0.7 and vals[-1].mean_dice > vals[0].mean_dice
    assert all(np.isfinite(vals[-1].hd95))                           # every organ found: HD95 in mm
    best = load_checkpoint(tmp_path / "best.safetensors")
    assert best.card.provenance["val_mean_dice"] == pytest.approx(max(v.mean_dice for v in vals), abs=1e-4)
    assert (tmp_path / "curves.png").stat().st_size > 1000 and (tmp_path / "metrics.jsonl").exists()


def _trainer(out: Path, resume: bool = False) -> Trainer:
    torch.manual_seed(0)
    cases = [ct_case(s, slices=8, side=64) for s in (1, 2)]
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.01, val_every=1, augment=AugmentConfig(p_flip=0.0))
    return Trainer(DAEFormer(SMALL_CT), ct_card(64), cases, [ct_case(5, slices=8, side=64)], cfg, out,
                   device="cpu", resume=resume)


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    torch.use_deterministic_algorithms(True)
    try:
        full = _trainer(tmp_path / "full")
        for _ in full.fit():
            pass
        interrupted = _trainer(tmp_path / "cut")
        for report in interrupted.fit():
            if isinstance(report, ValReport) and report.epoch == 1:
                break                                                # stopped after the first epoch's files
        assert interrupted.step < full.step
        resumed = _trainer(tmp_path / "cut", resume=True)
        assert resumed.step == 4 and resumed.epoch == 1
        for _ in resumed.fit():
            pass
    finally:
        torch.use_deterministic_algorithms(False)
    assert resumed.step == full.step
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    logged = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(logged) == len((tmp_path / "full" / "metrics.jsonl").read_text().splitlines())


def test_split_is_by_case_and_refuses_overlap() -> None:
    cases = [ct_case(s, slices=4, side=32) for s in range(10)]
    train, val, _ = split_cases(cases, 0.2, seed=1)
    assert len(val) == 2 and not {c.name for c in train} & {c.name for c in val}
    assert split_cases(cases, 0.2, seed=1)[1] == val                  # seeded
    train, val, _ = split_cases(cases, 0.2, seed=1, val_names=["ct-3"])
    assert [c.name for c in val] == ["ct-3"]
    with pytest.raises(TrainingError, match="both"):
        Trainer(DAEFormer(SMALL_CT), ct_card(32), cases[:2], cases[1:3], TrainConfig(batch_size=2), "/tmp/x", "cpu")


def test_bad_cases_listed_in_one_message() -> None:
    good = ct_case(1, slices=4, side=32)
    wrong_shape = type(good)("shape", good.image, good.labels[:, :16])
    too_many = type(good)("classes", good.image, good.labels * 3)
    with pytest.raises(TrainingError) as info:
        Trainer(DAEFormer(SMALL_CT), ct_card(32), [good, wrong_shape, too_many], [], TrainConfig(batch_size=2),
                "/tmp/x", "cpu")
    message = str(info.value)
    assert "2 bad training case(s)" in message and "shape:" in message and "classes:" in message


def test_decoder_only_fine_tuning_freezes_the_encoder(tmp_path: Path) -> None:
    model = DAEFormer(SMALL_CT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, ct_card(32), [ct_case(1, slices=8, side=32)], [ct_case(2, slices=4, side=32)],
                      TrainConfig(epochs=1, batch_size=4, max_steps=2, train_parts="decoder", augment=None),
                      tmp_path, device="cpu")
    for _ in trainer.fit():
        pass
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))


def test_no_output_folder_writes_nothing_and_leaves_global_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hooks fine-tuning relies on: no files without an output folder, steps without epochs, the global RNG
    untouched, frozen parameters given back, a regulariser added to the loss, warm-up from a small lr."""
    monkeypatch.chdir(tmp_path)
    model = DAEFormer(SMALL_CT)
    calls: list[int] = []

    def regulariser(net: torch.nn.Module) -> torch.Tensor:
        calls.append(1)
        return sum(p.sum() for p in net.parameters() if p.requires_grad) * 0.0

    torch.manual_seed(123)
    state = torch.get_rng_state()
    trainer = Trainer(model, ct_card(32), [ct_case(1, slices=4, side=32)], [],
                      TrainConfig(epochs=None, max_steps=7, batch_size=2, warmup_steps=4, train_parts="decoder",
                                  augment=AugmentConfig(p_flip=0.0)), None, "cpu", regulariser=regulariser)
    reports = [r for r in trainer.fit() if isinstance(r, StepReport)]
    assert len(reports) == 7 and len(calls) == 7                     # 2 slices an epoch: steps do not stop at epochs
    assert [round(trainer.lr_at(s) / trainer.cfg.lr, 3) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert trainer.lr_at(6) < trainer.cfg.lr
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.requires_grad for p in model.parameters())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TrainingError, match="epochs or max_steps"):
        Trainer(model, ct_card(32), [ct_case(1, slices=4, side=32)], [], TrainConfig(epochs=None, batch_size=2), None)


def test_a_torn_log_line_is_dropped_not_fatal(tmp_path: Path) -> None:
    """A run killed mid-write leaves half a line in metrics.jsonl: the curves and a resume read past it."""
    from napari_daeformer_training.trainer import _truncate_log, plot_curves, read_log

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 0.9}\n{"step": 2, "val_mean_dice": 0.5}\n[1, 2]\n{"step": 3, "lo')
    assert [r["step"] for r in read_log(log)] == [1, 2]
    plot_curves(log, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    _truncate_log(log, 1)
    assert log.read_text() == '{"step": 1, "loss": 0.9}\n'
