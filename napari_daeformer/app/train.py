"""`daeformer train` on a data folder and `daeformer evaluate`: arguments, settings files, progress (`train --image` and
`daeformer finetune` are in `app/learn.py`).

Settings come from the defaults (the paper's recipe), then a YAML/TOML `--config` file, then the command line;
the resolved settings are written to `OUT/config.yaml` beside the checkpoints. The same command under
`torchrun --nproc_per_node N` trains with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from napari_daeformer_training.augment import AugmentConfig
from napari_daeformer_training.data import Case, detect_num_classes
from napari_daeformer_training.recipes import TEACH
from napari_daeformer_training.sources import FORMATS, load_cases, split_cases
from napari_daeformer_training.trainer import StepReport, TrainConfig, Trainer, ValReport

from napari_daeformer.app.options import class_list, class_list_text, ct_window, number, whole, window_text
from napari_daeformer.base.atomic import atomic_write, check_output_path
from napari_daeformer.base.distributed import init_from_env, shutdown
from napari_daeformer.base.errors import DaeformerError, TrainingError, first_line, printable, short_repr
from napari_daeformer.base.metrics import evaluate_case
from napari_daeformer.base.private_api import parser_actions
from napari_daeformer.engine.inference import SliceInferer
from napari_daeformer.io.record import is_rgb
from napari_daeformer.io.sample_data import CT_CLASSES, SKIN_CLASSES
from napari_daeformer.model import SIZE_MULTIPLE, DAEFormer, named_config
from napari_daeformer.model.checkpoint import MAX_INPUT_SIDE, MAX_WEIGHT, SYNAPSE_CLASSES, ModelCard, load_checkpoint
from napari_daeformer.model.preprocessing import ct_preprocessing, rgb_preprocessing, zscore_preprocessing


def _seeds(text: str | list[int]) -> list[int]:
    """'1-12' or '1,3,5' -> seeds."""
    if isinstance(text, list):
        return text
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--config", type=Path, help="YAML or TOML file of settings (keys as the long options)")
    p.add_argument("--data", type=Path, help="data folder (Synapse, imagesTr/labelsTr or *_image/*_label, ISIC)")
    p.add_argument("--data-format", choices=FORMATS, default="auto", help="default: detect from the folder")
    p.add_argument("--synthetic", choices=("ct", "skin"), help="train on generated phantoms instead of --data")
    p.add_argument("--out", type=Path, help="output folder: best/last checkpoints, resume state, log, plot")
    p.add_argument("--resume", action="store_true", help="continue exactly from OUT/resume.safetensors")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoints of an earlier run in OUT (default: refuse, so no model is lost)")
    p.add_argument("--init", type=Path, help="start from this checkpoint's weights (fine-tuning)")
    p.add_argument("--arch", default="small", help="architecture for a new model: small or paper (default: small)")
    p.add_argument("--classes", type=class_list_text,
                   help="comma-separated class names, background first (default: from the data)")
    p.add_argument("--window", type=window_text, default="abdomen", help="CT window preset or LOWER,UPPER HU (default: abdomen)")
    p.add_argument("--normalise", choices=("auto", "ct", "zscore", "rgb"), default="auto",
                   help="intensity normalisation for a new model: ct (the --window), zscore (per image, clipped to "
                   "the 0.5-99.5th foreground percentiles: MR and other uncalibrated images), rgb (photos); auto: rgb "
                   "for photos, ct for Hounsfield units (air below -500), zscore otherwise (default: %(default)s)")
    p.add_argument("--input-size", type=whole(SIZE_MULTIPLE, MAX_INPUT_SIDE, SIZE_MULTIPLE), default=224,
                   help="network input side, a multiple of 16 (default: 224)")
    p.add_argument("--val-fraction", type=number(0, 0.9), default=0.2, help="share of cases held out (default: 0.2)")
    p.add_argument("--val-cases", help="comma-separated case names to hold out instead")
    p.add_argument("--train-seeds", default="1-12", help="synthetic: seeds of the training cases (default: 1-12)")
    p.add_argument("--val-seeds", default="13,14", help="synthetic: seeds of the validation cases (default: 13,14)")
    p.add_argument("--epochs", type=whole(1), default=d.epochs, help=f"default: {d.epochs}")
    p.add_argument("--batch-size", type=whole(1), default=d.batch_size, help=f"global batch (default: {d.batch_size})")
    p.add_argument("--lr", type=number(0, above_low=True), default=d.lr, help=f"base learning rate (default: {d.lr})")
    p.add_argument("--momentum", type=number(0, 1), default=d.momentum, help=f"default: {d.momentum}")
    p.add_argument("--weight-decay", type=number(0), default=d.weight_decay, help=f"default: {d.weight_decay}")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=d.optimizer, help=f"default: {d.optimizer}")
    p.add_argument("--ce-weight", type=number(0), default=d.ce_weight, help=f"default: {d.ce_weight}")
    p.add_argument("--dice-weight", type=number(0), default=d.dice_weight, help=f"default: {d.dice_weight}")
    p.add_argument("--val-every", type=whole(1), default=d.val_every, help=f"epochs between validations (default: {d.val_every})")
    p.add_argument("--max-steps", type=whole(1), help="stop after this many steps")
    p.add_argument("--train-parts", choices=("all", "decoder"), default="all", help="default: all")
    p.add_argument("--no-flip", action="store_true", help="no flip augmentation (for left/right classes)")
    p.add_argument("--no-augment", action="store_true", help="no augmentation at all")
    p.add_argument("--aug", action="append", metavar="KEY=VALUE",
                   help="set one augmentation setting, repeatable: " + ", ".join(AugmentConfig.__dataclass_fields__)
                   + " (e.g. --aug rotation_deg=20 --aug scale=0.8,1.25); in a config file: aug: {rotation_deg: 20}")
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA too")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps (default: auto)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default: {d.seed}")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("a new model from a few annotated slices of one image (instead of --data)")
    g.add_argument("--image", type=Path, help="image file or DICOM folder (2D or 3D: CT, MR, RGB photo)")
    g.add_argument("--labels", type=Path, help="its label map; only the annotated slices are learnt from")
    g.add_argument("--slices", help="the annotated slices along axis 0, e.g. 3,5,10-12 (default: every slice with "
                   "a label, or with any voxel not --ignore-value)")
    g.add_argument("--ignore-value", type=whole(0, 65535), help="label value meaning 'not annotated' (e.g. 255): no loss there")
    p.add_argument("--minutes", type=number(0, above_low=True),
                   help=f"time budget of the whole command, reading and the last validation included (default: none; "
                   f"{TEACH.minutes:g} with --image); training stops early enough to validate and write its best state")
    g.add_argument("--from-scratch", action="store_true",
                   help="random weights (default: start from the bundled model's encoder and decoder)")
    g.add_argument("--neighbour-weight", type=number(0, MAX_WEIGHT), metavar="W",
                   help="each neighbouring slice's share of a slice's class probabilities when the model segments a "
                   f"volume, saved in its card (default: {TEACH.neighbour_weight:g}; 0 keeps a structure seen on one "
                   "slice only)")


RECORDED_ONLY = ("world_size", "validation")     # written to OUT/config.yaml for the record, not settings


def resolve_settings(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace) -> argparse.Namespace:
    """Defaults < config file < command line."""
    if args.config is None:
        return args
    if not args.config.is_file():
        hint = f" (for the network size use --arch {args.config})" if str(args.config) in ("small", "paper") else ""
        raise TrainingError(f"--config {args.config}: no such settings file{hint}")
    import tomllib

    text = Path(args.config).read_text()
    try:
        data = tomllib.loads(text) if args.config.suffix == ".toml" else (yaml.safe_load(text) or {})
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise TrainingError(f"{args.config}: not a valid settings file ({first_line(e)})") from e
    if not isinstance(data, dict):
        raise TrainingError(f"{args.config}: expected a mapping of settings")
    actions = parser_actions(parser)
    settings = {str(k).replace("-", "_"): v for k, v in data.items() if k not in RECORDED_ONLY}
    unknown = sorted(set(settings) - set(actions))
    if unknown:
        raise TrainingError(f"{args.config}: unknown settings {unknown}")
    for key, value in settings.items():
        settings[key] = _setting(args.config, actions[key], value)
    parser.set_defaults(**settings)
    resolved = parser.parse_args(argv)
    resolved.command, resolved.memory_limit = args.command, args.memory_limit
    return resolved


def _setting(config: Path, action: argparse.Action, value: Any) -> Any:
    """A config file's value as the command line's option would have it; a wrong type is one clear line."""
    flag = action.option_strings[0] if action.option_strings else action.dest
    if value is None:
        return None
    if action.const is not None and action.nargs == 0:                      # a switch: --no-amp and the like
        if not isinstance(value, bool):
            raise TrainingError(f"{config}: {action.dest} is a switch (true or false), got {short_repr(value)}")
        return value
    if isinstance(action, argparse._AppendAction):                          # aug: {k: v}, [k=v, ...] or k=v
        if isinstance(value, dict):
            return value
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]
    if action.dest == "classes" and isinstance(value, list):                # classes: [background, liver]
        value = ",".join(map(str, value))
    if isinstance(value, (dict, list, bool)):
        raise TrainingError(f"{config}: {action.dest} ({flag}) expects one value, got {short_repr(value)}")
    if action.type is Path and not isinstance(value, str):                  # out: 123 is a number, not a folder
        raise TrainingError(f"{config}: {action.dest} ({flag}) expects a path, got the number {value!r}; write it "
                            f"in quotes ('{value}') for a folder of that name")
    try:
        converted = action.type(str(value)) if action.type is not None else str(value)   # as argparse: text in
    except (TypeError, ValueError, argparse.ArgumentTypeError, DaeformerError) as e:
        raise TrainingError(f"{config}: {action.dest} ({flag}): {first_line(e)}") from e
    if action.choices is not None and converted not in action.choices:
        raise TrainingError(f"{config}: {action.dest} must be one of {', '.join(map(str, action.choices))}, "
                            f"got {short_repr(value)}")
    return converted


def augment_settings(args: argparse.Namespace) -> AugmentConfig | None:
    """AugmentConfig from --no-augment, --no-flip and --aug KEY=VALUE (or an `aug` mapping in the config file)."""
    if args.no_augment:
        return None
    items: dict[str, Any] = {}
    aug = args.aug or []
    for entry in aug.items() if isinstance(aug, dict) else (e.split("=", 1) for e in aug):
        if len(entry) != 2:
            raise TrainingError(f"--aug {printable(entry[0])!r}: expected KEY=VALUE, e.g. --aug rotation_deg=20")
        key, value = entry
        if key not in AugmentConfig.__dataclass_fields__:
            raise TrainingError(f"unknown augmentation setting {key!r}; use one of "
                                f"{', '.join(AugmentConfig.__dataclass_fields__)}")
        default = getattr(AugmentConfig(), key)
        try:
            if isinstance(default, tuple):
                parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
                items[key] = tuple(float(v) for v in parts)
            else:
                items[key] = float(value)
        except ValueError as e:
            raise TrainingError(f"augmentation setting {key}={value!r} is not a number") from e
    if args.no_flip:
        items["p_flip"] = 0.0
    return replace(AugmentConfig(), **items)


def _model_and_card(args: argparse.Namespace, cases: list[Case], fmt: str) -> tuple[DAEFormer, ModelCard]:
    if args.init:
        ckpt = load_checkpoint(args.init)
        return ckpt.model, ckpt.card.with_provenance(parent=str(args.init))
    rgb = is_rgb(cases[0].image, cases[0].labels)
    if args.classes:
        names = class_list(args.classes)
    elif fmt == "synapse":
        names = SYNAPSE_CLASSES
    elif fmt == "synthetic-ct":
        names = CT_CLASSES
    elif fmt in ("isic", "synthetic-skin"):
        names = SKIN_CLASSES
    else:
        names = ("background", *(f"class {i}" for i in range(1, detect_num_classes(cases))))
    cfg = named_config(args.arch, num_classes=len(names), in_channels=3 if rgb else 1)
    kind = args.normalise
    if kind == "auto":
        hounsfield = fmt == "synapse" or all(float(np.min(c.image)) < -500 for c in cases)
        kind = "rgb" if rgb else "ct" if hounsfield else "zscore"
    if (kind == "rgb") != rgb:
        raise TrainingError(f"--normalise {kind} does not suit {'RGB photos' if rgb else 'single-channel images'}")
    if kind == "rgb":
        prep = rgb_preprocessing()
    elif kind == "zscore":
        prep = zscore_preprocessing()
    else:
        prep = ct_preprocessing(ct_window(args.window))
    card = ModelCard(cfg, names, input_size=(args.input_size, args.input_size), preprocessing=prep,
                     provenance={"data": str(args.data) if args.data else fmt})
    return DAEFormer(cfg), card


# The options a new model from one annotated image uses; the others belong to training on a data folder.
TEACH_OPTIONS = {"config", "out", "overwrite", "arch", "classes", "minutes", "max_steps", "device", "seed", "quiet",
                 "image", "labels", "slices", "ignore_value", "from_scratch", "neighbour_weight"}
IMAGE_ONLY = {"labels", "slices", "ignore_value", "from_scratch", "neighbour_weight"}


def refuse_unused(args: argparse.Namespace) -> None:
    """Refuse (TrainingError) an option set on the command line or in the config file that this kind of run would
    ignore: an option that does nothing must not look as if it did."""
    parser = argparse.ArgumentParser(add_help=False)
    add_train_arguments(parser)
    defaults = vars(parser.parse_args([]))
    used = TEACH_OPTIONS if args.image is not None else set(defaults) - IMAGE_ONLY
    unused = sorted(k for k, v in defaults.items() if k not in used and getattr(args, k, v) != v)
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        kind = ("--image (a new model from one annotated image)" if args.image is not None else
                "--data/--synthetic (training on a folder of cases)")
        raise TrainingError(f"{flags}: not used with {kind}; remove {'it' if len(unused) == 1 else 'them'}")


def run_train(args: argparse.Namespace) -> int:
    args.deadline = None if args.minutes is None else time.monotonic() + 60.0 * args.minutes   # the whole command
    if args.out is None:
        raise TrainingError("--out is required")
    refuse_unused(args)
    if args.out.exists() and not args.out.is_dir():
        raise TrainingError(f"--out {args.out} is a file; give a folder for checkpoints and logs")
    if args.image is not None:
        from napari_daeformer.app.learn import run_teach

        return run_teach(args)
    check_output_path(args.out / "config.yaml", overwrite=True)   # writable, before any data is read
    earlier = [n for n in ("best.safetensors", "last.safetensors") if (args.out / n).exists()]
    if earlier and not (args.resume or args.overwrite):
        raise TrainingError(f"--out {args.out} holds an earlier run ({', '.join(earlier)}); pass --resume to continue "
                            "it, --overwrite to replace it, or choose another folder")
    fmt = f"synthetic-{args.synthetic}" if args.synthetic else args.data_format
    info, device = init_from_env(args.device)
    torch.manual_seed(args.seed)                              # the same initial weights on every run and rank
    try:
        if fmt.startswith("synthetic-"):
            train = load_cases(None, fmt, seeds=_seeds(args.train_seeds))
            val = load_cases(None, fmt, seeds=_seeds(args.val_seeds))
            note = "demonstration model trained on synthetic data; not for clinical use"
            split = f"validation on the synthetic seeds {args.val_seeds}"
        else:
            if fmt == "auto":
                from napari_daeformer_training.sources import detect_format
                fmt = detect_format(args.data)
            cases = load_cases(args.data, fmt)
            train, val, split = split_cases(cases, args.val_fraction, args.seed,
                                            args.val_cases.split(",") if args.val_cases else None)
            note = None
        model, card = _model_and_card(args, [*train, *val], fmt)
        card = card.with_provenance(train_cases=[c.name for c in train], val_cases=[c.name for c in val],
                                    validation=split, **({"note": note} if note else {}))
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                          weight_decay=args.weight_decay, ce_weight=args.ce_weight, dice_weight=args.dice_weight,
                          optimizer=args.optimizer, val_every=args.val_every, seed=args.seed, amp=not args.no_amp,
                          max_steps=args.max_steps, train_parts=args.train_parts,
                          augment=augment_settings(args))
        trainer = Trainer(model, card, train, val, cfg, args.out, device, info, resume=args.resume,
                          deadline=args.deadline)
        if info.is_main:
            print(f"daeformer train: {split}", file=sys.stderr)
            resolved = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                        if k not in ("func", "command_parser")}
            text = yaml.safe_dump({**resolved, "world_size": info.world_size, "validation": split}, sort_keys=True)
            atomic_write(args.out / "config.yaml", lambda tmp: tmp.write_text(text))
        _drive(trainer, card.class_names, quiet=args.quiet or not info.is_main)
        if info.is_main:
            print(f"best mean Dice {trainer.best_dice:.4f}; checkpoints in {args.out}" if val and trainer.best_dice >= 0
                  else f"not validated (nothing held out, or no validation reached): the last state is in {args.out}",
                  file=sys.stderr)
    finally:
        shutdown(info)
    return 0


def _drive(trainer: Trainer, classes: tuple[str, ...], quiet: bool) -> None:
    from tqdm import tqdm
    bar = None if quiet else tqdm(total=trainer.total_steps, initial=trainer.step, unit="step", file=sys.stderr,
                                  delay=1)
    for report in trainer.fit():
        if isinstance(report, StepReport) and bar is not None:
            bar.update(1)
            bar.set_postfix(epoch=report.epoch, loss=f"{report.loss:.4f}", slices_s=f"{report.slices_per_s:.1f}")
        elif isinstance(report, ValReport) and not quiet:
            per_class = ", ".join(f"{n} {d:.3f}/{h:.1f}mm" for n, d, h in zip(classes[1:], report.dice, report.hd95))
            message = (f"validation after epoch {report.epoch}: mean Dice {report.mean_dice:.4f}"
                       f"{' (best)' if report.best else ''} [Dice/HD95 {per_class}]")
            (bar.write if bar else print)(message)
    if bar is not None:
        bar.close()


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint (.safetensors) or a bundled model name")
    p.add_argument("--data", type=Path, help="data folder (Synapse test_vol_h5, imagesTr/labelsTr, ISIC)")
    p.add_argument("--data-format", choices=FORMATS, default="auto", help="default: detect from the folder")
    p.add_argument("--split", choices=("test", "train"), default="test", help="Synapse: which part (default: test)")
    p.add_argument("--seeds", default="0", help="synthetic formats: case seeds (default: 0)")
    p.add_argument("--protocol", choices=("ours", "paper"), default="ours",
                   help="ours: HD95 in mm, empty classes excluded; paper: the official conventions (default: ours)")
    p.add_argument("--csv", type=Path, help="also write the table as CSV")
    p.add_argument("--device", default="auto", help="default: auto")


def _mean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def run_evaluate(args: argparse.Namespace) -> int:
    from napari_daeformer.model.bundled import resolve_model
    if args.csv:
        check_output_path(args.csv, overwrite=True)           # before minutes of segmentation
    fmt = args.data_format
    if fmt == "auto" and args.data is not None:
        from napari_daeformer_training.sources import detect_format
        fmt = detect_format(args.data)
    cases = load_cases(args.data, fmt, split=args.split, seeds=_seeds(args.seeds))
    rgb = cases[0].labels.ndim == 2 and cases[0].image.ndim == 3
    ckpt = load_checkpoint(resolve_model(args.model, "skin" if rgb else "ct"))
    names = ckpt.card.class_names
    rows: list[dict[str, Any]] = []
    for case in cases:
        labels = SliceInferer(ckpt, device=args.device).segment(case.image, rgb=rgb).labels
        dice, dist = evaluate_case(labels, case.labels, len(names), case.spacing or None, args.protocol)
        for name, d, h in zip(names[1:], dice, dist):
            rows.append({"case": case.name, "class": name, "dice": d, "hd95": h})
    unit = "voxels" if args.protocol == "paper" else "mm"
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["case", "class", "dice", f"hd95_{unit}"], lineterminator="\n")
    writer.writeheader()
    print(f"{'case':<14} {'class':<16} {'Dice':>7} {'HD95 ' + unit:>12}")
    for r in rows:
        print(f"{r['case']:<14} {r['class']:<16} {r['dice']:>7.4f} {r['hd95']:>12.2f}")
        writer.writerow({"case": r["case"], "class": r["class"], "dice": r["dice"], f"hd95_{unit}": r["hd95"]})
    for name in names[1:]:
        d = _mean([r["dice"] for r in rows if r["class"] == name])
        h = _mean([r["hd95"] for r in rows if r["class"] == name])
        print(f"{'mean':<14} {name:<16} {d:>7.4f} {h:>12.2f}")
        writer.writerow({"case": "mean", "class": name, "dice": d, f"hd95_{unit}": h})
    mean_d = _mean([r["dice"] for r in rows])
    mean_h = _mean([r["hd95"] for r in rows])
    print(f"{'mean':<14} {'all organs':<16} {mean_d:>7.4f} {mean_h:>12.2f}")
    writer.writerow({"case": "mean", "class": "all", "dice": mean_d, f"hd95_{unit}": mean_h})
    if args.csv:
        atomic_write(args.csv, lambda tmp: tmp.write_text(out.getvalue()))
    return 0
