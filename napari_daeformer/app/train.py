"""`daeformer train`, `daeformer evaluate` and `daeformer finetune`: arguments, settings files, progress.

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
from napari_daeformer_training.finetune import finetune
from napari_daeformer_training.pairs import Pair
from napari_daeformer_training.recipes import ADD_CLASS, TEACH, Overrides, describe, settings_for, task_for
from napari_daeformer_training.settings import DEFAULT_WEIGHTS, PROTECTIONS, FinetuneSettings
from napari_daeformer_training.sources import FORMATS, load_cases, split_cases
from napari_daeformer_training.trainer import StepReport, TrainConfig, Trainer, ValReport
from napari_daeformer_training.verdict import FinetuneProgress

from napari_daeformer.app.options import class_list, class_list_text, ct_window, number, whole, window_text
from napari_daeformer.base.atomic import atomic_write, check_output_path
from napari_daeformer.base.distributed import init_from_env, shutdown
from napari_daeformer.base.errors import DaeformerError, TrainingError, first_line, printable, short_repr
from napari_daeformer.base.jobs import drain
from napari_daeformer.base.metrics import evaluate_case
from napari_daeformer.base.private_api import parser_actions
from napari_daeformer.engine.inference import SliceInferer
from napari_daeformer.io.record import is_rgb, label_values, require_image
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
    from napari_daeformer.model.checkpoint import save_or_rescue

    if args.labels is None or not args.classes:
        raise TrainingError("--image needs --labels and --classes (names, background first)")
    if args.data is not None or args.synthetic:
        raise TrainingError("give either --image (one annotated image) or --data/--synthetic, not both")
    names = class_list(args.classes)
    check_output_path(args.out / "best.safetensors", overwrite=args.overwrite)
    image, labels = require_image(read_image(args.image), args.image.name), read_image(args.labels)
    data = sparse_labels(_label_map(image, labels, args.labels.name), args.ignore_value, len(names))
    count = 1 if data.ndim == 2 else data.shape[0]
    pair = teach_pair(args.image.name, image.data, data, _slice_list(args.slices, count) if args.slices else None)
    model, said = model_for(pair, names, args.arch, args.from_scratch)
    left = None if args.deadline is None else max(args.deadline - time.monotonic(), 1.0) / 60.0   # None: the recipe's
    settings = settings_for("new_model", Overrides(minutes=left, steps=args.max_steps, device=args.device,
                                                   seed=args.seed, neighbour_weight=args.neighbour_weight))
    print(f"daeformer train: {int(pair.slices.sum())} annotated slices of {args.image.name}; {said}", file=sys.stderr)
    print(f"daeformer train: {describe(settings, int(pair.slices.sum()))}", file=sys.stderr)
    if missing := unpainted_line(unpainted_classes([pair], names)):
        print(f"daeformer train: warning: {missing}", file=sys.stderr)
    bar = None if args.quiet else tqdm(total=settings.steps, unit="step", file=sys.stderr, delay=1)

    def show(progress: FinetuneProgress) -> None:
        if bar is not None:
            bar.n = progress.step
            bar.set_postfix(loss="-" if progress.loss is None else f"{progress.loss:.4f}",
                            dice="-" if progress.holdout_dice is None else f"{progress.holdout_dice:.3f}", refresh=True)
    result = drain(finetune(model, [pair], settings), show)
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


def _slice_list(text: str, count: int) -> np.ndarray:
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
    image, labels = require_image(read_image(args.image), args.image.name), read_image(args.labels)
    label_data = _label_map(image, labels, args.labels.name)
    if args.ignore_value is not None:
        label_data = sparse_labels(label_data, args.ignore_value, len(parent.card.class_names))
    count = 1 if label_data.ndim == 2 else label_data.shape[0]
    slices = _slice_list(args.slices, count) if args.slices else annotated_slices(label_data)   # as train --image
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

    def show(progress: FinetuneProgress) -> None:
        bar.total, bar.n = progress.total, progress.step
        bar.set_postfix(loss="-" if progress.loss is None else f"{progress.loss:.4f}", refresh=True)
    result = drain(finetune(parent, [pair], settings), show)
    bar.close()
    print(f"{result.train_slices} corrected slices trained on, {result.holdout_slices} held out. {result.summary}")
    if result.improved or args.keep_anyway:
        out = save_or_rescue(args.out, result.candidate.model, result.candidate.card, overwrite=args.overwrite)
        print(f"wrote {out}")
    else:
        print(f"nothing written to {args.out} (pass --keep-anyway to write the fine-tuned model)")
    return 0
