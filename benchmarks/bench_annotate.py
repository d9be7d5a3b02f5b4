"""A simulated annotator finishing a whole volume: how much painting and waiting each tool costs the user's real job.

Usage:
    python benchmarks/bench_annotate.py [--cases chest,lesion,ct-thick,mr-thick,ct-512] [--seeds 0,1,2]
        [--arms paint,fill,model,teach,teach-model] [--k 5] [--threads 2] [--max-train-minutes 5] [--max-teach-minutes M]
        [--curves OUT.csv]
    python benchmarks/bench_annotate.py --image scan.nii.gz --labels truth.nii.gz      # your own volume

The robot user starts from nothing. It paints K slices (evenly spaced through the slices holding a structure),
the tool proposes every other slice, and the robot then visits the remaining slices in order, correcting each
proposal to the ground truth. After every slice it finishes, the volume is scored: the whole-volume Dice (mean over
the classes in the truth, each pooled over the volume) of the corrected slices plus the tool's proposal elsewhere.
The effort is counted as slices edited, voxels changed and simulated seconds (the time model below); the table
gives the effort to reach Dice 0.90 and 0.95 and to finish.

Arms (the way interactive-segmentation work scores tools: RootPainter's simulated annotator, the SEGFM3D protocol's
rounds of corrections; here a correction is a whole slice made right):
- `paint`: every slice painted from nothing (the proposal is empty).
- `fill`: K slices painted, *fill between slices* (`session.fill`, ITK's morphological contour interpolation:
  3D Slicer's algorithm) proposes the slices between; slices beyond the painted range are painted from nothing.
- `model`: K slices painted, a new model (`training.recipes.TEACH`) trained for as long as the robot spent painting
  them (the CPU time the user just spent, at most `--max-train-minutes`, on the same `--threads`), its proposal
  everywhere else.
- `teach`: teaching while the robot paints (`training.continuous`): the first of the K slices painted from
  nothing, then every slice the robot visits (the other K first, then the rest in order) shows the latest model's
  proposal, which the robot corrects; after each slice the trainer runs for as long as the robot spent on it (CPU
  time: the robot's seconds times `--threads`), and the seconds to compute the slice's proposal are waiting.
  Each slice shows the model's proposal or fill between slices' (the interpolation of the nearest painted slices,
  nothing beyond them), whichever needed fewer changes on the last slices the robot finished
  (`training.choice`: the Teach dock's rule).
- `teach-model`: the same with the model's proposal on every slice (the Teach dock before the choice).

The time model (its numbers are chosen, not measured: set them with `--visit-s`, `--region-s`, `--outline-s`;
compare arms within one run, not the seconds across models): visiting a slice to look at it and accept it costs
`visit_s` (2 s: scroll there, look); each connected region the robot must change costs `region_s` (3 s: pick the
label, start a stroke) plus `outline_s` (0.05 s, a brush traced at ~20 pixels a second) per pixel of the region's
outline (its pixels with a neighbour outside it); where that costs more than clearing the slice (one region) and
painting it from nothing, the robot does that. Painting from nothing is correcting an empty proposal. The model's
training time is waiting, added to the effort.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cpu_name  # noqa: E402
from bench_sparse import annotated  # noqa: E402
from napari_daeformer_training.recipes import TEACH_ROUND  # noqa: E402

from napari_daeformer.base.jobs import drain  # noqa: E402
from napari_daeformer.base.metrics import dice_per_class  # noqa: E402
from napari_daeformer.engine.inference import SliceInferer  # noqa: E402
from napari_daeformer.io.sample_data import Sample, synthetic_chest, synthetic_ct, synthetic_mr, with_liver_lesions  # noqa: E402
from napari_daeformer.session.fill import fill_between  # noqa: E402

CASES = ("chest", "lesion", "ct-thick", "mr-thick", "ct-512")
ARMS = ("paint", "fill", "model", "teach", "teach-model")
THRESHOLDS = (0.90, 0.95)


@dataclass(frozen=True, kw_only=True)
class TimeModel:
    """Simulated seconds of the robot's work (module docstring)."""

    visit_s: float = 2.0
    region_s: float = 3.0
    outline_s: float = 0.05

    def correction(self, proposal: np.ndarray, truth: np.ndarray) -> tuple[float, int]:
        """(seconds, voxels changed) to make one (Y, X) slice's `proposal` into `truth`: the cheaper of correcting
        it and clearing it (one region's cost) to paint it from nothing."""
        wrong = proposal != truth
        if not wrong.any():
            return self.visit_s, 0
        seconds = self._strokes(wrong, truth)
        if proposal.any():
            seconds = min(seconds, self.region_s + self._strokes(truth != 0, truth))
        return self.visit_s + seconds, int(wrong.sum())

    def _strokes(self, wrong: np.ndarray, truth: np.ndarray) -> float:
        """Seconds to paint each value of `truth` over the `wrong` pixels: per connected region and outline pixel."""
        regions = 0
        outline = 0
        for value in np.unique(truth[wrong]):                # each value painted where it belongs
            mask = wrong & (truth == value)
            _, n = ndimage.label(mask, structure=np.ones((3, 3)))
            regions += n
            outline += int((mask & ~ndimage.binary_erosion(mask)).sum())
        return self.region_s * regions + self.outline_s * outline


@dataclass(kw_only=True)
class Curve:
    """One arm's run: after each step, the effort so far and the whole-volume Dice."""

    seconds: list[float] = field(default_factory=list)
    dice: list[float] = field(default_factory=list)
    edited: int = 0                   # slices whose proposal the robot changed
    voxels: int = 0                   # voxels it changed
    waited: float = 0.0               # seconds waiting for the tool (training)

    @property
    def now(self) -> float:
        """The simulated seconds so far."""
        return self.seconds[-1] if self.seconds else 0.0

    def record(self, seconds: float, dice: float) -> None:
        self.seconds.append(seconds)
        self.dice.append(dice)

    def effort_to(self, threshold: float) -> float | None:
        """The simulated seconds at which the volume first reached `threshold` (None: never)."""
        return next((s for s, d in zip(self.seconds, self.dice) if d >= threshold - 1e-9), None)


def volume_dice(labels: np.ndarray, truth: np.ndarray) -> float:
    """Mean over the classes in `truth` of each class's Dice pooled over the volume (1.0 for an empty truth)."""
    present = np.unique(truth[truth != 0])
    if not present.size:
        return 1.0
    n = int(max(present.max(), labels.max())) + 1
    return float(np.mean(dice_per_class(labels, truth, n)[present - 1]))


def painted_slices(truth: np.ndarray, k: int) -> np.ndarray:
    """k slice indices evenly spaced through the slices holding a structure (all of them when fewer): the slices
    `bench_sparse.py` paints (`annotated`, evenly spaced)."""
    return annotated(truth, k, "even")


Proposer = Callable[[np.ndarray, np.ndarray, float], tuple[np.ndarray, float]]   # (state, painted, seconds) ->
#                                                                                   (proposal, seconds waited)


def simulate(truth: np.ndarray, painted: np.ndarray, propose: Proposer | None, time_model: TimeModel) -> Curve:
    """The robot paints `painted` slices from nothing, takes the tool's proposal (`propose`; None: nothing proposed)
    and corrects every other slice in order; the curve of effort against whole-volume Dice."""
    curve = Curve()
    state = np.zeros_like(truth)
    done = np.zeros(len(truth), bool)

    def finish(z: int) -> None:
        """The robot makes slice `z` right."""
        cost, voxels = time_model.correction(state[z], truth[z])
        curve.edited += voxels > 0
        curve.voxels += voxels
        state[z], done[z] = truth[z], True
        curve.record(curve.now + cost, volume_dice(state, truth))

    for z in painted:
        finish(z)
    if propose is not None and len(painted):
        proposal, curve.waited = propose(state.copy(), done.copy(), curve.now)
        state[~done] = proposal[~done]
        curve.record(curve.now + curve.waited, volume_dice(state, truth))
    for z in np.flatnonzero(~done):
        finish(z)
    return curve


def fill_proposer(state: np.ndarray, done: np.ndarray, seconds: float) -> tuple[np.ndarray, float]:
    """Fill between slices: the slices between the painted ones interpolated, the others left empty."""
    if done.sum() < 2 or not state[done].any():
        return state, 0.0
    return fill_between(state, done), 0.0


def model_proposer(image: np.ndarray, class_names: tuple[str, ...], threads: int, max_minutes: float
                   ) -> Proposer:
    """A new model (`TEACH`) trained on the painted slices for as long as the robot painted them (at most
    `max_minutes`): its proposal on every slice, the seconds trained."""
    from napari_daeformer_training.finetune import finetune
    from napari_daeformer_training.recipes import TEACH
    from napari_daeformer_training.teach import model_for, teach_pair

    def propose(state: np.ndarray, done: np.ndarray, seconds: float) -> tuple[np.ndarray, float]:
        torch.set_num_threads(threads)
        labels = np.where(done[:, None, None], state, 255).astype(np.uint8)
        pair = teach_pair("case", image, labels)
        model, _ = model_for(pair, class_names)
        minutes = min(seconds / 60.0, max_minutes)
        t = time.perf_counter()
        result = drain(finetune(model, [pair], replace(TEACH, minutes=minutes, device="cpu")))
        proposal = SliceInferer(result.candidate, device="cpu", precision="fp32").segment(image).labels
        return proposal, time.perf_counter() - t

    return propose


def simulate_teaching(image: np.ndarray, truth: np.ndarray, painted: np.ndarray, class_names: tuple[str, ...],
                      time_model: TimeModel, threads: int, max_minutes: float | None, choose: bool = True) -> Curve:
    """The robot paints `painted[0]` from nothing, then visits `painted[1:]` and the other slices in order, each
    showing the latest model's proposal; the trainer gets the CPU time of the seconds the robot spent on each slice
    on `threads` cores (process time: what other processes take from the machine is not counted as training). After
    each slice the volume is scored with the latest model's proposal on every slice not finished. Training stops
    once it has had `max_minutes` of the robot's time in all (None: never; a cap for quick runs). With `choose`,
    each slice shows the model's proposal or fill between slices' as `choice.ProposalChoice` picks (the Teach
    dock's rule); without, the model's always."""
    from napari_daeformer_training.choice import ProposalChoice, fill_slices
    from napari_daeformer_training.continuous import Teaching
    from napari_daeformer_training.teach import model_for, teach_pair

    curve, choice = Curve(), ProposalChoice()
    state, done = np.zeros_like(truth), np.zeros(len(truth), bool)
    order = [*painted, *(z for z in range(len(truth)) if z not in set(painted.tolist()))]
    teaching, rounds, trained = None, None, 0.0
    for z in order:
        waited = 0.0
        if teaching is not None:
            proposal = teaching.propose([z])
            waited = proposal.seconds
            filled = fill_slices(state, done, np.array([z]))[0]
            state[z] = filled if choose and choice.source == "fill" else proposal.labels[0]
            choice.learn(proposal.labels[0], filled, truth[z])
        cost, voxels = time_model.correction(state[z], truth[z])
        curve.edited += voxels > 0
        curve.voxels += voxels
        state[z], done[z] = truth[z], True
        if teaching is None:
            start, _ = model_for(teach_pair("case", image, np.where(done[:, None, None], truth, 255)), class_names)
            teaching = Teaching(image, start, replace(TEACH_ROUND, device="cpu"))
            rounds = teaching.rounds()
        teaching.update(state, done)
        budget = cost if max_minutes is None else min(cost, 60.0 * max_minutes - trained)   # within any cap
        trained += max(budget, 0.0)
        until = time.process_time() + budget * threads           # the CPU the user's seconds give, on `threads`
        while time.process_time() < until:
            next(rounds)
        curve.waited += waited
        if done.all():
            score = volume_dice(state, truth)
        elif choose and choice.source == "fill":
            score = volume_dice(fill_proposer(np.where(done[:, None, None], state, 0), done, 0.0)[0], truth)
        else:
            rest = teaching.propose(np.flatnonzero(~done))
            shown = state.copy()
            shown[rest.slices] = rest.labels
            score = volume_dice(shown, truth)
        curve.record(curve.now + cost + waited, score)
    rounds.close()
    return curve


def make_case(name: str, seed: int) -> Sample:
    """The generated cases, as hard as real scans: the chest at 10 mm (cut field of view, 7 structures, a nodule on
    1-2 slices), two liver tumours inside the liver of the abdominal phantom (the lesion on a few slices, the liver
    class left out), the abdomen and an MR-like volume at 6 mm, and the abdomen at 512 x 512."""
    if name == "chest":
        return synthetic_chest(seed)
    if name == "lesion":
        ct = synthetic_ct(seed, shape=(32, 160, 160), spacing=(4.0, 1.0, 1.0))
        sample, mask = with_liver_lesions(ct, seed, radius_mm=(6.0, 10.0))
        return replace(sample, labels=mask.astype(np.uint8), class_names=("background", "lesion"))
    if name == "ct-thick":
        return synthetic_ct(seed, shape=(16, 128, 128), spacing=(6.0, 1.2, 1.2))
    if name == "mr-thick":
        return synthetic_mr(seed, shape=(16, 128, 128), spacing=(6.0, 1.2, 1.2))
    if name == "ct-512":
        return synthetic_ct(seed, shape=(24, 512, 512), spacing=(5.0, 0.7, 0.7))
    raise ValueError(f"unknown case {name!r}; choose from {', '.join(CASES)}")


def run_arm(arm: str, sample: Sample, k: int, time_model: TimeModel, threads: int, max_minutes: float,
            teach_minutes: float | None = None) -> Curve:
    truth = np.asarray(sample.labels)
    if arm == "paint":
        return simulate(truth, np.arange(0), None, time_model)
    painted = painted_slices(truth, k)
    if arm == "fill":
        return simulate(truth, painted, fill_proposer, time_model)
    if arm == "model":
        proposer = model_proposer(np.asarray(sample.image), tuple(sample.class_names), threads, max_minutes)
        return simulate(truth, painted, proposer, time_model)
    if arm in ("teach", "teach-model"):
        return simulate_teaching(np.asarray(sample.image), truth, painted, tuple(sample.class_names), time_model,
                                 threads, teach_minutes, choose=arm == "teach")
    raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")


def _spread(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "never"
    text = f"{np.mean(known):.0f} ± {np.std(known):.0f}" if len(known) > 1 else f"{known[0]:.0f}"
    return text + (f" ({len(values) - len(known)} never)" if len(known) < len(values) else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="chest,lesion")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--k", type=int, default=5, help="slices painted before the tool proposes (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-train-minutes", type=float, default=5.0)
    p.add_argument("--max-teach-minutes", type=float, help="the teach arm's training cap (default: none)")
    p.add_argument("--visit-s", type=float, default=TimeModel.visit_s)
    p.add_argument("--region-s", type=float, default=TimeModel.region_s)
    p.add_argument("--outline-s", type=float, default=TimeModel.outline_s)
    p.add_argument("--image", type=Path, help="your own volume (with --labels: its ground truth)")
    p.add_argument("--labels", type=Path)
    p.add_argument("--curves", type=Path, help="write every curve (case, seed, arm, step, seconds, dice) as CSV")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    time_model = TimeModel(visit_s=args.visit_s, region_s=args.region_s, outline_s=args.outline_s)
    if args.image is not None:
        from napari_daeformer.io import read_image
        from napari_daeformer.io.record import label_values

        image, labels = read_image(args.image), read_image(args.labels)
        truth = label_values(labels.data, len(labels.spatial_shape), args.labels.name).astype(np.uint8)
        names = ("background", *(f"class {c}" for c in range(1, int(truth.max()) + 1)))
        cases = {args.image.name: lambda seed: Sample(image=np.asarray(image.data), labels=truth,
                                                      spacing=image.spacing, class_names=names)}
        seeds = [0]
    else:
        cases = {name: (lambda seed, name=name: make_case(name, seed)) for name in args.cases.split(",")}
        seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    print(f"CPU: {cpu_name()}, {args.threads} threads; K = {args.k} painted slices; time model {time_model}")
    print("| case | arm | seconds to Dice 0.90 | to 0.95 | to finish | slices edited | voxels changed | waited s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for case, make in cases.items():
        curves: dict[str, list[Curve]] = {arm: [] for arm in arms}
        for seed in seeds:
            sample = make(seed)
            for arm in arms:
                curve = run_arm(arm, sample, args.k, time_model, args.threads, args.max_train_minutes,
                                args.max_teach_minutes)
                curves[arm].append(curve)
                rows += [(case, seed, arm, i, s, d) for i, (s, d) in enumerate(zip(curve.seconds, curve.dice))]
        for arm in arms:
            cs = curves[arm]
            print(f"| {case} | {arm} | {_spread([c.effort_to(0.90) for c in cs])} | "
                  f"{_spread([c.effort_to(0.95) for c in cs])} | {_spread([c.seconds[-1] for c in cs])} | "
                  f"{np.mean([c.edited for c in cs]):.1f} | {np.mean([c.voxels for c in cs]):.0f} | "
                  f"{np.mean([c.waited for c in cs]):.0f} |", flush=True)
    if args.curves is not None:
        with open(args.curves, "w", newline="") as f:
            csv.writer(f).writerows([("case", "seed", "arm", "step", "seconds", "dice"), *rows])


if __name__ == "__main__":
    main()
