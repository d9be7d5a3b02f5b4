"""A model from a few annotated slices against the annotation tools' baseline, on generated cases as hard as real
scans: Dice on the slices NOT annotated.

    python benchmarks/bench_sparse.py [--threads 2] [--slices 3,5,8] [--cases chest,ct-thick,mr-thick]
        [--seeds 0,1,2] [--minutes 5] [--recipe lr=6e-4,holdout_fraction=0.25,...] [--from-scratch] [--neighbours 0,0.4]
    python benchmarks/bench_sparse.py --add-class [--structure spine|"liver tumour"] [--shift phase] [--threads 2]
        [--slices 4] [--seeds 31,32,33] [--recipe ...]

`--recipe` overrides fields of `TEACH` in `training/recipes.py` (with `--add-class`, of `ADD_CLASS` in
`training/recipes.py`): the candidates the recipes were chosen from.

Cases (each generated from the seed):
- chest: `synthetic_chest`, 34 x 128 x 128 at 10 mm slices averaging what lies in them, a field of view that cuts
  the body, air-filled lungs over diaphragm domes, ribs, vertebrae and discs, 7 structures down to a 1-slice nodule
  that change through the slices as a real chest's do (aortic arch and limbs, the carina, a moving heart, bright
  unlabelled vessels): fill-between-slices scores about 0.64 with 5 slices, where issue 30's real chest CT gave 0.59;
- ct-thick: the abdominal phantom at 6 mm slices (16 x 128 x 128);
- mr-thick: the MR-like volume of the same anatomy (arbitrary units, bias field), 6 mm slices.

For k annotated slices (`--pick cover`, the default: evenly spaced through the slices holding a structure, then
each structure that none of them shows painted on the slice where it is largest, in place of the nearest inner one,
as a user who named the structures would; `--pick even`: evenly spaced only, so that a nodule between them is a
class no method saw):
- interpolation: per-class signed-distance interpolation between the annotated slices, the nearest annotated slice
  copied beyond them (the classic fill-between-slices of annotation tools);
- new model: `daeformer train --image` (`training/teach.py`: the `small` model started from the bundled CT encoder,
  `--minutes` budget), segmenting each slice with its neighbours at the weight its card says (`TEACH`: 0.3);
  `--neighbours W,...` adds rows for the same trained model at other weights (0: each slice alone);
- fine-tuned (ct-thick, mr-thick: the bundled CT model knows those classes): `training/finetune.py` defaults.
The table reports the mean foreground Dice over the classes, pooled over the unannotated slices, as mean ± std over
the seeds (a class on none of those slices counts only where a method predicts it there, as a Dice of 0), the
minutes each took on this CPU, and each class's Dice.

`--add-class`: a structure the bundled CT model does not know, painted on k slices of a held-out abdominal phantom
(48 x 192 x 192, evenly spaced through the slices holding it; only the structure is painted, the rest of those
slices is the model's own proposal, as in the viewer), the head extended (`extend_classes` in `training/teach.py`)
and fine-tuned with `ADD_CLASS` (`training/recipes.py`). `--structure`: the spine (bright bone the model labels
background), or two liver tumours (hypodense, 8-14 mm radius, inside the liver it labels). Reported on the unpainted
slices: the new class's Dice, and the old classes' mean Dice against the parent's (a tumour counted as the liver
it lies in). `--shift`: the scan shifted (`sample_data.shifted`) so that the parent is poor on it, and the painted
slices corrected whole, as a user corrects a bad proposal: the old classes should then improve.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Generator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cpu_name  # noqa: E402
from napari_daeformer_training.finetune import finetune
from napari_daeformer_training.pairs import Pair
from napari_daeformer_training.recipes import ADD_CLASS, TEACH
from napari_daeformer_training.settings import FinetuneSettings
from napari_daeformer_training.teach import extend_classes, input_side, new_model, preprocessing_for, teach_pair
from napari_daeformer_training.verdict import FinetuneProgress, FinetuneResult

from napari_daeformer.base.jobs import drain
from napari_daeformer.base.metrics import dice_per_class
from napari_daeformer.engine.inference import SliceInferer
from napari_daeformer.io.sample_data import (
    CT_CLASSES,
    Sample,
    shifted,
    spine_mask,
    synthetic_chest,
    synthetic_ct,
    synthetic_mr,
    with_liver_lesions,
)
from napari_daeformer.model.bundled import bundled_model  # noqa: E402
from napari_daeformer.model.checkpoint import Checkpoint, load_checkpoint

CASES = ("chest", "ct-thick", "mr-thick")


def make_case(name: str, seed: int) -> Sample:
    if name == "chest":
        return synthetic_chest(seed)
    if name == "ct-thick":
        return synthetic_ct(seed, shape=(16, 128, 128), spacing=(6.0, 1.2, 1.2))
    if name == "mr-thick":
        return synthetic_mr(seed, shape=(16, 128, 128), spacing=(6.0, 1.2, 1.2))
    raise ValueError(f"unknown case {name!r}; choose from {CASES}")


PICKS = ("cover", "even")


def annotated(labels: np.ndarray, k: int, pick: str = "even") -> np.ndarray:
    """k slice indices evenly spaced through the slices holding any structure; `cover`: then each structure on none
    of them painted on the slice where it is largest, in place of the nearest chosen slice (the first and last kept
    where an inner one will do) whose structures all show on another (as a user who named the structures would: no
    method learns one it never saw)."""
    holding = np.flatnonzero(labels.reshape(len(labels), -1).any(1))
    chosen = list(np.unique(holding[np.linspace(0, len(holding) - 1, k).round().astype(int)]))
    if pick == "even":
        return np.array(chosen)
    voxels = np.stack([np.bincount(z.ravel(), minlength=int(labels.max()) + 1) for z in labels])[:, 1:]   # (Z, C)
    areas = voxels > 0
    for c in np.flatnonzero(areas.any(0) & ~areas[chosen].any(0)):
        z = int(np.argmax(voxels[:, c]))
        for drop in sorted(chosen, key=lambda q: (q in (chosen[0], chosen[-1]), abs(q - z), q)):
            kept = [q for q in chosen if q != drop]
            if not (areas[chosen].any(0) & ~areas[kept].any(0)).any():      # nothing else loses its only slice
                chosen = sorted([*kept, z])
                break
    return np.array(chosen)


def _sdf(mask: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) of a 2D mask; +inf-like when empty."""
    if not mask.any():
        return np.full(mask.shape, 1e6, np.float32)
    return (ndimage.distance_transform_edt(~mask) - ndimage.distance_transform_edt(mask)).astype(np.float32)


def interpolate(labels: np.ndarray, chosen: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class signed-distance interpolation between the chosen slices; beyond them, the nearest one."""
    out = np.zeros_like(labels)
    best = np.full(labels.shape, np.inf, np.float32)
    for c in range(1, num_classes):
        sdfs = {int(z): _sdf(labels[z] == c) for z in chosen}
        for z in range(len(labels)):
            below, above = chosen[chosen <= z], chosen[chosen >= z]
            if not len(below) or not len(above):
                d = sdfs[int(chosen[np.argmin(np.abs(chosen - z))])]
            elif below[-1] == above[0]:
                d = sdfs[int(below[-1])]
            else:
                a, b = int(below[-1]), int(above[0])
                t = (z - a) / (b - a)
                d = (1 - t) * sdfs[a] + t * sdfs[b]
            take = (d < 0) & (d < best[z])
            out[z][take], best[z][take] = c, d[take]
    return out


def mean_dice(scores: np.ndarray) -> float:
    """The mean of per-class Dice `scores` over the classes scored (NaN where none was)."""
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")


def score(pred: np.ndarray, truth: np.ndarray, rest: np.ndarray, num_classes: int) -> float:
    return mean_dice(dice_per_class(pred[rest], truth[rest], num_classes))


def _labels(ckpt: Checkpoint, image: np.ndarray) -> np.ndarray:
    return SliceInferer(ckpt, device="cpu", precision="fp32").segment(image).labels


def _trained(job: Generator[FinetuneProgress, None, FinetuneResult]) -> tuple[FinetuneResult, int]:
    """The job's result and the steps it trained."""
    steps = [0]
    result = drain(job, lambda p: steps.append(p.step))
    return result, steps[-1]


def run(case: str, seed: int, k: int, recipe: FinetuneSettings, scratch: bool, weights: tuple[float, ...] = (),
        pick: str = "cover") -> dict[str, tuple[np.ndarray, float, int | None]]:
    """method -> (per-class Dice on unannotated slices (C - 1,), NaN for a class on none of them and predicted on none,
    minutes, training steps or None): a time budget's result depends on how many
    steps this CPU fits in it (the same seed scored 0.717 in 1150 steps and 0.778 in 1548 on one machine)."""
    s = make_case(case, seed)
    n = len(s.class_names)
    chosen = annotated(s.labels, k, pick)
    rest = np.setdiff1d(np.arange(len(s.labels)), chosen)

    def on_rest(pred: np.ndarray) -> np.ndarray:
        return dice_per_class(pred[rest], s.labels[rest], n)

    results: dict[str, tuple[np.ndarray, float, int | None]] = {}
    t = time.perf_counter()
    results["interpolation"] = (on_rest(interpolate(s.labels, chosen, n)),
                                (time.perf_counter() - t) / 60, None)
    sparse = np.full(s.labels.shape, 255, np.uint8)
    sparse[chosen] = s.labels[chosen]
    pair = teach_pair(case, s.image, sparse)
    prep, _ = preprocessing_for(s.image[chosen], s.labels[chosen], False)
    start = load_checkpoint(bundled_model("ct"))
    t = time.perf_counter()
    model = new_model(s.class_names, prep, input_side(s.labels.shape[1:]), "small", None if scratch else start)
    result, steps = _trained(finetune(model, [pair], recipe))
    results["new model"] = (on_rest(_labels(result.candidate, s.image)),
                            (time.perf_counter() - t) / 60, steps)
    for w in weights:                                   # the same trained model, its slices' neighbours averaged in
        labels = SliceInferer(result.candidate, device="cpu", precision="fp32", neighbour_weight=w).segment(s.image).labels
        results[f"new model, neighbours at {w:g}"] = (on_rest(labels), results["new model"][1], steps)
    if s.class_names == CT_CLASSES:
        slices = np.zeros(len(s.labels), bool)
        slices[chosen] = True
        t = time.perf_counter()
        tuned, steps = _trained(finetune(start, [Pair(name=case, image=s.image, labels=s.labels, slices=slices)],
                                         FinetuneSettings(device="cpu")))
        results["fine-tuned"] = (on_rest(_labels(tuned.checkpoint, s.image)),
                                 (time.perf_counter() - t) / 60, steps)
    return results


NEW_STRUCTURES = ("spine", "liver tumour")
# The CT shifts that leave the labels where they were (the new structure's mask stays right): not "spacing" or
# "enlarged", which move them.
LABEL_KEEPING_SHIFTS = ("none", "offset", "contrast", "noise", "phase", "kernel", "lesion")


def new_structure(name: str, seed: int) -> tuple[Sample, np.ndarray, int]:
    """A held-out abdominal phantom, the (Z, Y, X) mask of a structure the bundled CT model does not know, and the
    old class those voxels belong to: the spine (bright bone it calls background), or two liver tumours (hypodense,
    8-14 mm radius, inside the liver: the parent's liver)."""
    if name == "spine":
        s = synthetic_ct(seed)
        return s, spine_mask(s), 0
    if name == "liver tumour":
        s, mask = with_liver_lesions(synthetic_ct(seed), seed, radius_mm=(8.0, 14.0))
        return s, mask, 1
    raise ValueError(f"unknown structure {name!r}; choose from {NEW_STRUCTURES}")


def add_class(seed: int, k: int, recipe: FinetuneSettings, structure: str = "spine", shift: str = "none"
              ) -> dict[str, float]:
    """`structure` added to the bundled CT model from k painted slices: Dice on the unpainted ones. With a
    `shift` (`sample_data.shifted`) the parent is poor on the scan and the painted slices are corrected whole, as a
    user would correct a bad proposal; otherwise only the new structure is painted into the proposal."""
    s, mask, under = new_structure(structure, seed)
    s = shifted(s, shift, seed)
    old = len(CT_CLASSES)
    truth = np.where(mask, old, s.labels).astype(np.uint8)
    parent = load_checkpoint(bundled_model("ct"))
    before = _labels(parent, s.image)
    painted = annotated(mask, k)
    rest = np.setdiff1d(np.arange(len(truth)), painted)
    corrected = before.copy()
    corrected[painted] = truth[painted] if shift != "none" else np.where(mask[painted], old, before[painted])
    slices = np.zeros(len(truth), bool)
    slices[painted] = True
    extended = extend_classes(parent, (*CT_CLASSES, structure))
    t = time.perf_counter()
    result = drain(finetune(extended, [Pair(name=structure, image=s.image, labels=corrected, slices=slices)], recipe))
    minutes = (time.perf_counter() - t) / 60
    after = _labels(result.checkpoint, s.image)
    return {"new class": float(dice_per_class(after[rest], truth[rest], old + 1)[-1]),
            "old, parent": score(before, s.labels, rest, old),
            "old, extended": score(np.where(after == old, under, after), s.labels, rest, old),
            "minutes": minutes, "improved": float(bool(result.improved))}


def _overrides(text: str) -> dict[str, object]:
    """"lr=6e-4,augment=false" -> {"lr": 0.0006, "augment": False}, typed as FinetuneSettings' fields (a field
    whose default is None as a number)."""
    out: dict[str, object] = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        default = getattr(TEACH, key)
        kind = float if default is None else type(default)
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def _per_class(names: tuple[str, ...], per_class: np.ndarray) -> str:
    """'heart 0.87, nodule 0.25 (n=2), ...': each class's mean over the seeds where it was scored."""
    cells = []
    for name, column in zip(names, per_class.T):
        scored = np.isfinite(column)
        seeds = "" if scored.all() else f" (n={int(scored.sum())})"
        cells.append(f"{name} {np.mean(column[scored]):.2f}{seeds}" if scored.any() else f"{name} -")
    return ", ".join(cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--slices", default="3,5,8")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--minutes", type=float, default=TEACH.minutes)
    p.add_argument("--recipe", default="", help="FIELD=VALUE,... overriding TEACH in training/recipes.py (with "
                   "--add-class: ADD_CLASS in training/recipes.py)")
    p.add_argument("--from-scratch", action="store_true", help="the new model not started from the bundled one")
    p.add_argument("--neighbours", default="", help="W,...: also score the new model with each slice's softmax "
                   "averaged with its neighbours' at weight W each instead of its card's (0: each slice alone)")
    p.add_argument("--pick", default="cover", choices=PICKS, help="the annotated slices: evenly spaced, each structure "
                   "then moved onto one where it shows (cover), or evenly spaced only (even)")
    p.add_argument("--add-class", action="store_true", help="a new structure added to the bundled CT model")
    p.add_argument("--structure", default="spine", choices=NEW_STRUCTURES, help="with --add-class: which")
    p.add_argument("--shift", default="none", choices=LABEL_KEEPING_SHIFTS,
                   help="with --add-class: a scan the parent is poor on, the painted slices corrected whole")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.add_class:
        recipe = replace(ADD_CLASS, device="cpu", **_overrides(args.recipe))
        print(f"CPU: {cpu_name()}, {args.threads} threads; the {args.structure} added to the bundled CT model "
              f"(scan shift: {args.shift}), "
              f"the ADD_CLASS recipe {args.recipe}")
        print("| painted slices | new class Dice | per seed | old classes: parent | old classes: extended | old change | "
              "worst seed's change | minutes | verdicts |")
        print("|---|---|---|---|---|---|---|---|---|")
        for k in (int(v) for v in args.slices.split(",")):
            runs = [add_class(int(seed), k, recipe, args.structure, args.shift) for seed in args.seeds.split(",")]
            col = {key: np.array([r[key] for r in runs]) for key in runs[0]}
            change = col["old, extended"] - col["old, parent"]
            cells = [f"{col[key].mean():.3f} ± {col[key].std():.3f}" for key in ("new class", "old, parent", "old, extended")]
            cells.insert(1, " ".join(f"{d:.3f}" for d in col["new class"]))
            print(f"| {k} | {' | '.join(cells)} | {change.mean():+.4f} ± {change.std():.4f} | "
                  f"{change.min():+.4f} | {col['minutes'].mean():.1f} | {int(col['improved'].sum())}/{len(runs)} better |", flush=True)
        return
    recipe = replace(TEACH, minutes=args.minutes, device="cpu", **_overrides(args.recipe))
    print(f"CPU: {cpu_name()}, {args.threads} threads; new model: {args.minutes:g} min budget, "
          f"{'from scratch' if args.from_scratch else 'from the bundled CT model'}, {args.recipe or 'TEACH'}, "
          f"slices picked: {args.pick}")
    print("| case | k | method | Dice on unannotated slices (mean ± std over seeds) | per seed | minutes | steps | "
          "per class (mean over seeds) |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        for k in (int(v) for v in args.slices.split(",")):
            weights = tuple(float(w) for w in filter(None, args.neighbours.split(",")))
            runs = [run(case, int(seed), k, recipe, args.from_scratch, weights, args.pick)
                    for seed in args.seeds.split(",")]
            names = make_case(case, 0).class_names[1:]
            for method in runs[0]:
                per_class = np.array([r[method][0] for r in runs])                       # (seeds, C - 1)
                dice = np.array([mean_dice(d) for d in per_class])
                mins = np.array([r[method][1] for r in runs])
                steps = " ".join("-" if r[method][2] is None else str(r[method][2]) for r in runs)
                print(f"| {case} | {k} | {method} | {np.nanmean(dice):.3f} ± {np.nanstd(dice):.3f} "
                      f"(n={len(runs)}) | {' '.join(f'{d:.3f}' for d in dice)} | {mins.mean():.1f} | {steps} | "
                      f"{_per_class(names, per_class)} |", flush=True)


if __name__ == "__main__":
    main()
