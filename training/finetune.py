"""Fine-tuning on the user's corrected slices, never handing back a worse model.

Why the earlier recipe wrecked a good model (`python benchmarks/bench_finetune.py --ablation`): AdamW's first steps at
1e-3 move every weight by about the learning rate whatever its gradient, and on a handful of slices the organs absent
from them are unlearned (the soft Dice of a class absent from the batch stays near 0 however right the model is, and
cross-entropy alone pushes such a class down everywhere). The recipe, chosen by `benchmarks/bench_finetune.py`: a
10-step linear warm-up to 3e-4, Dice over the classes present in the batch, no weight decay towards zero, L2-SP (a
pull of the weights towards the parent's, `PullToParent`), and an input calibration for scanner and camera shifts
(`InputCalibration`: a learnt intensity scale and shift, saved as a moved CT window or RGB normalisation).
`PseudoLabels`, the parent's confident labels on uncorrected slices as extra targets, is the measured alternative
to L2-SP: twice as slow, and weaker under a scanner shift.

The protection is adaptive: after `steps` held to the parent (where the calibration undoes what an affine map
can: an offset, a flatter contrast, a colour cast), the fit to the trained slices says whether the parent was
right. Where it is still poor (a contrast phase moves each organ by its own amount, which no calibration undoes),
a second run starts from the parent with the pull eased (`FinetuneSettings.trust`), the best held-out state of
both kept; a right parent is never let go.

The held-out corrected slices are scored every `score_every` steps, the parent counting as step 0: the parent itself
comes back unless a trained state beats it by `min_gain`. Used by the "Fine-tune DAE-Former" dock widget and by
`daeformer finetune`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_daeformer.agreement import PROVENANCE_KEY, Agreement, as_provenance, history, measure, merged
from napari_daeformer.checkpoint import Checkpoint, ModelCard
from napari_daeformer.devices import resolve_device
from napari_daeformer.errors import TrainingError
from napari_daeformer.inference import SliceInferer
from napari_daeformer.io.record import is_rgb
from napari_daeformer.metrics import dice_per_class
from napari_daeformer.model import DAEFormer
from napari_daeformer.preprocessing import Preprocessing
from napari_daeformer.private_api import foreach_norm, foreach_sub
from napari_daeformer.threads import ThreadGovernor

from .augment import AugmentConfig
from .data import Case, network_input, stray_labels
from .losses import IGNORE
from .trainer import StepReport, TrainConfig, Trainer

PROTECTIONS = ("pseudo", "l2sp", "none")
DEFAULT_WEIGHTS = {"l2sp": 10.0, "pseudo": 1.0, "none": 0.0}     # measured by benchmarks/bench_finetune.py


@dataclass(frozen=True)
class FinetuneSettings:
    """Defaults chosen by benchmarks/bench_finetune.py (a few corrected slices, 2 CPU cores)."""

    steps: int = 100
    lr: float = 3e-4                 # AdamW peak, reached after the warm-up
    warmup_steps: int = 10
    train_parts: str = "all"         # or "decoder"
    augment: bool = True
    batch_size: int = 2              # corrected slices per step
    protect: str = "l2sp"            # what keeps the uncorrected slices as they were: pseudo, l2sp or none
    protect_weight: float | None = None  # l2sp: pull strength; pseudo: weight of the CE on the parent's labels
    #                                  (None: DEFAULT_WEIGHTS for the protection)
    confidence: float = 0.9          # pseudo: parent probability above which its label is a target
    confidence_kept: float | None = None  # pseudo: the threshold instead where the user kept the parent's labels on
    #                                  the corrected slices (`kept_dice` at least KEPT_DICE): its less sure voxels held too
    trust: tuple[float, float] | None = (0.35, 0.55)  # the fit (Dice on the trained slices after `steps`, held
    #                                  to the parent) below which a second run of `steps` starts from the parent
    #                                  with the protection eased, and at which it is gone (in between: scaled by
    #                                  the square of where the fit lies); None: never. The best state of both is kept.
    refit: bool = True               # when the eased second run beat the parent on the one slice held out, train it
    #                                  once more from the parent on every corrected slice, that one included
    protect_slices: int = 32         # uncorrected slices sampled per pair (for protection and the change measure)
    holdout_fraction: float = 0.25   # of the corrected slices, at least one when `holdout_from` or more are (0: none)
    holdout_from: int = 2            # the fewest corrected slices from which some are held out (fewer: all trained on)
    score_every: int = 10            # steps between scorings of the held-out slices
    min_gain: float = 0.001          # held-out Dice gain needed to count as better (bf16/fp32 rounding is below it)
    calibrate: bool = True           # learn a per-channel intensity scale and shift (CT and RGB; see InputCalibration)
    calibration_lr_scale: float = 100.0  # its learning rate, times `lr`
    new_class_lr_scale: float = 30.0  # the output layer's learning rate, times `lr`, while it has classes the parent
    #                                  never learnt (their rows are free of the pull; at 1x the spine stayed at Dice 0)
    device: str = "auto"
    seed: int = 0
    minutes: float | None = None     # stop cleanly after this long (the best state so far is kept)
    neighbour_weight: float | None = None  # the new version's `ModelCard.neighbour_weight` for volumes (None: the
    #                                  parent's)

    @property
    def weight(self) -> float:
        """The protection's full weight in the loss."""
        return DEFAULT_WEIGHTS[self.protect] if self.protect_weight is None else self.protect_weight

    def protecting(self, protect: str, weight: float | None = None) -> FinetuneSettings:
        """These settings with `protect`: at `weight` where given, else at this recipe's weight where it is this
        recipe's protection, else at the protection's default."""
        kept = self.protect_weight if protect == self.protect else None
        return replace(self, protect=protect, protect_weight=kept if weight is None else weight)

    def protection_share(self, fit: float) -> float:
        """The share of the full protection for a model that fits the trained slices at Dice `fit`."""
        if self.trust is None:
            return 1.0
        low, high = self.trust
        return float(np.clip((fit - low) / (high - low), 0.0, 1.0)) ** 2

    def __post_init__(self) -> None:
        if self.protect not in PROTECTIONS:
            raise TrainingError(f"protect must be one of {', '.join(PROTECTIONS)}, got {self.protect!r}")
        if self.steps < 1 or self.batch_size < 1 or self.score_every < 1:
            raise TrainingError("steps, batch size and scoring interval must be at least 1")


# A class added to the head (`teach.extend_classes`), chosen on benchmarks/bench_sparse.py's add-class case (the spine
# on 4 painted slices of the abdominal phantom, seed 31, a one-off script over its functions):
# the parent's confident labels kept on the uncorrected slices
# (the L2-SP pull let the new class take over the aorta: old classes -0.019 at 300 steps, spine 0.77), at 10x weight
# (seeds 31-33, `--add-class [--structure "liver tumour"] --recipe protect_weight=W`: spine 3x old -0.0097 on
# average, worst seed -0.0124; 5x -0.0085, worst -0.0100, spine 0.953; 8x -0.0084, spine 0.943; 10x -0.0071, worst
# -0.0085, spine 0.950; 1x: old -0.012 on seed 31; liver tumour 5x old -0.0146, worst -0.0166, tumour 0.905; 10x
# -0.0098, worst -0.0113, tumour 0.890), twice the steps (100:
# spine 0.92), and no input calibration (it widened the window to separate the new bright class, which moved every
# old organ's contrast: old -0.0115 with it, -0.010 without). Every voxel held (confidence 0, the organs' unsure
# borders too) kept the old classes within 0.005 on every seed (spine -0.0018, tumour -0.0012, worst -0.0040) but
# lowered the tumour (seeds 34-36: 0.786 ± 0.106 against 0.885) and halved the gain on a parent found wrong (--shift
# phase: old +0.10 against +0.24), also when the eased run held only the sure voxels (+0.12): not kept. Holding the
# voxels above 0.7 where the user kept the parent's labels (`kept_dice`; seeds 31-33 / 34-36, Intel Xeon, 1 thread):
# spine old -0.0056 / -0.0046 (worst -0.0067 / -0.0066; at 0.9 -0.0071 / -0.0092, worst -0.0085 / -0.0102), spine
# 0.962 / 0.965; tumour old -0.0044 (worst -0.0076; at 0.9 -0.0097, worst -0.0113), tumour 0.853 against 0.891.
# At 0.7 whatever the parent's labels, a parent found wrong gained less (--shift phase: +0.18 ± 0.07 against +0.24):
# where the user corrected it (phase: `kept_dice` well below KEPT_DICE) the threshold stays 0.9. 20x weight at 0.9
# was worse (spine 31-33 -0.0088, worst -0.0122).
ADD_CLASS = FinetuneSettings(steps=200, protect="pseudo", protect_weight=10.0, confidence_kept=0.7, calibrate=False)


@dataclass(frozen=True)
class Pair:
    """One image with its corrected labels and which slices (along axis 0) to learn from.

    Args:
        name: shown in messages.
        image: ([Z,] Y, X) or (Y, X, 3).
        labels: ([Z,] Y, X) integer.
        slices: (S,) bool, the corrected slices (a 2D image is one slice).
        proposal: the model's own labels before the user corrected them, when known: its agreement with `labels`
            is recorded per model version (`napari_daeformer.agreement`).
        proposed_by, proposed_by_sha256: the checkpoint (file name, hash) that made `proposal`.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    slices: np.ndarray
    proposal: np.ndarray | None = None
    proposed_by: str = ""
    proposed_by_sha256: str = ""


@dataclass(frozen=True)
class FinetuneProgress:
    step: int                            # 0: the parent, scored before training
    total: int
    loss: float | None                   # None at step 0
    holdout_dice: float | None = None    # set on the steps where the held-out slices were scored


@dataclass
class FinetuneResult:
    """What fine-tuning produced.

    `improved` is True when a trained state beat the parent on the held-out corrected slices, False when none
    did, None when nothing was held out (one corrected slice, or fewer than `holdout_from`). `checkpoint` is the
    model to use from now on: the best state when improved, otherwise `parent` itself, unless the parent is a new
    model (`teach.new_model`: untrained, never worth keeping), when it is the candidate. `candidate` is the trained
    model offered by "keep anyway": the best-scoring trained state (the last one when nothing was held out); it is
    `checkpoint` when improved. `dice_after` and `best_step` describe the candidate; `changed_uncorrected` is the share of voxels of
    the (sampled) uncorrected slices whose label the candidate changes against the parent's prediction, None
    without uncorrected slices or when the parent is a new model (`teach.new_model`: its labels mean nothing).
    """

    checkpoint: Checkpoint
    candidate: Checkpoint
    dice_before: float | None
    dice_after: float | None
    improved: bool | None
    best_step: int
    changed_uncorrected: float | None
    uncorrected_slices: int
    train_slices: int
    holdout_slices: int
    agreement: list[Agreement] = field(default_factory=list)   # this run's cases: proposal vs the user's labels
    calibration: str | None = None       # "CT window -125..275 HU -> 10..360 HU" when the candidate's moved
    fit: float | None = None             # Dice on the trained slices after `steps` under the full protection
    protection_share: float = 1.0        # of the protection's full weight in the steps that followed, from `fit`
    refit: bool = False                  # the candidate was trained again on every corrected slice (`FinetuneSettings.refit`)
    new_model: bool = False              # the parent was a new model (`teach.new_model`): the candidate is kept
    resolution: float | None = None      # the smallest held-out gain the evidence can tell from noise (`resolvable`)

    @property
    def unresolved(self) -> bool:
        """The candidate scored higher on the held-out slices, but by less than they can resolve."""
        return self.improved is False and self.resolution is not None and self.dice_after is not None and \
            self.dice_before is not None and self.dice_after > self.dice_before

    @property
    def headline(self) -> str:
        """The verdict in a few words (a notification)."""
        if self.improved is None:
            return "Nothing held out: the gain is unmeasured"
        if self.improved:
            return f"Held-out Dice {self.dice_before:.3f} → {self.dice_after:.3f}"
        if self.unresolved:
            return "No improvement you can rely on: your model is unchanged"
        return "No improvement: your model is unchanged"

    @property
    def summary(self) -> str:
        """The verdict in plain sentences, with what the candidate does to the uncorrected slices."""
        change = ("" if self.changed_uncorrected is None else
                  f"{100 * self.changed_uncorrected:.2f}% of the voxels of {self.uncorrected_slices} uncorrected slices")
        calibration = f" Input calibration: {self.calibration}." if self.calibration else ""
        if self.fit is not None and self.protection_share < 1.0:
            calibration += (f" Held to the starting model it fitted your corrections at only {self.fit:.2f}, so a "
                            f"second run was held at {100 * self.protection_share:.0f}% of the usual strength.")
        if self.refit:
            calibration += (f" Having beaten the starting model, it was trained once more on all "
                            f"{self.train_slices + self.holdout_slices} corrected slices.")
        if self.improved:
            text = f"{self.headline} (best at step {self.best_step})."
            return (f"{text} It changes {change}." if change else text) + calibration
        if self.improved is None and self.new_model:
            return (f"New model trained on all {self.train_slices} annotated slice(s): none held out, so no held-out "
                    f"score. Check its proposal on slices you did not paint.{calibration}")
        if self.improved is None:
            text = f"{self.headline} ({self.train_slices} corrected slice(s), all trained on)."
            tail = f" The fine-tuned model changes {change}." if change else ""
            return f"{text}{tail}{calibration} Keep it only if its re-segmentation looks right."
        if self.unresolved:
            text = (f"{self.headline} (held-out Dice {self.dice_before:.3f} → {self.dice_after:.3f} on "
                    f"{self.holdout_slices} held-out slice(s): a gain below the {self.resolution:.3f} they can tell "
                    f"from chance; correct more slices for a firmer verdict")
        else:
            text = (f"{self.headline} (held-out Dice {self.dice_before:.3f}; the best fine-tuned state scored "
                    f"{self.dice_after:.3f} at step {self.best_step}")
        return (f"{text} and would change {change})." if change else f"{text}).") + calibration


def require_pairs(pairs: Sequence[Pair]) -> None:
    """Refuse an empty list of pairs."""
    if not pairs:
        raise TrainingError("add at least one (image, corrected labels) pair")


def check_pairs(pairs: Sequence[Pair], card: ModelCard) -> None:
    """Refuse unusable pairs with one message naming each problem."""
    problems = []
    rgb = card.preprocessing.kind == "rgb"
    require_pairs(pairs)
    for p in pairs:
        spatial = p.image.shape[:-1] if rgb else p.image.shape
        if rgb != is_rgb(p.image, p.labels):
            problems.append(f"{p.name}: the model expects {'RGB photos' if rgb else 'single-channel images'}")
        elif spatial != p.labels.shape:
            problems.append(f"{p.name}: image {spatial} and labels {p.labels.shape} differ in shape")
        elif stray := stray_labels(p.labels[p.labels != IGNORE], card.config.num_classes):
            problems.append(f"{p.name}: {stray} beyond the model's classes 0..{card.config.num_classes - 1} "
                            f"({', '.join(card.class_names)})")
        elif not p.slices.any():
            problems.append(f"{p.name}: no corrected slices")
        elif empty := [int(j) for j in np.flatnonzero(p.slices) if (_as_slices(p)[1][j] == IGNORE).all()]:
            problems.append(f"{p.name}: slice(s) {', '.join(map(str, empty[:10]))} chosen to learn from hold no "
                            "annotated voxel (all 'not annotated')")
    if problems:
        raise TrainingError("; ".join(problems))


def pair_agreement(pairs: Sequence[Pair], num_classes: int) -> list[Agreement]:
    """How much of the model's proposal the user kept, for each pair that carries its proposal."""
    return [measure(p.name, p.proposed_by or "unknown model", p.proposed_by_sha256, p.proposal, p.labels, num_classes)
            for p in pairs if p.proposal is not None and p.proposal.shape == p.labels.shape]


def _as_slices(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """(S, Y, X[, 3]) images and (S, Y, X) labels; a 2D pair is one slice."""
    return (pair.image[None], pair.labels[None]) if pair.labels.ndim == 2 else (pair.image, pair.labels)


@torch.inference_mode()
def _softmax(model: torch.nn.Module, x: torch.Tensor, device: torch.device, batch: int = 8) -> torch.Tensor:
    """(S, C, H, W) softmax of `model` (in eval mode, its mode restored) on network input `x`: a training target."""
    was_training = model.training
    model.eval()
    probs = [model(x[i:i + batch].to(device)).float().softmax(1).cpu() for i in range(0, len(x), batch)]
    model.train(was_training)
    return torch.cat(probs)


@dataclass
class _Slices:
    """Slices of one pair as the engine sees them: raw, with their normalisation, and the target at source size."""

    images: np.ndarray               # (S, Y, X[, 3]) raw slices
    prep: Preprocessing              # the parent's normalisation of their image
    labels: np.ndarray               # (S, Y, X) target: the user's labels, or the parent's prediction

    @property
    def size(self) -> tuple[int, int]:
        return self.labels.shape[1:3]


MAX_HOLDOUT = 16      # held-out slices at most: scoring them is inside the time budget (10000 slices held out 2500)


def holdout_count(settings: FinetuneSettings, slices: int) -> int:
    """How many of `slices` corrected slices a run holds out and scores (the rest it trains on)."""
    if slices < max(2, settings.holdout_from) or not settings.holdout_fraction:
        return 0
    return min(MAX_HOLDOUT, max(1, round(settings.holdout_fraction * slices)))


def _split(pairs: Sequence[Pair], settings: FinetuneSettings, rng: np.random.Generator, prep: Preprocessing,
           first_new: int | None = None
           ) -> tuple[list[Case], list[tuple[np.ndarray, np.ndarray, Preprocessing]], list[tuple[np.ndarray, Preprocessing]]]:
    """Training cases, held-out (images, labels) per pair, and up to `protect_slices` evenly spaced uncorrected
    images per pair, each with `prep` measured on its whole image (z-score). The held-out share is drawn from the
    corrected slices of all pairs together (photos are one slice each); nothing is held out when only one slice
    is corrected. With classes new to the head (from `first_new` on) it is drawn from the slices holding at least
    a quarter of the most any slice holds of them: on a slice with a sliver of the new class the parent, scored
    against its own labels, cannot be beaten (a liver tumour's 5-voxel tip held out: the trained model, Dice 0.92 on
    the unpainted slices, was judged no better)."""
    chosen = [(i, j) for i, p in enumerate(pairs) for j in np.flatnonzero(p.slices)]
    n_hold = holdout_count(settings, len(chosen))
    pool = chosen
    if first_new is not None:
        stacks = [_as_slices(p)[1] for p in pairs]
        amount = np.array([np.count_nonzero((stacks[i][j] >= first_new) & (stacks[i][j] != IGNORE)) for i, j in chosen])
        pool = [c for c, a in zip(chosen, amount) if a >= amount.max() / 4] if amount.max() > 0 else chosen
        pool = pool if len(pool) >= n_hold else chosen
    held = {pool[k] for k in rng.choice(len(pool), n_hold, replace=False)} if n_hold else set()
    train, holdout, uncorrected = [], [], []
    for i, p in enumerate(pairs):
        images, labels = _as_slices(p)
        fitted = prep.for_image(p.image)
        keep = [j for j in np.flatnonzero(p.slices) if (i, j) not in held]
        hold = sorted(j for j in np.flatnonzero(p.slices) if (i, j) in held)
        if keep:
            flat = p.labels.ndim == 2                                    # a photo or a 2D image: one slice
            train.append(Case(f"{p.name}-train", p.image if flat else images[keep], p.labels if flat else labels[keep],
                              preprocessing=fitted))
        if hold:
            holdout.append((images[hold], labels[hold], fitted))
        rest = np.flatnonzero(~p.slices)
        if len(rest):
            pick = np.linspace(0, len(rest) - 1, min(len(rest), settings.protect_slices)).round().astype(int)
            uncorrected.append((images[rest[np.unique(pick)]], fitted))
    return train, holdout, uncorrected


HOST_SHARE = 0.25     # an old class under at least this share of a new class's painted voxels is its host
KEPT_DICE = 0.9       # the parent's Dice on the corrected slices from which the user is taken to have kept its labels


def new_class_hosts(parent_labels: Sequence[np.ndarray], user_labels: Sequence[np.ndarray], first_new: int,
                    num_classes: int) -> list[tuple[int, int]]:
    """(new class, host) pairs: the old classes the parent gave (at least HOST_SHARE of) the voxels where the user
    painted each new class on the corrected slices (a liver tumour: the liver; the spine: background), each new
    class's hosts from the one holding most of it."""
    parent = np.concatenate([p.ravel() for p in parent_labels])
    user = np.concatenate([u.ravel() for u in user_labels])
    pairs = []
    for new in range(first_new, num_classes):
        under = np.bincount(parent[user == new], minlength=first_new)[:first_new]
        pairs += [(new, int(h)) for h in np.argsort(-under, kind="stable") if under[h] >= HOST_SHARE * max(under.sum(), 1)]
    return pairs


def kept_dice(parent_labels: Sequence[np.ndarray], user_labels: Sequence[np.ndarray], first_new: int) -> float:
    """The parent's mean Dice over its own classes on the corrected slices, the voxels the user gave a new class left
    out: 1 where the user only painted new classes into its proposal, low where the user corrected it."""
    return _pooled_dice(parent_labels, [np.where(u >= first_new, IGNORE, u) for u in user_labels], first_new)


@torch.no_grad()
def start_from_hosts(net: DAEFormer, hosts: Sequence[tuple[int, int]]) -> None:
    """Move each new class's output row (`teach.extend_classes`: background's, less a margin) to its main host's,
    as far below it: a tumour painted inside the liver starts as "liver, less the margin", so only what tells it
    from the liver is learnt (from background's row it stayed at Dice 0 on 2 of 3 seeds in 200 steps,
    `benchmarks/bench_sparse.py --add-class --structure "liver tumour"`). Never chosen before training either way."""
    weight, bias = net.head.weight, net.head.bias
    for new in dict.fromkeys(n for n, _ in hosts):                       # each new class once, its main host first
        host = next(h for n, h in hosts if n == new)
        bias[new] = bias[host] + (bias[new] - bias[0])
        weight[new] = weight[host]


class PseudoLabels:
    """CE on the parent's confident labels of uncorrected slices: a batch of them at every step.

    With classes added to the head, a voxel the parent gave a new class's host (`new_class_hosts`) may now be that
    new class: its target is "host or new class" (the new class's probability added to the host's), as in MiB's
    unbiased distillation (Cermelli et al., CVPR 2020) where the old background holds the new classes. Without
    it, a tumour inside the liver was held to the parent's "liver" on every unpainted slice: Dice 0.12 ± 0.17
    (`benchmarks/bench_sparse.py --add-class --structure "liver tumour"`, seeds 31-33).
    """

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, settings: FinetuneSettings, device: torch.device,
                 hosts: Sequence[tuple[int, int]] = ()) -> None:
        conf, target = _softmax(model, x, device).max(1)
        target[conf < settings.confidence] = -100                  # not confident: no target there
        self.x, self.target, self.hosts = x, target, list(hosts)
        self.batch, self.weight, self.device = settings.batch_size, settings.weight, device
        self.generator = torch.Generator().manual_seed(settings.seed + 1)

    def __call__(self, net: torch.nn.Module) -> torch.Tensor:
        pick = torch.randint(len(self.x), (min(self.batch, len(self.x)),), generator=self.generator)
        logp = net(self.x[pick].to(self.device)).float().log_softmax(1)
        if self.hosts:
            columns = list(logp.unbind(1))
            for new, host in self.hosts:
                columns[host] = torch.logaddexp(columns[host], logp[:, new])
            logp = torch.stack(columns, 1)
        return self.weight * F.nll_loss(logp, self.target[pick].to(self.device), ignore_index=-100)


class InputCalibration(torch.nn.Module):
    """The network behind a learnt intensity scale and shift per input channel, starting as the identity.

    A scanner's HU offset or contrast, or a camera's colour cast, is an affine change of the input: these few
    parameters undo it directly, at a higher learning rate than the network's and outside the pull to the parent,
    while the weights fix what no affine map can. CT is calibrated before the window's clip (an offset moves what the
    window cuts off): the wrapper takes HU in window units, unclipped (`input_preprocessing`), and clips after the
    calibration. `folded` writes the calibration into the preprocessing (CT: a moved and scaled window; RGB: the
    mean and std), so the saved network has the parent's keys and the engine needs nothing new.
    """

    SPAN = 3.0          # CT input: window widths beyond the window on either side (abdomen: -1325..1475 HU)

    def __init__(self, net: DAEFormer, prep: Preprocessing) -> None:
        super().__init__()
        if prep.kind == "zscore":
            raise TrainingError("per-image z-score normalisation has no fixed scale to calibrate")
        self.net, self.window = net, prep.kind == "ct"
        self.log_scale = torch.nn.Parameter(torch.zeros(prep.channels))
        self.shift = torch.nn.Parameter(torch.zeros(prep.channels))
        self.clip = (-prep.mean[0] / prep.std[0], (1 - prep.mean[0]) / prep.std[0])    # the window's ends, normalised

    @property
    def encoder(self) -> torch.nn.ModuleList:
        return self.net.encoder

    def input_preprocessing(self, prep: Preprocessing) -> Preprocessing:
        """What the wrapper's input is normalised with: CT as the network's own inside the window and, unclipped,
        SPAN widths beyond it; RGB as the network's own."""
        if not self.window:
            return prep
        (lo, hi), k, m, s = prep.window, self.SPAN, prep.mean[0], prep.std[0]  # type: ignore[misc]
        return replace(prep, window=(lo - k * (hi - lo), hi + k * (hi - lo)), mean=((k + m) / (2 * k + 1),),
                       std=(s / (2 * k + 1),))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) input as `input_preprocessing` gives it -> (B, classes, H, W) logits."""
        y = x * self.log_scale.exp()[:, None, None] + self.shift[:, None, None]
        return self.net(y.clamp(*self.clip) if self.window else y)

    def folded(self, prep: Preprocessing) -> Preprocessing:
        """`prep` followed by this calibration. RGB: `a (x - m) / s + b == (x - (m - b s / a)) / (s / a)`. CT, in
        window units `u = (x - lo) / w`: the calibration is `u' = a u + c` with `c = m (1 - a) + b s`, clipped to
        [0, 1]: the window `lo' = lo - c w / a`, `w' = w / a`."""
        a, b = self.log_scale.detach().exp().double().tolist(), self.shift.detach().double().tolist()
        if self.window:
            (lo, hi), m, s = prep.window, prep.mean[0], prep.std[0]  # type: ignore[misc]
            c = m * (1 - a[0]) + b[0] * s
            start = lo - c * (hi - lo) / a[0]
            return replace(prep, window=(start, start + (hi - lo) / a[0]))
        std = tuple(s / ai for s, ai in zip(prep.std, a))
        return replace(prep, mean=tuple(m - bi * si for m, bi, si in zip(prep.mean, b, std)), std=std)


class _SquaredDistance(torch.autograd.Function):
    """`sum_i ||p_i - p0_i||^2` over a list of tensors, forward and backward as a few multi-tensor kernels.

    The plain sum of per-tensor terms launched about ten small kernels per parameter tensor and step (forward,
    backward, accumulation): 0.07 s of CPU time per step of `paper` on CUDA, a third of the step.
    """

    @staticmethod
    def forward(ctx, parents: list[torch.Tensor], *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        diffs = foreach_sub(params, parents)
        ctx.save_for_backward(*diffs)
        return torch.stack(foreach_norm(diffs)).float().square().sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        return (None, *torch._foreach_mul(ctx.saved_tensors, 2 * grad))


class PullToParent:
    """L2-SP: `weight / 2 * sum((w - w_parent)^2)` over the trained parameters; the output rows of classes the parent
    never learnt (`free_classes`, the last rows of the head) are not pulled (towards a copy of background, which
    would hold them there: the spine added from 4 slices stayed at Dice 0 under the pull)."""

    def __init__(self, model: DAEFormer, weight: float, free_classes: int = 0) -> None:
        head = {id(model.head.weight), id(model.head.bias)}
        keep = model.head.out_features - free_classes if free_classes else None
        rows = [keep if id(p) in head else None for p in model.parameters()]       # None: the whole tensor
        self.pairs = [(p, p.detach()[:r].clone(), r) for p, r in zip(model.parameters(), rows)]
        self.weight = weight

    def __call__(self, net: torch.nn.Module) -> torch.Tensor:
        trained = [(p if rows is None else p[:rows], p0) for p, p0, rows in self.pairs if p.requires_grad]
        params, parents = [p for p, _ in trained], [p0 for _, p0 in trained]
        return 0.5 * self.weight * _SquaredDistance.apply(parents, *params)


RESOLUTION_Z = 2.0      # a held-out gain counts when it is this many standard errors of the per-slice gains
FEW_SLICES_GAIN = 0.02  # with fewer than 3 held-out slices their spread is unknown: only a gain this large counts
#                         (a good model corrected on 2 or 4 slices "gained" 0.008 and 0.005 on its one held-out
#                         slice and lost 0.010 and 0.001 on the 46 others: docs/training.md#the-verdict)


def _scores(pred: Sequence[np.ndarray], truth: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(n,) the mean foreground Dice of each held-out slice over its annotated voxels (the classes in either map;
    1.0 where there are none)."""
    out = []
    for p_stack, t_stack in zip(pred, truth):
        for p, t in zip(p_stack, t_stack):
            annotated = t != IGNORE
            scores = dice_per_class(p[annotated], t[annotated], num_classes)
            out.append(float(np.nanmean(scores)) if np.isfinite(scores).any() else 1.0)
    return np.array(out)


def resolvable(before: np.ndarray, after: np.ndarray, min_gain: float) -> float:
    """The smallest held-out gain the evidence tells from chance: RESOLUTION_Z standard errors of the per-slice
    gains (each held-out slice one sample), at least `min_gain`; FEW_SLICES_GAIN with fewer than 3 slices."""
    if len(before) < 3:
        return max(FEW_SLICES_GAIN, min_gain)
    diff = after - before
    return max(min_gain, RESOLUTION_Z * float(np.std(diff, ddof=1)) / float(np.sqrt(len(diff))))


def _pooled_dice(pred: Sequence[np.ndarray], truth: Sequence[np.ndarray], num_classes: int) -> float:
    """Mean foreground Dice over classes present in either map, each pooled over all slices."""
    p, t = np.concatenate([p.ravel() for p in pred]), np.concatenate([t.ravel() for t in truth])
    annotated = t != IGNORE
    scores = dice_per_class(p[annotated], t[annotated], num_classes)
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else 1.0


def finetune(parent: Checkpoint, pairs: Sequence[Pair], settings: FinetuneSettings = FinetuneSettings(),
             ) -> Generator[FinetuneProgress, None, FinetuneResult]:
    """Fine-tune a copy of `parent` on the corrected slices of `pairs`; yields after every step.

    Closing the generator (a cancel) leaves `parent` exactly as it was: only the copy is trained.
    """
    check_pairs(pairs, parent.card)
    device = resolve_device(settings.device)
    threads = ThreadGovernor() if device.type == "cpu" else None
    with threads or nullcontext():
        return (yield from _finetune(parent, pairs, settings, device, threads))


def _finetune(parent: Checkpoint, pairs: Sequence[Pair], settings: FinetuneSettings, device: torch.device,
              threads: ThreadGovernor | None) -> Generator[FinetuneProgress, None, FinetuneResult]:
    deadline = None if settings.minutes is None else time.monotonic() + 60.0 * settings.minutes   # the whole run
    card = parent.card
    if threads is not None:
        threads.tick()
    rng = np.random.default_rng(settings.seed)
    size, n_classes = card.input_size, card.config.num_classes
    network = copy.deepcopy(parent.model).to(device).float()
    calibrate = settings.calibrate and card.preprocessing.kind != "zscore"      # z-score: mean/std set per image
    model = InputCalibration(network, card.preprocessing).to(device) if calibrate else network
    fresh = list(card.provenance.get("new_classes") or ())                  # classes added to the head, not yet learnt
    train, holdout_raw, uncorrected_raw = _split(pairs, settings, rng, card.preprocessing,
                                                 n_classes - len(fresh) if fresh else None)
    untrained = bool(card.provenance.get("untrained"))     # a new model's labels are noise: nothing to keep or
    if untrained:                                          # compare, and its trained state is always kept
        uncorrected_raw = []
    trained = [_Slices(c.image[None], c.preprocessing, c.labels[None]) if c.labels.ndim == 2
               else _Slices(c.image, c.preprocessing, c.labels) for c in train]
    if isinstance(model, InputCalibration):
        train = [replace(c, preprocessing=model.input_preprocessing(c.preprocessing)) for c in train]

    inferer = SliceInferer(Checkpoint(network, card), device=device, precision="fp32", neighbour_weight=0.0)
    rgb = card.preprocessing.kind == "rgb"

    def engine_labels(part: _Slices) -> np.ndarray:
        """(S, Y, X) the labels the engine gives with the current state: the network on the input normalised with
        the calibration folded in (exact, where the wrapper clips CT after the resize)."""
        prep = model.folded(part.prep) if isinstance(model, InputCalibration) else part.prep
        return inferer.segment(part.images, rgb=rgb, preprocessing=prep).labels

    holdout = [_Slices(images, prep, labels) for images, labels, prep in holdout_raw]
    uncorrected = [_Slices(images, prep, inferer.segment(images, rgb=rgb, preprocessing=prep).labels)
                   for images, prep in uncorrected_raw]                   # the parent's labels

    def score() -> tuple[float, np.ndarray] | None:
        """The held-out slices' pooled Dice and each slice's own (`_scores`, paired with the parent's)."""
        if not holdout:
            return None
        pred, truth = [engine_labels(h) for h in holdout], [h.labels for h in holdout]
        return _pooled_dice(pred, truth, n_classes), _scores(pred, truth, n_classes)

    first_new = n_classes - len(fresh)
    proposed = [engine_labels(t) for t in trained] if fresh or settings.confidence_kept is not None else []
    hosts = new_class_hosts(proposed, [t.labels for t in trained], first_new, n_classes) if fresh else []
    start_from_hosts(network, hosts)
    kept = None if settings.confidence_kept is None else kept_dice(proposed, [t.labels for t in trained], first_new)
    held = replace(settings, confidence=settings.confidence_kept) if kept is not None and kept >= KEPT_DICE \
        else settings                                           # the user kept the parent's labels: hold more of them
    regulariser: PseudoLabels | PullToParent | None = None
    if settings.protect == "pseudo" and uncorrected:
        as_input = model.input_preprocessing if isinstance(model, InputCalibration) else (lambda p: p)
        x = torch.cat([network_input(u.images, as_input(u.prep), size) for u in uncorrected])
        regulariser = PseudoLabels(model, x, held, device, hosts)
    elif settings.protect == "l2sp":
        regulariser = PullToParent(network, settings.weight, len(fresh))
    n_train = sum(1 if c.labels.ndim == 2 else len(c.labels) for c in train)        # a photo is one slice
    cfg = TrainConfig(epochs=None, max_steps=settings.steps, batch_size=min(settings.batch_size, n_train),
                      lr=settings.lr, warmup_steps=min(settings.warmup_steps, settings.steps - 1), optimizer="adamw",
                      weight_decay=0.0, dice_present_only=True, train_parts=settings.train_parts, seed=settings.seed,
                      sparse=True, augment=AugmentConfig(p_flip=0.0) if settings.augment else None)
    head = settings.new_class_lr_scale if fresh else 1.0
    scales = {"log_scale": settings.calibration_lr_scale, "shift": settings.calibration_lr_scale, "head.": head,
              "net.head.": head}
    judged: list[tuple[float, float]] = []                                # (fit, share) once judged
    refitted: list[bool] = []                                             # [True] once the refit has started
    held_cases = [Case(f"held-out {k}", images, labels, preprocessing=prep)
                  for k, (images, labels, prep) in enumerate(holdout_raw)]
    if isinstance(model, InputCalibration):
        held_cases = [replace(c, preprocessing=model.input_preprocessing(c.preprocessing)) for c in held_cases]
    start = copy.deepcopy(model.state_dict())

    def trainers() -> Iterator[tuple[int, Trainer]]:
        """(steps before it, trainer): `steps` under the full protection; then, where the fit to the trained slices
        is still below `trust`, as many again from the parent with the protection eased to its share; then, where
        that run beat the parent on a single held-out slice (`refit`: up to 5 corrected slices), as many again from
        the parent on every corrected slice. One slice is a poor judge of which state is best but a fair one of
        whether the eased run helps, and with 3 corrected slices it is a third of what there is to learn from; from
        two held-out slices on, their choice of state is kept (with 8, the refit's last state lost 0.10 on one of
        two phase scans)."""
        yield 0, Trainer(model, card, train, [], cfg, None, device=str(device), regulariser=regulariser,
                         threads=threads, lr_scales=scales)
        if regulariser is None or settings.trust is None:
            return
        fit = _pooled_dice([engine_labels(t) for t in trained], [t.labels for t in trained], n_classes)
        judged.append((fit, settings.protection_share(fit)))
        if judged[0][1] < 1.0:                        # a second run from the parent, the protection eased
            model.load_state_dict(start)
            regulariser.weight = settings.weight * judged[0][1]
            yield settings.steps, Trainer(model, card, train, [], cfg, None,
                                          device=str(device), regulariser=regulariser, threads=threads,
                                          lr_scales=scales)
            won = best is not None and best[1] > settings.steps and before is not None and \
                best[0] > before + settings.min_gain
            if settings.refit and won and sum(len(c.labels) for c in held_cases) == 1:
                refitted.append(True)
                model.load_state_dict(start)
                yield 2 * settings.steps, Trainer(model, card, [*train, *held_cases], [], cfg, None,
                                                  device=str(device), regulariser=regulariser, threads=threads,
                                                  lr_scales=scales)

    scored = score()
    before, parent_scores = (None, None) if scored is None else scored
    best: tuple[float, int, dict[str, torch.Tensor], np.ndarray] | None = None   # the best state: Dice, step, weights, scores
    yield FinetuneProgress(0, settings.steps, None, before)
    step, late = 0, False
    for done, trainer in trainers():
        total = done + trainer.total_steps
        for report in trainer.fit():
            if not isinstance(report, StepReport):
                continue
            step, dice = done + report.step, None
            late = deadline is not None and time.monotonic() > deadline
            if holdout and not refitted and (step % settings.score_every == 0 or step == total or late):
                dice, scores = score()  # type: ignore[misc]
                if best is None or dice > best[0]:
                    best = (dice, step, copy.deepcopy(model.state_dict()), scores)
            yield FinetuneProgress(step, step if late else total, report.loss, dice)     # the budget ends the run
            if late:
                break
        if late:
            break
    fit, share = judged[0] if judged else (None, 1.0)
    refit = bool(refitted) and step == total                              # a refit cut by the budget is dropped
    if refit:                                                             # judged by the run it repeats
        after, best_step = best[0], step  # type: ignore[index]
    elif best is not None:
        after, best_step = best[0], best[1]
        model.load_state_dict(best[2])
    else:                                                                     # nothing held out: the last state
        after, best_step = None, step
    resolution = None if best is None or parent_scores is None else resolvable(parent_scores, best[3], settings.min_gain)
    improved = None if resolution is None or after is None else bool(after > before + resolution)  # type: ignore[operator]
    model.eval()
    changed = None
    if uncorrected:
        changed_voxels = sum(int((engine_labels(u) != u.labels).sum()) for u in uncorrected)
        changed = changed_voxels / sum(u.labels.size for u in uncorrected)
    n_hold = sum(len(h.labels) for h in holdout)
    agreement = pair_agreement(pairs, n_classes)
    folded = model.folded(card.preprocessing) if isinstance(model, InputCalibration) else card.preprocessing
    volumes = any(p.labels.ndim == 3 for p in pairs)
    weight = card.neighbour_weight if settings.neighbour_weight is None or not volumes else settings.neighbour_weight
    new_card = replace(card, preprocessing=folded, neighbour_weight=weight).with_provenance(
        **{PROVENANCE_KEY: as_provenance(merged(history(card.provenance), agreement))},
        parent=str(parent.path) if parent.path else None, finetuned_slices=n_train + (n_hold if refit else 0),
        holdout_slices=n_hold, refit=refit,
        finetune_settings=asdict(settings), finetune_best_step=best_step,
        holdout_dice_before=None if before is None else round(before, 4),
        holdout_dice_after=None if after is None else round(after, 4),
        changed_uncorrected=None if changed is None else round(changed, 5),
        trust_fit=None if fit is None else round(fit, 4), protection_share=round(share, 4),
        parent_kept=None if kept is None else round(kept, 4),
        pseudo_confidence=held.confidence if isinstance(regulariser, PseudoLabels) else None,
        untrained=False,
        new_classes=[], added_classes=[*card.provenance.get("added_classes", []), *fresh])
    candidate = Checkpoint(network.cpu(), new_card)
    old, new = card.preprocessing.describe(), folded.describe()
    return FinetuneResult(candidate if improved or untrained else parent, candidate, before, after, improved,
                          best_step, changed, sum(len(u.labels) for u in uncorrected), n_train, n_hold, agreement,
                          None if old == new else f"{old} → {new.removeprefix('CT window ').removeprefix('RGB, ')}",
                          fit, share, refit, untrained, resolution)


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
