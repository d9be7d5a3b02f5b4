"""What keeps a run from unlearning what the parent got right on the slices nobody corrected: L2-SP, a pull of the
weights towards the parent's (`PullToParent`), or the parent's confident labels as extra targets (`PseudoLabels`);
and, for classes added to the head, the old class each new one was painted inside (`new_class_hosts`), where it
starts (`start_from_hosts`). Measured in docs/training.md (#fine-tuning-recipe, #a-class-added)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from napari_daeformer.base.private_api import foreach_norm, foreach_sub
from napari_daeformer.model import DAEFormer

from .losses import IGNORE
from .settings import FinetuneSettings
from .verdict import pooled_dice


@torch.inference_mode()
def softmax_of(model: torch.nn.Module, x: torch.Tensor, device: torch.device, batch: int = 8) -> torch.Tensor:
    """(S, C, H, W) softmax of `model` (in eval mode, its mode restored) on network input `x`: a training target."""
    was_training = model.training
    model.eval()
    probs = [model(x[i:i + batch].to(device)).float().softmax(1).cpu() for i in range(0, len(x), batch)]
    model.train(was_training)
    return torch.cat(probs)



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
    return pooled_dice(parent_labels, [np.where(u >= first_new, IGNORE, u) for u in user_labels], first_new)


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
        conf, target = softmax_of(model, x, device).max(1)
        target[conf < settings.confidence] = -100                  # not confident: no target there
        self.x, self.target, self.hosts = x, target, list(hosts)
        self.batch, self.weight, self.device = settings.batch_size, settings.weight, device
        self.confidence = settings.confidence
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
