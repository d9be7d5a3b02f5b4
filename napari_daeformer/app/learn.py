"""The learning commands on one annotated image: `daeformer train --image` (a new model) and `daeformer finetune`
(a model refined on its corrected slices, or given new classes). Both build their run with
`training.recipes.settings_for` and say what it will do before it starts (`describe`)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from napari_daeformer_training.finetune import finetune
from napari_daeformer_training.pairs import Pair
from napari_daeformer_training.recipes import ADD_CLASS, Overrides, describe, settings_for, task_for
from napari_daeformer_training.settings import DEFAULT_WEIGHTS, PROTECTIONS, FinetuneSettings
from napari_daeformer_training.verdict import FinetuneProgress

from napari_daeformer.app.options import class_list, class_list_text, number, whole
from napari_daeformer.base.atomic import check_output_path
from napari_daeformer.base.errors import TrainingError
from napari_daeformer.base.jobs import drain
from napari_daeformer.io.record import label_values, require_image
from napari_daeformer.model.checkpoint import load_checkpoint


def _shown_on(bar: Any) -> Callable[[FinetuneProgress], None]:
    """A progress callback that moves a tqdm `bar` (its total too: a time-budgeted run's moves with its pace)."""
    def show(progress: FinetuneProgress) -> None:
        bar.total, bar.n = progress.total, progress.step
        bar.set_postfix(loss="-" if progress.loss is None else f"{progress.loss:.4f}",
                        dice="-" if progress.holdout_dice is None else f"{progress.holdout_dice:.3f}", refresh=True)
    return show


def _label_map(image: Any, labels: Any, name: str) -> np.ndarray:
    """The label map's whole-number data (`label_values`), checked to fit the image."""
    data = label_values(labels.data, len(image.spatial_shape), name)
    if data.shape != tuple(image.spatial_shape):
        raise TrainingError(f"{name}: labels {data.shape} do not fit the image {tuple(image.spatial_shape)}")
    return data


def run_teach(args: argparse.Namespace) -> int:
    """A new model for the classes `--classes` from the annotated slices of `--image`: OUT/best.safetensors."""
    from napari_daeformer_training.teach import model_for, sparse_labels, teach_pair, unpainted_classes, unpainted_line
    from tqdm import tqdm

    from napari_daeformer.io import read_image
    from napari_daeformer.io.orientation import radiological
    from napari_daeformer.model.checkpoint import save_or_rescue

    if args.labels is None or not args.classes:
        raise TrainingError("--image needs --labels and --classes (names, background first)")
    if args.data is not None or args.synthetic:
        raise TrainingError("give either --image (one annotated image) or --data/--synthetic, not both")
    names = class_list(args.classes)
    check_output_path(args.out / "best.safetensors", overwrite=args.overwrite)
    image, labels = require_image(radiological(read_image(args.image)), args.image.name), \
        radiological(read_image(args.labels))
    data = sparse_labels(_label_map(image, labels, args.labels.name), args.ignore_value, len(names))
    count = 1 if data.ndim == 2 else data.shape[0]
    pair = teach_pair(args.image.name, image.data, data, slice_list(args.slices, count) if args.slices else None)
    model, said = model_for(pair, names, args.arch, args.from_scratch)
    left = None if args.deadline is None else max(args.deadline - time.monotonic(), 1.0) / 60.0   # None: the recipe's
    settings = settings_for("new_model", Overrides(minutes=left, steps=args.max_steps, device=args.device,
                                                   seed=args.seed, neighbour_weight=args.neighbour_weight))
    print(f"daeformer train: {int(pair.slices.sum())} annotated slices of {args.image.name}; {said}", file=sys.stderr)
    print(f"daeformer train: {describe(settings, int(pair.slices.sum()))}", file=sys.stderr)
    if missing := unpainted_line(unpainted_classes([pair], names)):
        print(f"daeformer train: warning: {missing}", file=sys.stderr)
    bar = None if args.quiet else tqdm(total=settings.steps, unit="step", file=sys.stderr, delay=1)
    result = drain(finetune(model, [pair], settings), None if bar is None else _shown_on(bar))
    if bar is not None:
        bar.close()
    card = result.candidate.card.with_provenance(image=str(args.image), annotated_slices=np.flatnonzero(
        pair.slices).tolist(), trained_steps=result.best_step)
    out = save_or_rescue(args.out / "best.safetensors", result.candidate.model, card, overwrite=args.overwrite)
    scored = ("nothing held out" if result.dice_after is None else
              f"held-out Dice {result.dice_after:.3f} on {result.holdout_slices} slice(s)")
    averaged = (f"; slices segmented with their neighbours' probabilities at {card.neighbour_weight:g} each"
                if card.neighbour_weight else "")
    trained = f"{result.train_slices} slice{'s' * (result.train_slices != 1)} trained on"
    print(f"{trained}, {scored}, best at step {result.best_step}{averaged}; wrote {out}")
    return 0


def slice_list(text: str, count: int) -> np.ndarray:
    """'3,5,10-12' -> (count,) bool."""
    chosen = np.zeros(count, bool)
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        for i in range(int(lo), int(hi or lo) + 1):
            if not 0 <= i < count:
                raise TrainingError(f"--slices: slice {i} outside 0..{count - 1}")
            chosen[i] = True
    return chosen


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    d = FinetuneSettings()
    p.add_argument("--model", required=True, help="checkpoint to start from (never modified), or ct / skin")
    p.add_argument("--image", type=Path, required=True, help="image file or DICOM folder")
    p.add_argument("--labels", type=Path, required=True, help="corrected label map of the same shape")
    p.add_argument("--slices", help="corrected slices along axis 0, e.g. 3,5,10-12 (default: every slice with a label)")
    p.add_argument("--out", type=Path, required=True, help="new checkpoint (.safetensors)")
    p.add_argument("--steps", type=whole(1),
                   help=f"steps held to the parent; as many again with the hold eased where the corrections are still "
                        f"fitted poorly (default: {d.steps}; {ADD_CLASS.steps} when --classes adds classes)")
    p.add_argument("--lr", type=number(0, above_low=True), help=f"AdamW peak learning rate (default: {d.lr})")
    p.add_argument("--warmup", type=whole(0), help=f"linear warm-up steps (default: {d.warmup_steps})")
    p.add_argument("--protect", choices=PROTECTIONS,
                   help="keep the uncorrected slices as the parent had them: pseudo (its confident labels as "
                        f"targets), l2sp (pull the weights towards it) or none (default: {d.protect}; "
                        f"{ADD_CLASS.protect} at weight {ADD_CLASS.protect_weight:g} when --classes adds classes)")
    p.add_argument("--protect-weight", type=number(0),
                   help="strength of the protection (default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_WEIGHTS.items() if v)
                   + ")")
    p.add_argument("--train-parts", choices=("all", "decoder"), help=f"default: {d.train_parts}")
    p.add_argument("--no-augment", action="store_true", help="no augmentation")
    p.add_argument("--no-calibration", action="store_true",
                   help="do not learn an intensity scale and shift (saved as the new CT window or RGB normalisation; "
                        "never learnt when --classes adds classes)")
    p.add_argument("--device", default="auto", help="default: auto")
    p.add_argument("--keep-anyway", action="store_true",
                   help="write OUT even when no step beat the parent on the held-out slices (or none could be held out)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--classes", type=class_list_text, help="class names, background first: the model's own, then any new ones (their "
                   "output channels are added; the old classes are kept)")
    p.add_argument("--ignore-value", type=whole(0, 65535), help="label value meaning 'not annotated': no loss there")


def run_finetune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from napari_daeformer.io import read_image
    from napari_daeformer.io.orientation import radiological
    from napari_daeformer.model.bundled import resolve_model
    from napari_daeformer.model.checkpoint import save_or_rescue

    source = resolve_model(args.model)
    if args.out.suffix != ".safetensors":
        raise TrainingError(f"{args.out}: a checkpoint is written as .safetensors")
    check_output_path(args.out, args.overwrite)
    if args.out.resolve() == source.resolve():
        raise TrainingError(f"{args.out} is the parent checkpoint, which is never replaced; choose a new name")
    from napari_daeformer_training.teach import annotated_slices, extend_classes, sparse_labels, unpainted_classes, unpainted_line

    parent = load_checkpoint(source)
    own = parent.card.class_names
    if args.classes:
        parent = extend_classes(parent, class_list(args.classes))
    image, labels = require_image(radiological(read_image(args.image)), args.image.name), \
        radiological(read_image(args.labels))
    label_data = _label_map(image, labels, args.labels.name)
    if args.ignore_value is not None:
        label_data = sparse_labels(label_data, args.ignore_value, len(parent.card.class_names))
    count = 1 if label_data.ndim == 2 else label_data.shape[0]
    slices = slice_list(args.slices, count) if args.slices else annotated_slices(label_data)   # as train --image
    if not slices.any():
        raise TrainingError(f"{args.labels.name}: no annotated slice (every voxel is 0 or the --ignore-value); "
                            "correct a few slices first")
    pair = Pair(name=args.image.name, image=image.data, labels=label_data, slices=slices)
    if missing := unpainted_line(unpainted_classes([pair], parent.card.class_names, known=own)):
        print(f"daeformer finetune: warning: {missing}", file=sys.stderr)
    task = task_for(False, own, parent.card.class_names)
    settings = settings_for(task, Overrides(
        steps=args.steps, lr=args.lr, warmup_steps=args.warmup, protect=args.protect, protect_weight=args.protect_weight,
        train_parts=args.train_parts, augment=False if args.no_augment else None,
        calibrate=False if args.no_calibration else None, device=args.device))
    print(f"daeformer finetune: {describe(settings, int(slices.sum()))}", file=sys.stderr)
    bar = tqdm(total=settings.steps, unit="step", file=sys.stderr, delay=1)       # no bar around an early error
    result = drain(finetune(parent, [pair], settings), _shown_on(bar))
    bar.close()
    print(f"{result.train_slices} corrected slices trained on, {result.holdout_slices} held out. {result.summary}")
    if result.improved or args.keep_anyway:
        out = save_or_rescue(args.out, result.candidate.model, result.candidate.card, overwrite=args.overwrite)
        print(f"wrote {out}")
    else:
        print(f"nothing written to {args.out} (pass --keep-anyway to write the fine-tuned model)")
    return 0
