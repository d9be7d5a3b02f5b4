"""Each slice's softmax averaged with its neighbours' along the slice axis, as the engine streams batches: a
slice's labels are final once its neighbours' softmax has arrived, so only a few slices' probabilities are held
whatever the volume's length.

A 2D model sees one slice; on thick slices (10 mm) a structure's neighbours tell it what a single slice leaves
ambiguous (a spinal cord that a new model from 5 annotated chest slices found at Dice 0.81 reached 0.91 with each
neighbour at 0.3: `benchmarks/bench_sparse.py --neighbours`). The price: a structure found on one slice alone,
between slices sure of background, is erased from a weight of about 0.25. A model's card says whether it wants
this (`ModelCard.neighbour_weight`: a new model taught on a volume, `training.recipes.TEACH`).
"""

from __future__ import annotations

import numpy as np
import torch

from napari_daeformer.model.checkpoint import check_weight


def mixed(p: torch.Tensor, neighbours: list[torch.Tensor], weight: float) -> torch.Tensor:
    """The softmax `p` of a slice (any layout: the engine's is (Y, X, n)) averaged with its neighbours' at `weight`
    each (the slice itself at 1 - 2 * weight); a missing neighbour (the volume's ends) counts as the slice itself."""
    out = p * (1.0 - weight * len(neighbours))
    for q in neighbours:
        out.add_(q, alpha=weight)
    return out


class NeighbourMix:
    """Holds each slice's softmax until its neighbours' have come, then gives its averaged probabilities.

    Args:
        weight: each neighbour's share (`mixed`).
        members: (S,) bool, the slices of the run; a neighbour outside it (not segmented in this run) is left out.
    """

    def __init__(self, weight: float, members: np.ndarray) -> None:
        self.weight, self.members = check_weight(weight), np.asarray(members, bool)
        self.final = np.zeros(len(self.members), bool)
        self.held: dict[int, torch.Tensor] = {}

    def _neighbours(self, z: int) -> list[int]:
        return [y for y in (z - 1, z + 1) if 0 <= y < len(self.members) and self.members[y]]

    def _ready(self, z: int) -> bool:
        return (0 <= z < len(self.members) and not self.final[z] and z in self.held
                and all(y in self.held for y in self._neighbours(z)))

    def add(self, idx: np.ndarray, p: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Take the (b, ...) softmax of slices `idx` (copied: the engine's host buffers are reused); (slice,
        averaged softmax) for each slice that is now final, ascending. A slice's own softmax is let go once it and
        its neighbours are final."""
        for z, pz in zip(idx, p):
            self.held[int(z)] = pz.clone()
        ready = sorted({y for z in idx for y in (int(z) - 1, int(z), int(z) + 1) if self._ready(y)})
        out = [(z, mixed(self.held[z], [self.held[y] for y in self._neighbours(z)], self.weight)) for z in ready]
        self.final[ready] = True
        for y in {y for r in ready for y in (r - 1, r, r + 1)}:
            if y in self.held and self.final[y] and all(self.final[x] for x in self._neighbours(y)):
                del self.held[y]
        return out
