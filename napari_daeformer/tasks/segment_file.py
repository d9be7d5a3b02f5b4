"""The one "segment a file" use case: segment an image with a `SliceInferer`, measure its classes, and write the
label map beside the source's geometry. `daeformer segment`, batch (CLI and dock) and the Segment dock all run it,
so a file gives the same labels and the same report whichever way it was segmented.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from napari_daeformer import __version__
from napari_daeformer.base.volumes import Measures
from napari_daeformer.engine.inference import Progress, Segmentation, SliceInferer
from napari_daeformer.io import ImageRecord, check_label_path, suffix_of, write_labels
from napari_daeformer.io.dicom_seg import SEG_SUFFIX, Algorithm, write_dicom_seg
from napari_daeformer.io.orientation import for_display, to_storage
from napari_daeformer.io.record import require_image
from napari_daeformer.model.checkpoint import Checkpoint, file_sha256


@dataclass
class FileReport:
    """What segmenting one image gave: its labels and what is said of them.

    Args:
        segmentation: the engine's output (labels ([Z,] Y, X) uint8, per-slice uncertainty, the path that ran).
        measures: per-class volumes or areas of the labels.
        checkpoint, checkpoint_sha256: the model file that made them.
        seconds: segmenting and measuring (not writing) time.
        written: the written label file (a `Future`: batch writes while the next file computes); None when only
            segmented.
    """

    segmentation: Segmentation
    measures: Measures
    checkpoint: str
    checkpoint_sha256: str
    seconds: float
    written: Future[Path] | None = field(default=None, repr=False)

    @property
    def labels(self) -> np.ndarray:
        return self.segmentation.labels

    @property
    def mean_entropy(self) -> float | None:
        """Mean predictive entropy (nats) over the image: the model's doubt (with `slice_uncertainty`)."""
        per_slice = self.segmentation.slice_uncertainty
        return None if per_slice is None else float(per_slice.mean())

    @property
    def uncertain_slice(self) -> int | None:
        """The slice (along the run's axis) with the highest mean entropy (with `slice_uncertainty`)."""
        per_slice = self.segmentation.slice_uncertainty
        return None if per_slice is None else int(per_slice.argmax())


@lru_cache(maxsize=16)
def _sha256(path: Path, mtime_ns: int, size: int) -> str:
    return file_sha256(path)


def made_by(checkpoint: Checkpoint) -> tuple[str, str]:
    """The checkpoint's file name and SHA-256 (hashed once per file version); ("model", "") for one in memory."""
    if checkpoint.path is None:
        return "model", ""
    stat = checkpoint.path.stat()
    return checkpoint.path.name, _sha256(checkpoint.path, stat.st_mtime_ns, stat.st_size)


def segment_record(inferer: SliceInferer, record: ImageRecord, *, axis: int = 0, slice_uncertainty: bool = False,
                   only: np.ndarray | None = None, first: int | None = None, cancel: threading.Event | None = None
                   ) -> Generator[Progress, None, FileReport]:
    """Segment `record` (yielding the engine's progress) and measure its classes; `only`/`first`/`cancel` as in
    `SliceInferer.run`."""
    require_image(record, record.path.name if record.path else "image")
    t0 = time.perf_counter()
    result = yield from inferer.run(record, axis=axis, slice_uncertainty=slice_uncertainty, only=only, first=first,
                                    cancel=cancel)
    card = inferer.checkpoint.card
    measures = Measures.of(result.labels, record.spacing, record.source_format, card.class_names)
    return FileReport(result, measures, *made_by(inferer.checkpoint), time.perf_counter() - t0)


def write_output(path: Path, labels: np.ndarray, record: ImageRecord, checkpoint: Checkpoint, *,
                 overwrite: bool = False) -> Path:
    """Write `labels` to `path` with `record`'s geometry and the model's class names and colours; a `.dcm` path is
    a DICOM-SEG referencing the source series and naming the model."""
    card = checkpoint.card
    if suffix_of(path) == SEG_SUFFIX:
        algorithm = Algorithm(*made_by(checkpoint), __version__)
        return write_dicom_seg(path, labels, record.path, card.class_names, card.class_colors, algorithm,
                               overwrite=overwrite)
    return write_labels(path, labels, record, overwrite=overwrite, class_names=card.class_names,
                        class_colors=card.class_colors)


def segment_file(inferer: SliceInferer, record: ImageRecord, output: Path, *, axis: int = 0,
                 overwrite: bool = False, slice_uncertainty: bool = False, writer: Executor | None = None,
                 cancel: threading.Event | None = None) -> Generator[Progress, None, FileReport]:
    """Segment `record` as the viewer shows it (`io.orientation`: its per-slice uncertainty counts those slices),
    measure it and write its labels to `output` in the source's voxel order (refused before any work where the write
    would be). With a `writer`, the write runs there and `report.written` completes when it is done; its error,
    if any, is raised by `report.written.result()`."""
    check_label_path(output, len(record.spatial_shape), overwrite=overwrite, source=record.path,
                     dicom_source=record.source_format == "dicom")
    shown, stored = for_display(record)           # the model sees the scan as the viewer shows it (radiological)
    report = yield from segment_record(inferer, shown, axis=axis, slice_uncertainty=slice_uncertainty, cancel=cancel)
    if stored is not None:                         # written in the source's own voxel order
        report.segmentation = replace(report.segmentation, labels=to_storage(report.labels, stored)[0])
    write: Callable[[], Path] = lambda: write_output(output, report.labels, record, inferer.checkpoint,  # noqa: E731
                                                     overwrite=overwrite)
    if writer is not None:
        report.written = writer.submit(write)
    else:
        report.written = Future()
        report.written.set_result(write())
    return report
