"""Is the model good enough yet: how much of each proposal the user kept, per model version.

For every case a user corrected, an `Agreement` records the Dice between the model's proposal and the user's final
labels and the share of slices the user had to change, with the checkpoint that made the proposal. Fine-tuning
writes them into the new checkpoint's provenance (`agreement`), after the parent's own, so a checkpoint carries the
history of its whole lineage; `by_version` summarises it for a plot: when agreement stops rising and few slices
need changing, corrections have stopped being needed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from napari_daeformer.base.metrics import dice_per_class
from napari_daeformer.session.annotation import changed_slices

PROVENANCE_KEY = "agreement"


@dataclass(frozen=True)
class Agreement:
    case: str                 # the image, as the user named it
    model: str                # file name of the checkpoint that made the proposal
    model_sha256: str         # its hash ("" when unknown): names the version when a file is overwritten
    dice: float               # mean Dice over the classes present in the proposal or the final labels
    slices_changed: float     # share of the case's slices (axis 0) where the user changed anything
    slices: int

    @property
    def version(self) -> str:
        """The model version as plotted: its file name (with a short hash when known)."""
        return f"{self.model} ({self.model_sha256[:8]})" if self.model_sha256 else self.model


def measure(case: str, model: str, model_sha256: str, proposal: np.ndarray, final: np.ndarray,
            num_classes: int) -> Agreement:
    """Agreement of `final` ([Z,] Y, X) labels with the model's `proposal` (same shape)."""
    scores = dice_per_class(final, proposal, num_classes)
    dice = float(np.nanmean(scores)) if np.isfinite(scores).any() else 1.0       # both empty: full agreement
    changed = changed_slices(final, proposal, 0)
    return Agreement(case, model, model_sha256, round(dice, 5), round(float(changed.mean()), 5), len(changed))


def history(provenance: dict[str, Any]) -> list[Agreement]:
    """The agreement records a checkpoint carries (its lineage's, oldest first); malformed entries are skipped."""
    records = []
    for item in provenance.get(PROVENANCE_KEY, []) or []:
        try:
            records.append(Agreement(str(item["case"]), str(item["model"]), str(item.get("model_sha256", "")),
                                     float(item["dice"]), float(item["slices_changed"]), int(item["slices"])))
        except (KeyError, TypeError, ValueError):
            continue
    return records


def merged(old: list[Agreement], new: list[Agreement]) -> list[Agreement]:
    """`old` then `new`; a case measured again on the same model version keeps its latest measure."""
    latest = {(r.case, r.model, r.model_sha256): r for r in [*old, *new]}
    return list(latest.values())


def as_provenance(records: list[Agreement]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]


@dataclass(frozen=True)
class VersionAgreement:
    version: str
    dice: float               # mean over the cases corrected on this version's proposals
    slices_changed: float
    cases: int


def by_version(records: list[Agreement]) -> list[VersionAgreement]:
    """Mean agreement per model version, in the order versions first appear (the lineage's order)."""
    groups: dict[str, list[Agreement]] = {}
    for r in records:
        groups.setdefault(r.version, []).append(r)
    return [VersionAgreement(v, float(np.mean([r.dice for r in rs])), float(np.mean([r.slices_changed for r in rs])),
                             len(rs)) for v, rs in groups.items()]
