"""The `daeformer` command line. Each subcommand parses its arguments and makes one library call.

The `train` and `evaluate` subcommands live in `app/train.py`, `train --image` and `finetune` in `app/learn.py`,
the main job's in `app/commands.py`.

Errors meant for the user print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from napari_daeformer.app.options import number, whole, window_text
from napari_daeformer.base.errors import DaeformerError, first_line, printable

Command = Callable[[argparse.Namespace], int]


def _import_official(args: argparse.Namespace) -> int:
    from napari_daeformer.base.atomic import check_output_path
    from napari_daeformer.model.checkpoint import SYNAPSE_CLASSES, ModelCard, check_class_names, save_checkpoint
    from napari_daeformer.model.official import convert_official_state_dict, load_official_state_dict
    from napari_daeformer.model.preprocessing import ct_preprocessing, rgb_preprocessing

    if args.out.suffix != ".safetensors":
        raise DaeformerError(f"{args.out}: a checkpoint is written as .safetensors")
    check_output_path(args.out, args.overwrite)
    names = args.class_names.split(",") if args.class_names else None
    check_class_names(names or ())

    model, report = convert_official_state_dict(load_official_state_dict(args.model), args.in_channels)
    if names is None:
        names = list(SYNAPSE_CLASSES) if model.cfg.num_classes == len(SYNAPSE_CLASSES) else \
            ["background", *(f"class {i}" for i in range(1, model.cfg.num_classes))]
    card = ModelCard(
        config=model.cfg, class_names=tuple(names), input_size=(224, 224),
        preprocessing=ct_preprocessing("abdomen") if args.in_channels == 1 else rgb_preprocessing(),
        provenance={"source": "official DAE-Former checkpoint", "file": Path(args.model).name,
                    "dropped_unused_keys": report.dropped_unused})
    out = save_checkpoint(args.out, model, card, overwrite=args.overwrite)
    print(f"converted {report.mapped} tensors, dropped {report.dropped_unused} unused by the forward pass"
          f"{', folded the 1-to-3 channel repeat into the first convolution' if report.folded_rgb_to_gray else ''}"
          f" -> {out}")
    return 0


def _segment(args: argparse.Namespace) -> int:
    from napari_daeformer.app.commands import run_segment
    return run_segment(args)


def _batch(args: argparse.Namespace) -> int:
    from napari_daeformer.app.commands import run_batch_command
    return run_batch_command(args)


def _demo(args: argparse.Namespace) -> int:
    from napari_daeformer.app.commands import run_demo
    return run_demo(args)


def _info(args: argparse.Namespace) -> int:
    from napari_daeformer.model import DAEFormer, count_parameters, named_config
    from napari_daeformer.model.bundled import BUNDLED, resolve_model

    if args.model in BUNDLED or Path(args.model).suffix == ".safetensors" or Path(args.model).exists():
        from napari_daeformer.model.checkpoint import load_checkpoint
        ckpt = load_checkpoint(resolve_model(args.model))
        model, card = ckpt.model, ckpt.card
        print(f"classes: {', '.join(card.class_names)}")
        print(f"input: {card.input_size[0]}x{card.input_size[1]}, {card.config.in_channels} channel(s), "
              f"preprocessing {card.preprocessing.to_dict()}")
        for key, value in card.provenance.items():               # free text from the file: no escape codes
            print(printable(f"provenance.{key}: {value}"))
    else:
        model = DAEFormer(named_config(args.model, num_classes=args.num_classes, in_channels=args.in_channels))
    print(f"configuration: {model.cfg.to_dict()}")
    print(f"parameters: {count_parameters(model):,} ({count_parameters(model) / 1e6:.2f} M)")
    return 0


def _add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Where and how the inference engine runs: shared by segment and batch."""
    from napari_daeformer.engine.devices import PRECISIONS

    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda[:N], mps "
                   "(default: %(default)s)")
    p.add_argument("--batch-size", type=whole(1), help="slices per forward pass (default: what fits the device)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="numeric path; auto = bf16 on GPUs and on CPUs with native bf16, else fp32. int8 = static "
                   "int8, compiled for the model on first use (about 1 min on 2 idle cores, 3-4 min on a busy "
                   "machine; cached), else dynamic: measured slower than fp32 for whole runs of the bundled "
                   "models, so never chosen by auto (default: %(default)s)")


def _import_official_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="official checkpoint (.pth state dict)")
    p.add_argument("out", type=Path, help="output checkpoint (.safetensors)")
    p.add_argument("--in-channels", type=int, choices=(1, 3), default=1,
                   help="1 for CT (folds the official 1-to-3 channel repeat into the first conv), 3 for RGB "
                   "(default: %(default)s)")
    p.add_argument("--class-names", help="comma-separated class names, background first "
                   "(default: the Synapse organs for 9 classes)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_import_official)


def _info_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a named configuration (paper, small), a bundled model (ct, skin) or a .safetensors "
                                 "checkpoint")
    p.add_argument("--num-classes", type=int, default=9, help="for a named configuration (default: %(default)s)")
    p.add_argument("--in-channels", type=int, default=1, help="for a named configuration (default: %(default)s)")
    p.set_defaults(func=_info)


def _segment_options(p: argparse.ArgumentParser) -> None:
    from napari_daeformer.model.checkpoint import MAX_WEIGHT

    p.add_argument("input", type=Path, help="image file or DICOM folder")
    p.add_argument("output", type=Path, help="label map: .nii.gz, .nii, .tif, .png, or .dcm (DICOM-SEG, from a DICOM "
                   "series)")
    p.add_argument("--model", help="checkpoint (.safetensors) or a bundled model name: ct, skin "
                   "(default: the bundled demonstration model for the image's kind)")
    _add_engine_arguments(p)
    p.add_argument("--axis", type=int, default=0, help="array axis to slice along; 0 = axial for NIfTI/DICOM "
                   "(default: %(default)s)")
    p.add_argument("--window", type=window_text, help="CT window overriding the checkpoint's: LOWER,UPPER in HU or a preset name "
                   "(abdomen, soft tissue, liver, lung, bone, brain)")
    p.add_argument("--neighbour-weight", type=number(0, MAX_WEIGHT), metavar="W",
                   help="each neighbouring slice's share of a slice's class probabilities, 0 (each slice alone) to "
                   f"{MAX_WEIGHT} (default: the checkpoint's; a new model taught on a volume sets it)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=_segment)


def _batch_options(p: argparse.ArgumentParser) -> None:
    from napari_daeformer.tasks.batch import OUTPUT_FORMATS

    p.add_argument("input_dir", type=Path, help="folder of images (searched recursively)")
    p.add_argument("output_dir", type=Path, help="folder for the label maps and summary.csv")
    p.add_argument("--model", help="checkpoint or bundled name (default: the bundled model for each image's kind)")
    p.add_argument("--pattern", action="append", help="glob relative to IN_DIR, repeatable (default: **/*)")
    p.add_argument("--format", default="same", choices=OUTPUT_FORMATS,
                   help="output format; same: NIfTI->NIfTI, NRRD->.seg.nrrd (3D Slicer), PNG/JPEG->PNG, "
                        "DICOM->.nii.gz (default: %(default)s)")
    _add_engine_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="recompute files whose output exists")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=None,
                   help="read the next file and write the last one during segmentation (default: on GPUs only)")
    p.add_argument("--rank", action="store_true", help="order summary.csv by uncertainty (mean predictive entropy, "
                   "highest first) and list the cases to review first")
    p.add_argument("--rank-show", type=int, default=10, help="--rank: how many cases to list (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_batch)


def _demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--headless", action="store_true", help="do not open a window even if a display exists")
    p.add_argument("--out", default="daeformer-demo", help="output folder when headless (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="headless: replace an earlier demo's files in --out")
    p.set_defaults(func=_demo)


def _train_options(p: argparse.ArgumentParser) -> None:
    from napari_daeformer.app.train import add_train_arguments, run_train

    add_train_arguments(p)
    p.set_defaults(func=run_train)


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    from napari_daeformer.app.train import add_evaluate_arguments, run_evaluate

    add_evaluate_arguments(p)
    p.set_defaults(func=run_evaluate)


def _finetune_options(p: argparse.ArgumentParser) -> None:
    from napari_daeformer.app.learn import add_finetune_arguments, run_finetune

    add_finetune_arguments(p)
    p.set_defaults(func=run_finetune)


def _interpolate_options(p: argparse.ArgumentParser) -> None:
    from napari_daeformer.app.interpolate import add_interpolate_arguments, run_interpolate

    add_interpolate_arguments(p)
    p.set_defaults(func=run_interpolate)


COMMANDS: dict[str, tuple[dict[str, str], Callable[[argparse.ArgumentParser], None]]] = {
    "import-official": (dict(help="convert an official DAE-Former .pth checkpoint to our format",
        description="Convert a state dict saved by the official DAE-Former code into a "
        "napari-daeformer checkpoint (safetensors + JSON metadata). The .pth is read with "
        "torch.load(weights_only=True): tensors only, nothing executed."), _import_official_options),
    "info": (dict(help="print a configuration's or a checkpoint's architecture and parameter count"), _info_options),
    "segment": (dict(help="segment an image or volume into a label map with the source geometry",
        description="Segment a NIfTI/DICOM/TIFF/PNG/JPEG image slice by slice with a DAE-Former "
        "checkpoint and write the label map (NIfTI keeps the source affine), atomically. From a DICOM "
        "series, a .dcm output is a DICOM Segmentation (highdicom) referencing the series' instances."), _segment_options),
    "batch": (dict(help="segment every image in a folder (resumable; shards across torchrun ranks)",
        description="Segment every file (or DICOM series folder) under IN_DIR and write label maps "
        "under OUT_DIR with the same relative names and the source geometry. Existing outputs are "
        "skipped, so a killed run started again finishes the rest. Writes OUT_DIR/summary.csv. "
        "Under `torchrun --nproc_per_node N` the files are sharded across ranks."), _batch_options),
    "demo": (dict(help="open napari with the plugin and the sample; headless: segment the sample",
        description="With a display: open napari with the synthetic CT sample and the Segment "
        "widget. Without one (or with --headless): segment the synthetic CT and skin samples with "
        "the bundled models and write inputs and label maps to --out."), _demo_options),
    "train": (dict(help="train DAE-Former (Synapse, NIfTI folders, ISIC folders or synthetic data)",
        description="Train DAE-Former with the paper's recipe (SGD 0.05, poly decay, 0.4 CE + 0.6 "
        "Dice, the official augmentation family) on slices; validate on whole held-out cases "
        "(Dice, HD95 in mm); write best/last checkpoints, a resumable state, metrics.jsonl and "
        "curves.png atomically. Run it under `torchrun --nproc_per_node N` for several GPUs."), _train_options),
    "evaluate": (dict(help="per-case, per-class Dice and HD95 of a checkpoint on whole volumes",
        description="Segment every case of a data set with the engine and score whole volumes: "
        "Dice and HD95 per case and class, as a table and optionally CSV."), _evaluate_options),
    "finetune": (dict(help="fine-tune a checkpoint on corrected slices into a new checkpoint",
        description="Fine-tune a copy of a checkpoint on the corrected slices of one image; hold a "
        "quarter of them out (at least one) to report Dice before and after; write a new checkpoint with "
        "its parent recorded. The parent file is never modified."), _finetune_options),
    "interpolate": (dict(help="fill the slices between painted ones of a label map (fill between slices)",
        description="Fill the unpainted slices between painted ones of a label map, class by class, by "
        "morphological contour interpolation (ITK; 3D Slicer's Fill between slices). Painted slices are never "
        "changed; slices outside the painted range are left as they are. The output keeps the input's geometry."),
        _interpolate_options),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake answered in one line (and where to look) instead of a screenful of usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `daeformer` parser. `only`: give just this command its options (the others are listed by name), so that
    `daeformer --help` and a command's start do not import torch and the trainer for options they do not use."""
    parser = _Parser(prog="daeformer", description="DAE-Former segmentation for CT volumes and "
                                     "skin photos: the command line of napari-daeformer.")
    from napari_daeformer import __version__
    parser.add_argument("--version", action="version", version=f"napari-daeformer {__version__}")
    parser.add_argument("--memory-limit", metavar="SIZE", help="most memory one file may take, e.g. 64G (default: "
                        "80%% of the free memory; a file whose header asks for more is refused before reading)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (texts, fill) in COMMANDS.items():
        command = sub.add_parser(name, **texts)
        if only is None or only == name:
            fill(command)
        command.set_defaults(command_parser=command)          # each command's own usage for its errors
    return parser


def _unrecognised(extra: list[str], command: argparse.ArgumentParser) -> str:
    """argparse's 'unrecognized arguments' with the closest option of the command for each typo'd flag."""
    options = sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command.format_help())))
    words = []
    for token in extra:
        close = difflib.get_close_matches(token.split("=")[0], options, n=1, cutoff=0.6) if token.startswith("--") else []
        words.append(f"{token} (did you mean {close[0]}?)" if close else token)
    return "unrecognized arguments: " + " ".join(words)


NEGATIVE_VALUES = ("--window",)          # options whose value may start with "-": --window -1000,1000


def _joined(argv: Sequence[str]) -> list[str]:
    """`--window -1000,1000` as `--window=-1000,1000` (argparse would read the value as an option)."""
    out: list[str] = []
    for token in argv:
        if out and out[-1] in NEGATIVE_VALUES and token.startswith("-") and token[1:2].isdigit():
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`daeformer ...`: the exit status; a user's error is one line on stderr and status 2, Ctrl-C status 130."""
    try:
        return _run(_joined(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:                                # also while torch is still being imported
        print("daeformer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:                                  # `daeformer info ct | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _run(words: list[str]) -> int:
    parser = build_parser(only=next((w for w in words if w in COMMANDS), ""))
    args, extra = parser.parse_known_args(words)
    if extra:
        args.command_parser.error(_unrecognised(extra, args.command_parser))
    func: Command = args.func
    try:
        if args.memory_limit is not None:
            from napari_daeformer.base.memory import ENV, parse_size
            parse_size(args.memory_limit)                      # a bad size fails here, in one line
            os.environ[ENV] = args.memory_limit
        if getattr(args, "config", None) is not None:          # `train --config FILE`: file < command line
            from napari_daeformer.app.train import resolve_settings
            args = resolve_settings(args.command_parser, words[words.index(args.command) + 1:], args)
        return func(args)
    except BrokenPipeError:
        raise
    except DaeformerError as e:                              # ours only: a bug of ours stays a traceback
        print(f"daeformer {args.command}: error: {printable(first_line(e))}", file=sys.stderr)
        return 2
