"""The paper's loss: 0.4 cross-entropy + 0.6 soft Dice over all classes (background included).

With a handful of slices (fine-tuning) a class absent from the batch keeps a soft Dice near 0 however right the
model is (nothing to overlap, smooth 1e-5), and its gradient teaches the network that the class does not exist:
`present_only` averages the Dice over the classes present in the batch's labels, leaving absent ones to the CE.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Reduce = Callable[[torch.Tensor], torch.Tensor]
IGNORE = 255              # a label value meaning "not annotated": no loss there (Pascal VOC's; nnU-Net's sparse label)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
                   reduce: Reduce | None = None, present_only: bool = False) -> torch.Tensor:
    """1 - mean over classes of the soft Dice, computed over the whole batch.

    Args:
        logits: (B, C, H, W) raw scores.
        target: (B, H, W) integer classes; IGNORE pixels count for nothing.
        reduce: sums the per-class (C,) statistics over processes (a differentiable all-reduce under DDP),
            so that the Dice is that of the global batch, as in a single process.
        present_only: average over the classes present in `target` (of the global batch) only.
    """
    valid = (target != IGNORE)[:, None]
    probs = logits.float().softmax(1) * valid
    onehot = F.one_hot(torch.where(valid[:, 0], target, 0).long(), probs.shape[1]).permute(0, 3, 1, 2)
    onehot = onehot.to(probs.dtype) * valid
    count = onehot.sum((0, 2, 3))
    stats = torch.stack([(probs * onehot).sum((0, 2, 3)),                       # intersection
                         (probs * probs).sum((0, 2, 3)) + count,                # squared denominator (TransUNet)
                         count])
    if reduce is not None:
        stats = reduce(stats)
    inter, denom, count = stats
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1.0 - (dice[count > 0] if present_only else dice).mean()


class DiceCELoss(nn.Module):
    """`ce_weight * CE + dice_weight * soft Dice` (paper: 0.4 and 0.6)."""

    def __init__(self, ce_weight: float = 0.4, dice_weight: float = 0.6, reduce: Reduce | None = None,
                 present_only: bool = False) -> None:
        super().__init__()
        self.ce_weight, self.dice_weight, self.reduce, self.present_only = ce_weight, dice_weight, reduce, present_only

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        if bool((target == IGNORE).all()):                     # nothing annotated in the batch: no gradient
            return logits.float().sum() * 0.0
        ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE)
        if self.dice_weight == 0:
            return self.ce_weight * ce
        return self.ce_weight * ce + self.dice_weight * soft_dice_loss(logits, target, reduce=self.reduce,
                                                                          present_only=self.present_only)
