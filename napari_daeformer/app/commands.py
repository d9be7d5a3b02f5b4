"""`daeformer segment` and `daeformer demo`: the main job from the command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from napari_daeformer.app.options import ct_window
from napari_daeformer.base.errors import DaeformerError, printable
from napari_daeformer.base.jobs import drain
from napari_daeformer.engine.inference import Progress, SliceInferer, image_warnings
from napari_daeformer.io import ImageRecord, check_label_path, is_dicom_input, read_image, write_labels
from napari_daeformer.model.bundled import resolve_model
from napari_daeformer.model.checkpoint import load_checkpoint
from napari_daeformer.tasks.segment_file import FileReport, segment_file

if TYPE_CHECKING:
    from napari_daeformer.base.distributed import DistInfo
    from napari_daeformer.tasks.batch import BatchJob, BatchSummary
    from napari_daeformer.tasks.summary import FileResult


def _progress_printer(label: str):  # type: ignore[no-untyped-def]
    def show(p: Progress) -> None:
        if p.note:
            print(f"note: {p.note}", file=sys.stderr, flush=True)
            return
        width = 30
        filled = int(width * p.done / max(p.total, 1))
        end = "\n" if p.done == p.total else ""
        print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {p.done}/{p.total} slices", end=end,
              file=sys.stderr, flush=True)
    return show


def segment_path(record: ImageRecord, output: Path, model: str | None, *, device: str = "auto", axis: int = 0,
                 batch_size: int | None = None, precision: str = "auto", window: tuple[float, float] | None = None,
                 neighbour_weight: float | None = None, overwrite: bool = False, quiet: bool = False) -> FileReport:
    """`segment_file` with the model named on the command line (the bundled one for the image's kind when
    none), progress on stderr unless `quiet`."""
    ckpt = load_checkpoint(resolve_model(model, "skin" if record.rgb else "ct"))
    inferer = SliceInferer(ckpt, device=device, precision=precision, batch_size=batch_size, window=window,
                           neighbour_weight=neighbour_weight)
    show = None if quiet else _progress_printer(f"segment {record.path.name if record.path else ''}")
    return drain(segment_file(inferer, record, output, axis=axis, overwrite=overwrite), show)


def run_segment(args: argparse.Namespace) -> int:
    check_label_path(args.output, overwrite=args.overwrite, source=args.input,    # before reading a large scan
                     dicom_source=is_dicom_input(args.input))
    record = read_image(args.input)
    for note in (*record.notes, *image_warnings(record.data)):
        print(f"note: {args.input}: {note}", file=sys.stderr)
    report = segment_path(record, Path(args.output), args.model, device=args.device, axis=args.axis,
                          batch_size=args.batch_size, precision=args.precision,
                          window=None if args.window is None else ct_window(args.window),
                          neighbour_weight=args.neighbour_weight, overwrite=args.overwrite)
    print(f"wrote {report.written.result()}")
    for name in report.measures.values:
        print(f"  {name}: {report.measures.text(name)}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    headless = args.headless or not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if not headless:
        from napari_daeformer.plugin.widgets.launch import open_viewer_with_sample
        open_viewer_with_sample()
        return 0
    from skimage import io as skio

    from napari_daeformer.base.metrics import dice_per_class
    from napari_daeformer.io.nifti import write_nifti
    from napari_daeformer.io.orientation import radiological_affine
    from napari_daeformer.io.sample_data import synthetic_ct, synthetic_skin

    out_dir = Path(args.out)
    names = ("synthetic_ct.nii.gz", "synthetic_ct_truth.nii.gz", "synthetic_ct_labels.nii.gz", "synthetic_skin.png",
             "synthetic_skin_labels.png")
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not args.overwrite:
        raise DaeformerError(f"{out_dir} already holds a demo's output ({existing[0]}, ...); "
                              "pass --overwrite to replace it or --out to choose another folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    print("no display: segmenting the bundled samples with the bundled demonstration models "
          "(trained on synthetic data; not for clinical use)")
    ct = synthetic_ct(seed=0)
    ct_path = write_nifti(out_dir / "synthetic_ct.nii.gz", ct.image, radiological_affine(ct.spacing),
                          overwrite=True)
    record = read_image(ct_path)
    write_labels(out_dir / "synthetic_ct_truth.nii.gz", ct.labels, record, overwrite=True)
    report = segment_path(record, out_dir / "synthetic_ct_labels.nii.gz", None, overwrite=True)
    dice = dice_per_class(report.labels, ct.labels, len(ct.class_names))
    print(f"wrote {report.written.result()}: mean Dice against the phantom's ground truth {np.nanmean(dice):.3f}")
    for name, d in zip(report.measures.values, dice):
        print(f"  {name}: {report.measures.text(name)}, Dice {d:.3f}")
    skin = synthetic_skin(seed=0)
    skio.imsave(str(out_dir / "synthetic_skin.png"), skin.image, check_contrast=False)
    report = segment_path(read_image(out_dir / "synthetic_skin.png"), out_dir / "synthetic_skin_labels.png", None,
                          overwrite=True)
    dice = dice_per_class(report.labels, skin.labels, 2)
    print(f"wrote {report.written.result()}: lesion Dice {dice[0]:.3f}, area {report.measures.text('lesion')}")
    return 0


def run_batch_command(args: argparse.Namespace) -> int:
    """`daeformer batch`: this rank's share of the folder, then rank 0 merges the summaries."""
    from tqdm import tqdm

    from napari_daeformer.base.distributed import init_from_env, shutdown
    from napari_daeformer.tasks.batch import BatchJob, BatchProgress, run_batch, sole_writer
    from napari_daeformer.tasks.summary import ranked, write_summary

    info, device = init_from_env(args.device)
    job = BatchJob(args.input_dir, args.output_dir, tuple(args.pattern or ("**/*",)), args.format, args.model,
                   device, args.precision, args.batch_size, args.overwrite, args.prefetch)
    try:
        bar = tqdm(unit="file", file=sys.stderr, delay=1, disable=args.quiet, position=info.rank)

        def show(p: BatchProgress) -> None:
            bar.total, bar.n = p.files_total, p.files_done
            if p.note:
                bar.write(f"note: {p.note}", file=sys.stderr)
            bar.set_postfix_str(f"{p.current} {p.slices_done}/{p.slices_total}" if p.slices_total else p.current)
        with sole_writer(job, info.rank):
            summary = drain(run_batch(job, rank=info.rank, world_size=info.world_size), show)
            bar.close()
            results = _merged(job, info, summary)
            if results is None:                          # another rank's process: rank 0 writes the summary
                return 1 if summary.failures else 0
            if args.rank:
                results = ranked(results)
            out = write_summary(job.output_dir, results)
    finally:
        shutdown(info)
    failures = [r for r in results if r.status == "failed"]
    counts = {s: sum(r.status == s for r in results) for s in ("done", "existing", "failed")}
    print(f"{counts['done']} segmented, {counts['existing']} already done, {counts['failed']} failed; summary: {out}")
    if args.rank:
        print("most uncertain first (mean predictive entropy, nats; slice to review):")
        for r in results[:args.rank_show]:
            if r.mean_entropy is not None:
                print(f"  {r.mean_entropy:.4f}  {printable(r.input)}  slice {r.uncertain_slice}")
    if failures:
        print(f"daeformer batch: {len(failures)} file(s) failed:", file=sys.stderr)
        for r in failures:
            print(f"  {printable(r.input)}: {printable(r.reason)}", file=sys.stderr)
        return 1
    return 0


def _merged(job: BatchJob, info: DistInfo, summary: BatchSummary) -> list[FileResult] | None:
    """Every rank's results in input order on rank 0 (each rank leaves its own in a hidden file); None elsewhere."""
    import json
    from dataclasses import asdict

    from napari_daeformer.base.distributed import barrier
    from napari_daeformer.tasks.summary import FileResult

    if not info.enabled:
        return summary.results
    part = job.output_dir / f".summary.rank{info.rank}.jsonl"
    part.write_text("".join(json.dumps(asdict(r)) + "\n" for r in summary.results))
    barrier(info)
    if not info.is_main:
        return None
    results = []
    for rank in range(info.world_size):
        path = job.output_dir / f".summary.rank{rank}.jsonl"
        results += [FileResult(**json.loads(line)) for line in path.read_text().splitlines()]
        path.unlink()
    return sorted(results, key=lambda r: r.input)
