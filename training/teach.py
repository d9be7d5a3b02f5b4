"""Teach a model something new from a few annotated slices: a new model for any structure, or new classes on an
existing one. Both then train with the fine-tuning loop (`training.finetune`), which learns only from the annotated
slices (and ignores `IGNORE` voxels inside them).

- `new_model`: a DAE-Former for the user's classes; weights whose shapes fit are taken from a bundled model (the
  encoder and decoder of a model trained on the same kind of image), the head starts fresh.
- `extend_classes`: the same network with more output channels; the old classes' weights are kept, so before any
  training its old logits are bit for bit the parent's, and the new classes are never chosen.
- `intensity_window`: a CT window that suits what was annotated (the abdomen window clips lung and air alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from napari_daeformer.base.errors import TrainingError
from napari_daeformer.model import DAEFormer, named_config
from napari_daeformer.model.bundled import bundled_model
from napari_daeformer.model.checkpoint import DEFAULT_COLORS, Checkpoint, ModelCard, load_checkpoint
from napari_daeformer.model.preprocessing import Preprocessing, ct_preprocessing, rgb_preprocessing, zscore_preprocessing

from .losses import IGNORE
from .pairs import Pair, as_slices

NEW_CLASS_MARGIN = 2.0          # a new class starts as background's output less this: never chosen until learnt
HU_MARGIN = 150.0               # around the annotated structures' intensities
INPUT_SIDES = (128, 160, 192, 224)



def annotated_slices(labels: np.ndarray) -> np.ndarray:
    """(S,) bool: the annotated slices of ([Z,] Y, X) labels. Where IGNORE marks what was not annotated, a slice
    with any other voxel (background included: "nothing here"); otherwise a slice holding any label."""
    stack = (labels[None] if labels.ndim == 2 else labels).reshape(1 if labels.ndim == 2 else len(labels), -1)
    return (stack != IGNORE).any(1) if (stack == IGNORE).any() else (stack != 0).any(1)


def sparse_labels(labels: np.ndarray, ignore_value: int | None, num_classes: int) -> np.ndarray:
    """`labels` as uint8 with `ignore_value` (voxels not annotated) mapped to IGNORE; refused when the value is a
    class or other values exceed the classes."""
    out = np.asarray(labels)
    if ignore_value is not None:
        if 0 <= ignore_value < num_classes:
            raise TrainingError(f"the ignore value {ignore_value} is class {ignore_value}; choose a value outside "
                                f"0..{num_classes - 1}")
        out = np.where(out == ignore_value, IGNORE, out)
    values = np.unique(out[out != IGNORE])
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        bad = [int(v) for v in values if not 0 <= v < num_classes][:5]
        raise TrainingError(f"label value(s) {bad} beyond the {num_classes} classes named (0..{num_classes - 1})")
    return out.astype(np.uint8)


def intensity_window(image: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """A CT window (HU) covering the annotated structures (their 1st..99th percentiles) with a margin."""
    inside = image[(labels != 0) & (labels != IGNORE)]
    if not inside.size:
        raise TrainingError("no annotated voxel: paint the structure on at least one slice")
    lo, hi = np.percentile(inside, [1, 99])
    return float(max(lo - HU_MARGIN, -1024.0)), float(min(hi + HU_MARGIN, 3071.0))


def preprocessing_for(image: np.ndarray, labels: np.ndarray, rgb: bool) -> tuple[Preprocessing, str]:
    """Photos: RGB; Hounsfield units (air below -500): a window from the annotated voxels; otherwise (MR, any
    uncalibrated image) a per-image z-score. With a line saying which was chosen."""
    if rgb:
        return rgb_preprocessing(), "RGB photo normalisation"
    if float(np.min(image)) < -500:
        window = intensity_window(image, labels)
        return ct_preprocessing(window), f"CT window {window[0]:.0f}..{window[1]:.0f} HU, from the annotated voxels"
    return zscore_preprocessing(), "per-image z-score (not Hounsfield units)"


def input_side(shape: tuple[int, ...]) -> int:
    """The smallest network input side of INPUT_SIDES that holds the slice's longer side (224 at most)."""
    return next((s for s in INPUT_SIDES if s >= max(shape)), INPUT_SIDES[-1])


def new_model(class_names: tuple[str, ...], preprocessing: Preprocessing, input_size: int, arch: str = "small",
              start_from: Checkpoint | None = None) -> Checkpoint:
    """A DAE-Former for `class_names` (background first); every weight of `start_from` whose shape fits is copied
    (with the same kind of input: its encoder and decoder), the head starts fresh when the classes differ."""
    if len(class_names) < 2 or class_names[0].lower() != "background" or len(set(class_names)) != len(class_names):
        raise TrainingError(f"classes {', '.join(class_names)}: give distinct names, 'background' first, then at "
                            "least one structure")
    in_channels = 3 if preprocessing.kind == "rgb" else 1
    cfg = named_config(arch, num_classes=len(class_names), in_channels=in_channels)
    torch.manual_seed(0)
    model = DAEFormer(cfg)
    copied = 0
    if start_from is not None and start_from.model.cfg.in_channels == in_channels:
        state = model.state_dict()
        for key, value in start_from.model.state_dict().items():
            if key in state and state[key].shape == value.shape:
                state[key] = value.clone()
                copied += 1
        model.load_state_dict(state)
    provenance = {"data": "the user's annotated slices", "arch": arch, "untrained": True,
                  "started_from": str(start_from.path) if start_from is not None and copied else None}
    card = ModelCard(cfg, tuple(class_names), input_size=(input_size, input_size), preprocessing=preprocessing,
                     provenance=provenance)
    return Checkpoint(model.eval(), card)


def extend_classes(parent: Checkpoint, class_names: tuple[str, ...]) -> Checkpoint:
    """`parent` with the extra classes of `class_names` (which starts with the parent's own): new output channels
    that start as a copy of background's less NEW_CLASS_MARGIN (the parent saw the new structure as background, so
    only the difference is learnt; a fixed low bias was never overcome at fine-tuning's rate: Dice 0 on the spine
    in `benchmarks/bench_sparse.py --add-class`), the old ones untouched."""
    old = parent.card.class_names
    if tuple(class_names[:len(old)]) != tuple(old):
        raise TrainingError(f"the classes must start with the model's own ({', '.join(old)}); got "
                            f"{', '.join(class_names)}")
    if len(class_names) == len(old):
        return parent
    cfg = replace(parent.model.cfg, num_classes=len(class_names))
    model = DAEFormer(cfg)
    state = {k: v.clone() for k, v in parent.model.state_dict().items() if not k.startswith("head.")}
    n = len(old)
    old_weight, old_bias = parent.model.head.weight.detach(), parent.model.head.bias.detach()
    weight = torch.cat([old_weight, old_weight[:1].expand(len(class_names) - n, -1)])
    bias = torch.cat([old_bias, (old_bias[:1] - NEW_CLASS_MARGIN).expand(len(class_names) - n)])
    model.load_state_dict({**state, "head.weight": weight, "head.bias": bias})
    colors = (*parent.card.class_colors, *(DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(n, len(class_names))))
    card = replace(parent.card, config=cfg, class_names=tuple(class_names), class_colors=colors).with_provenance(
        extended_from=str(parent.path) if parent.path else None, new_classes=list(class_names[n:]))
    return Checkpoint(model.eval(), card, parent.path)


def teach_pair(name: str, image: np.ndarray, labels: np.ndarray, slices: np.ndarray | None = None) -> Pair:
    """A pair learning from `slices` (S,) bool, default the slices holding an annotation."""
    chosen = annotated_slices(labels) if slices is None else slices
    if not chosen.any():
        raise TrainingError(f"{name}: no annotated slice (paint the structure on a few slices)")
    return Pair(name=name, image=image, labels=labels, slices=chosen)


def unpainted_classes(pairs: Sequence[Pair], class_names: tuple[str, ...], known: Sequence[str] = ()) -> list[str]:
    """The structures of `class_names` (background excepted) with no voxel on any annotated slice of `pairs`: a
    model cannot learn them (the user should paint each on a slice where it shows). `known`: a parent's own classes,
    left out (it learnt them already: only the classes added beyond them need painting)."""
    painted = np.zeros(len(class_names), bool)
    for pair in pairs:
        _, labels = as_slices(pair)
        values = np.unique(labels[pair.slices])
        painted[values[values < len(class_names)].astype(int)] = True
    return [name for name, seen in zip(class_names[1:], painted[1:]) if not seen and name not in known]


NAMED = 10                                  # classes a warning names before "and N more"


def unpainted_line(names: Sequence[str]) -> str:
    """The warning for `unpainted_classes`, or "" when there are none."""
    if not names:
        return ""
    shown = ", ".join(names[:NAMED]) + (f" and {len(names) - NAMED} more" if len(names) > NAMED else "")
    return (f"painted on no annotated slice: {shown}. A model cannot learn a structure it never saw: "
            "paint each on a slice where it shows")


def model_for(pair: Pair, class_names: tuple[str, ...], arch: str = "small", from_scratch: bool = False
              ) -> tuple[Checkpoint, str]:
    """A new model for `class_names` suited to `pair`'s annotated slices (`preprocessing_for`, `input_side`),
    started from the bundled model of the image kind unless `from_scratch`; with the line naming its intensities."""
    images, labels = as_slices(pair)
    if not pair.slices.any():
        raise TrainingError(f"{pair.name}: no annotated slice (paint the structure on a few slices)")
    rgb = pair.image.ndim == pair.labels.ndim + 1
    prep, said = preprocessing_for(images[pair.slices], labels[pair.slices], rgb)
    start = None if from_scratch else load_checkpoint(bundled_model("skin" if rgb else "ct"))
    return new_model(class_names, prep, input_side(labels.shape[1:3]), arch, start), said


def new_model_path(folder: Path, stem: str) -> Path:
    """`folder/STEM.safetensors`, or STEM-2, -3, ... : never an existing file."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem).strip("_") or "model"
    path, n = folder / f"{safe}.safetensors", 2
    while path.exists():
        path, n = folder / f"{safe}-{n}.safetensors", n + 1
    return path
