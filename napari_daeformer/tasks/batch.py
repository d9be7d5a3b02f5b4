"""Batch segmentation of a folder: prefetching reads, atomic writes, resumable, shardable across ranks.

`run_batch(job)` is a generator of `BatchProgress`; it returns a `BatchSummary`. A file whose output already
exists is not recomputed (its measures are read back from the output), so a killed run started again finishes
the rest and produces the same outputs. Under torchrun, files are sharded deterministically by rank.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from napari_daeformer.base.atomic import remove_stale_temporaries
from napari_daeformer.base.errors import DaeformerError, ImageFormatError, first_line
from napari_daeformer.base.folder_lock import exclusive
from napari_daeformer.base.volumes import Measures
from napari_daeformer.engine.devices import resolve_device
from napari_daeformer.engine.inference import Progress, SliceInferer
from napari_daeformer.io import READ_SUFFIXES, ImageRecord, is_dicom_file, read_image, suffix_of
from napari_daeformer.io.record import label_channel
from napari_daeformer.model.bundled import resolve_model
from napari_daeformer.model.checkpoint import load_checkpoint
from napari_daeformer.tasks.segment_file import FileReport, segment_file
from napari_daeformer.tasks.summary import PROGRESS, SUMMARY, FileResult, read_earlier, write_summary

READ_AHEAD = 2                        # files read in parallel ahead of the engine (GPU runs)
OUTPUT_FORMATS = ("same", ".nii.gz", ".nii", ".seg.nrrd", ".tif", ".png")
_SAME = {".nii": ".nii", ".nii.gz": ".nii.gz", ".tif": ".tif", ".tiff": ".tiff", ".png": ".png",
         ".jpg": ".png", ".jpeg": ".png", ".bmp": ".png", ".dcm": ".nii.gz", "": ".nii.gz",
         ".nrrd": ".seg.nrrd", ".nhdr": ".seg.nrrd", ".seg.nrrd": ".seg.nrrd"}


@dataclass(frozen=True)
class BatchJob:
    """What to segment and how.

    Args:
        input_dir, output_dir: folders; outputs mirror the inputs' relative paths and names.
        patterns: glob patterns (relative, e.g. "**/*.nii.gz"); default every file, recursively.
        output_format: "same" (NIfTI -> NIfTI, NRRD -> .seg.nrrd, PNG -> PNG, JPEG -> PNG, DICOM -> .nii.gz) or a
            suffix.
        model: checkpoint path or bundled name; None picks the bundled model by image kind.
        overwrite: recompute files whose output exists (default: skip them).
        prefetch: read the next file, and write the previous one, while the current one is on the device;
            None: only when the device is a GPU (on a CPU the I/O threads compete with the engine for cores:
            0.88x the throughput on 2 cores, benchmarks/bench_batch.py).
    """

    input_dir: Path
    output_dir: Path
    patterns: tuple[str, ...] = ("**/*",)
    output_format: str = "same"
    model: str | None = None
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    overwrite: bool = False
    prefetch: bool | None = None


@dataclass(frozen=True)
class BatchProgress:
    files_done: int
    files_total: int
    current: str
    slices_done: int = 0
    slices_total: int = 0
    result: FileResult | None = None      # set when a file has finished
    note: str = ""                        # the engine's word for the user (`Progress.note`)


@dataclass
class BatchSummary:
    results: list[FileResult]
    compute_seconds: float = 0.0          # time spent in the engine (the device busy)
    wall_seconds: float = 0.0

    @property
    def failures(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "failed"]


def check_folders(job: BatchJob) -> None:
    """Refuse (DaeformerError) an input that is no folder and an output folder that is the input or a file."""
    root = job.input_dir
    if not root.is_dir():
        raise DaeformerError(f"{root}: is a file, not a folder (segment one file with `daeformer segment`)"
                             if root.exists() else f"{root}: no such input folder")
    if root.resolve() == job.output_dir.resolve():
        raise DaeformerError(f"{job.output_dir}: the output folder is the input folder; label maps would replace or "
                             "mix with the images, so choose another output folder")
    if job.output_dir.exists() and not job.output_dir.is_dir():
        raise DaeformerError(f"{job.output_dir}: is a file, not a folder; choose an output folder")
    for pattern in job.patterns:
        if not pattern:
            raise DaeformerError("--pattern '': an empty pattern matches nothing; give one such as '**/*.nii.gz' "
                                 "(relative to the input folder)")
        if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
            raise DaeformerError(f"--pattern {pattern}: patterns are relative to the input folder and stay inside it "
                                 "(e.g. '**/*.nii.gz')")


@contextmanager
def sole_writer(job: BatchJob, rank: int = 0) -> Iterator[None]:
    """Check the folders, then hold the output folder for this rank while the block runs (segment and summary):
    a second batch on the same folder (CLI or dock) is refused at its start, naming the first one's pid."""
    check_folders(job)
    with exclusive(job.output_dir, f"batch-rank{rank}"):
        yield


def list_inputs(job: BatchJob) -> list[Path]:
    """Input files (and DICOM series folders) under `job.input_dir`, sorted; summaries, hidden files and the other
    files of a DICOM series folder (a README, thumbs.db; an image of a format we read, a NIfTI, is an input of its
    own) excluded."""
    root = job.input_dir
    check_folders(job)
    files: set[Path] = set()
    series: set[Path] = set()
    for pattern in job.patterns:
        for path in root.glob(pattern):
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or path.name == SUMMARY:
                continue
            if job.output_dir.resolve() in path.resolve().parents:
                continue
            if path.is_file():
                if path.suffix.lower() == ".dcm" or is_dicom_file(path):
                    series.add(path.parent)                # a DICOM series is one input: its folder
                else:
                    files.add(path)
    if root in series:                  # DICOM files at the root: the root is one series only when nothing else is
        inner = series - {root}
        others = sorted(inner | {f for f in files if f.parent not in inner})
        if others:                      # beside other inputs, each stray DICOM file is an input of its own
            strays = {p for pattern in job.patterns for p in root.glob(pattern)
                      if p.parent == root and p.is_file() and (p.suffix.lower() == ".dcm" or is_dicom_file(p))}
            return sorted({*others, *strays})
    return sorted(series | {f for f in files if f.parent not in series or suffix_of(f) in READ_SUFFIXES})


def output_paths(job: BatchJob, sources: list[Path]) -> dict[Path, Path | str]:
    """Each source's output path, or the reason it has none. Sources that would share an output (`dup.jpg` and
    `dup.png`, a folder `series2/` beside `series2.nii.gz`) keep their suffix in the name (`dup_jpg.png`,
    `dup_png.png`); if names still clash, each of those sources gets a reason instead of a path."""
    plain = {source: _output_path(job, source, False) for source in sources}
    counts = Counter(plain.values())
    outputs = {source: _output_path(job, source, counts[out] > 1) for source, out in plain.items()}
    counts = Counter(outputs.values())
    inputs = {source.resolve() for source in sources}
    result: dict[Path, Path | str] = {}
    for source, out in outputs.items():
        if counts[out] > 1:
            others = sorted(str(s.relative_to(job.input_dir)) for s, o in outputs.items() if o == out and s != source)
            result[source] = (f"output name collision: {out.relative_to(job.output_dir)} would also be written for "
                              f"{', '.join(others)}; rename one of them")
        elif out.resolve() in inputs:
            result[source] = f"its output {out} would replace an input file; choose another output folder"
        else:
            result[source] = out
    return result


def _output_path(job: BatchJob, source: Path, keep_suffix: bool) -> Path:
    rel = source.relative_to(job.input_dir) if source != job.input_dir else Path(source.resolve().name)
    suffix = suffix_of(source) if source.is_file() else ""
    new = _SAME.get(suffix, ".nii.gz") if job.output_format == "same" else job.output_format
    name = rel.name[: len(rel.name) - len(suffix)] if suffix else rel.name
    if keep_suffix:
        name += "_" + (suffix.lstrip(".").replace(".", "_") or "dicom")
    return job.output_dir / rel.parent / f"{name}{new}"


class _Inferers:
    """One inferer per checkpoint file, made once (a static int8 package is then built or loaded once per run); the
    bundled model for each image kind when no model was chosen."""

    def __init__(self, job: BatchJob) -> None:
        self.job = job
        self.cache: dict[Path, SliceInferer] = {}

    def for_record(self, record: ImageRecord) -> SliceInferer:
        return self.for_kind("skin" if record.rgb else "ct")

    def for_kind(self, kind: str) -> SliceInferer:
        path = resolve_model(self.job.model, kind)
        if path not in self.cache:
            self.cache[path] = SliceInferer(load_checkpoint(path), device=self.job.device,
                                            precision=self.job.precision, batch_size=self.job.batch_size)
        return self.cache[path]


def _read(path: Path) -> ImageRecord | ImageFormatError:
    try:
        return read_image(path)
    except ImageFormatError as e:
        return e


def run_batch(job: BatchJob, *, rank: int = 0, world_size: int = 1,
              cancel: threading.Event | None = None) -> Generator[BatchProgress, None, BatchSummary]:
    """Segment this rank's share of the inputs (files[rank::world_size]). Cancel stops after the current file."""
    start = time.perf_counter()
    overlap = job.prefetch if job.prefetch is not None else resolve_device(job.device).type != "cpu"
    inputs = list_inputs(job)
    outputs = output_paths(job, inputs)                 # over all inputs: every rank names files alike
    files = inputs[rank::world_size]
    if job.output_dir.is_dir():
        remove_stale_temporaries(job.output_dir, recursive=True)
    earlier = read_earlier(job.output_dir)
    results: list[FileResult] = []
    compute = 0.0
    todo, finished = [], []
    for source in files:
        out = outputs[source]
        if isinstance(out, str):
            results.append(FileResult(input=str(source.relative_to(job.input_dir)), output="", status="failed", reason=out))
        elif out.exists() and not job.overwrite:
            finished.append((source, out))
        else:
            todo.append((source, out))
    models = _Inferers(job)
    results += [_existing(job, source, out, models, earlier) for source, out in finished]
    done = len(results)
    total = len(files)
    yield BatchProgress(done, total, "")
    # Reads run ahead (two files, in parallel: gzip decoding is the usual bottleneck) on GPU runs.
    readers = ThreadPoolExecutor(max_workers=READ_AHEAD) if overlap else None
    ahead: deque[tuple[Path, Path, Future[ImageRecord | ImageFormatError]]] = deque()
    queued = iter(todo)

    def read_ahead() -> None:
        while readers is not None and len(ahead) < READ_AHEAD and (item := next(queued, None)) is not None:
            ahead.append((item[0], item[1], readers.submit(_read, item[0])))

    # Writes (compression, fsync) overlap the next file's segmentation; results come out in input order.
    writer = ThreadPoolExecutor(max_workers=1) if overlap else None
    pending: list[tuple[Future[Path] | None, FileResult]] = []

    def settle(block: bool) -> Generator[BatchProgress, None, None]:
        nonlocal done
        while pending and (block or pending[0][0] is None or pending[0][0].done()):
            future, result = pending.pop(0)
            try:
                if future is not None:
                    future.result()
            except (DaeformerError, OSError) as e:            # the writer refused, or the disk did: this file failed
                result = FileResult(input=result.input, output="", status="failed", seconds=result.seconds,
                                    reason=f"writing the output failed: {first_line(e)}")
            results.append(result)
            write_summary(job.output_dir, results, PROGRESS.format(rank=rank))   # a killed run keeps what it measured
            done += 1
            yield BatchProgress(done, total, result.input, result=result)

    try:
        for source, out in todo:
            if cancel is not None and cancel.is_set():
                break
            if readers is not None:
                read_ahead()
                _, _, pending_read = ahead.popleft()
                read_ahead()                                  # the next reads start while this file computes
                record = pending_read.result()
            else:
                record = _read(source)
            rel = str(source.relative_to(job.input_dir))
            t0 = time.perf_counter()
            future: Future[Path] | None = None
            try:
                if isinstance(record, ImageFormatError):
                    raise record
                gen = segment_file(models.for_record(record), record, out, overwrite=job.overwrite,
                                   slice_uncertainty=True, writer=writer)
                while True:
                    try:
                        p: Progress = next(gen)
                    except StopIteration as finished:
                        report: FileReport = finished.value
                        break
                    yield BatchProgress(done, total, rel, p.done, p.total, note=p.note)
                compute += time.perf_counter() - t0
                future = report.written
                result = FileResult(input=rel, output=str(out.relative_to(job.output_dir)), status="done", shape=record.spatial_shape,
                                    spacing=record.spacing, seconds=time.perf_counter() - t0, measures=report.measures.values,
                                    unit=report.measures.unit, checkpoint=report.checkpoint,
                                    checkpoint_sha256=report.checkpoint_sha256, mean_entropy=report.mean_entropy,
                                    uncertain_slice=report.uncertain_slice)
            except (DaeformerError, OSError) as e:            # one file's failure never ends the run (a bug does)
                result = FileResult(input=rel, output="", status="failed", reason=first_line(e), seconds=time.perf_counter() - t0)
            pending.append((future, result))
            yield from settle(block=False)
        yield from settle(block=True)
    finally:
        if writer is not None:
            writer.shutdown(wait=True)                        # never leave a write half done
        if readers is not None:
            readers.shutdown(wait=True, cancel_futures=True)
    results.sort(key=lambda r: r.input)
    return BatchSummary(results, compute, time.perf_counter() - start)


def _existing(job: BatchJob, source: Path, out: Path, models: _Inferers, earlier: dict[str, FileResult]
              ) -> FileResult:
    """A finished output from an earlier run: measured from the file, not recomputed; its seconds, uncertainty and
    the checkpoint that made it are the earlier run's (from its summary), or unknown (not this run's model)."""
    rel, rel_out = str(source.relative_to(job.input_dir)), str(out.relative_to(job.output_dir))
    try:
        labels = read_image(out)
        data = label_channel(labels.data, len(labels.spatial_shape))
        photo = job.model is None and suffix_of(source) in (".png", ".jpg", ".jpeg", ".bmp")
        card = models.for_kind("skin" if photo and read_image(source).rgb else "ct").checkpoint.card
        measures = Measures.of(data, labels.spacing, labels.source_format, card.class_names)
        before = earlier.get(rel, FileResult(input=rel, output=rel_out, status="existing"))
        return FileResult(input=rel, output=rel_out, status="existing", shape=tuple(data.shape), spacing=labels.spacing,
                          seconds=before.seconds, measures=measures.values, unit=measures.unit,
                          checkpoint=before.checkpoint, checkpoint_sha256=before.checkpoint_sha256,
                          mean_entropy=before.mean_entropy, uncertain_slice=before.uncertain_slice)
    except (DaeformerError, OSError) as e:
        return FileResult(input=rel, output=rel_out, status="failed", reason=f"existing output unreadable: {first_line(e)}")
