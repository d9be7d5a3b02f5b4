"""The "Batch segment folder" dock widget: a thin layer over `napari_daeformer.tasks.batch.run_batch`."""

from __future__ import annotations

import html
import threading
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import CheckBox, ComboBox, FileEdit, Label, LineEdit, ProgressBar, PushButton, Table
from napari.utils.notifications import show_info, show_warning
from qtpy.QtWidgets import QStyledItemDelegate

from napari_daeformer.base.errors import DaeformerError, InferenceError
from napari_daeformer.io import read_image
from napari_daeformer.io.orientation import for_display
from napari_daeformer.model.bundled import BUNDLED, resolve_model
from napari_daeformer.model.checkpoint import read_card
from napari_daeformer.plugin.reader import record_to_layer
from napari_daeformer.plugin.widgets._layers import attach, image_identity, labels_kwargs
from napari_daeformer.plugin.widgets._workers import WorkerWidget, collapsible, device_picker, failure_message, guarded, row
from napari_daeformer.session.annotation import Annotation, image_key
from napari_daeformer.tasks.batch import (
    OUTPUT_FORMATS,
    BatchJob,
    BatchProgress,
    BatchSummary,
    run_batch,
    sole_writer,
)
from napari_daeformer.tasks.summary import FileResult, ranked, write_summary

if TYPE_CHECKING:
    import napari

AUTO_MODEL = "bundled, by image kind (demo)"
FILE_MODEL = "checkpoint file…"
COLUMNS = ["file", "status", "uncertainty", "measures", "reason"]   # what to review first; the reason stretches
MAX_COLUMN_PX = 95            # wider text is elided; the whole row (and the seconds it took) is in its tooltip
FAILED_COLOUR = "#e0605a"


def _batch_and_summarise(job: BatchJob, cancel: threading.Event
                         ) -> Generator[BatchProgress, None, tuple[BatchSummary, Path]]:
    with sole_writer(job):
        summary = yield from run_batch(job, cancel=cancel)
        return summary, write_summary(job.output_dir, summary.results)


_batch_job = guarded(_batch_and_summarise, InferenceError, "batch segmentation")


def _measures_text(result: FileResult) -> str:
    """"liver 166.5, spleen 18.8 mL" (classes with a non-zero measure)."""
    parts = [f"{name} {value:.1f}" for name, value in result.measures.items() if value]
    return f"{', '.join(parts)} {result.unit}" if parts else ""


def _short_path(relative: str, limit: int = 24) -> str:
    """A long relative path keeps its file name in view: 'photos/…/lesion1.png' loses its folders first."""
    path = Path(relative)
    return relative if len(relative) <= limit or len(path.parts) == 1 else f"…/{path.name}"


class BatchWidget(WorkerWidget):
    """Segment a whole folder in the background; finished files appear in a table and open in one click."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._input = FileEdit(label="input folder", mode="d", tooltip="Searched recursively")
        self._output = FileEdit(label="output folder", mode="d",
                                tooltip="Label maps with the inputs' relative names, and summary.csv")
        self._model = ComboBox(label="model", choices=[AUTO_MODEL, *BUNDLED, FILE_MODEL], value=AUTO_MODEL,
                               tooltip="Bundled models are demonstrations trained on synthetic data")
        self._file = FileEdit(label="checkpoint", filter="*.safetensors", visible=False,
                              tooltip="A napari-daeformer checkpoint (.safetensors)")
        self._pattern = LineEdit(label="pattern", value="**/*", tooltip="Glob relative to the input folder")
        self._format = ComboBox(label="output format", choices=list(OUTPUT_FORMATS), value="same",
                                tooltip="same: NIfTI -> NIfTI, PNG/JPEG -> PNG, DICOM -> .nii.gz")
        self._device = device_picker()
        self._overwrite = CheckBox(label="recompute existing outputs", value=False,
                                   tooltip="Off: files whose output exists are skipped (a stopped run resumes)")
        self._run = PushButton(text="Run", tooltip="Segment every file in the background")
        self._cancel = PushButton(text="Cancel", enabled=False, tooltip="Stop after the current file")
        self._files_bar = ProgressBar(label="files", value=0, min=0, max=1)
        self._slices_bar = ProgressBar(label="current file", value=0, min=0, max=1)
        self._table = Table(value={"data": [], "index": [], "columns": COLUMNS}, label="",
                            tooltip="Finished files; hover a row for its full path, reason and measures")
        self._rank = CheckBox(label="most uncertain first", value=True,
                              tooltip="Order the table by uncertainty (mean predictive entropy): the cases the model "
                                      "is least sure of, to review first")
        self._open = PushButton(text="Open selected pair", tooltip="Add the selected image and its labels to the viewer")
        self._next_case = PushButton(text="Open next uncertain case", enabled=False,
                                     tooltip="Open the most uncertain case not opened yet, at its most uncertain slice")
        self._status = self._wrap(Label(value=""))
        self.extend([self._input, self._output, self._model, self._file,
                     collapsible("More settings", [self._pattern, self._format, self._device, self._overwrite]),
                     row(self._run, self._cancel), self._files_bar, self._slices_bar, self._rank,
                     self._table, row(self._open, self._next_case), self._status])
        self._tidy()
        self._model.changed.connect(lambda v: setattr(self._file, "visible", v == FILE_MODEL))
        self._run.clicked.connect(self._start)
        self._cancel.clicked.connect(self.cancel)
        self._open.clicked.connect(lambda: self.open_selected())        # clicked's `False` is no row
        self._next_case.clicked.connect(self.open_next_uncertain)
        self._rank.changed.connect(lambda _: self._show_table())
        self._plain = QStyledItemDelegate(self._table.native)           # magicgui's would print 0.0230 as 2.300e-02
        self._table.native.setItemDelegateForColumn(COLUMNS.index("uncertainty"), self._plain)
        self._table.native.verticalHeader().setVisible(False)             # rows are not numbered: saves width
        self._cancel_event = threading.Event()
        self.results: list[FileResult] = []
        self.opened: set[str] = set()                                    # inputs opened by "next uncertain case"
        self.job: BatchJob | None = None

    def _make_job(self) -> BatchJob:
        src, dst = Path(self._input.value), Path(self._output.value)
        if not src.is_dir() or str(self._input.value) in ("", "."):
            raise DaeformerError("choose an input folder")
        if str(self._output.value) in ("", ".") or dst.resolve() == src.resolve():
            raise DaeformerError("choose an output folder different from the input folder")
        model = None if self._model.value == AUTO_MODEL else (
            str(self._file.value) if self._model.value == FILE_MODEL else self._model.value)
        return BatchJob(src, dst, (self._pattern.value or "**/*",), self._format.value, model, self._device.value,
                        overwrite=bool(self._overwrite.value))

    def _start(self) -> None:
        try:
            self.job = self._make_job()
        except DaeformerError as e:
            self.report(str(e))
            return
        self.results, self.opened = [], set()
        self._next_case.enabled = False
        self._table.value = {"data": [], "index": [], "columns": COLUMNS}
        self._cancel_event.clear()
        self._status.value = "Running…"
        self._launch(_batch_job, self.job, self._cancel_event, yielded=self._on_progress,
                     returned=lambda r: self._finish(*r), errored=self._failed)

    def _on_progress(self, p: BatchProgress) -> None:
        self._files_bar.max = max(p.files_total, 1)
        self._files_bar.value = p.files_done
        self._slices_bar.max = max(p.slices_total, 1)
        self._slices_bar.value = p.slices_done if p.result is None else self._slices_bar.max
        if p.note:
            self._status.value = html.escape(p.note)
        if p.result is not None:
            self.results.append(p.result)
            self._show_table()

    def _show_table(self) -> None:
        """One row per file (most uncertain first when ranking): mean predictive entropy, per-class volumes (or
        areas) as `measures`, the reason; the row's tooltip has the full path, reason, measures and seconds; failed
        rows in red. Every column but the reason is at most MAX_COLUMN_PX wide, so all begin on screen in a
        400-pixel dock."""
        from qtpy.QtGui import QColor
        from qtpy.QtWidgets import QHeaderView

        if self._rank.value:
            self.results = ranked(self.results)
        rows = [[_short_path(r.input), r.status, "" if r.mean_entropy is None else f"{r.mean_entropy:.4f}",
                 _measures_text(r), r.reason] for r in self.results]
        self._table.value = {"data": rows, "index": list(range(len(rows))), "columns": COLUMNS}
        table = self._table.native
        for i, (r, cells) in enumerate(zip(self.results, rows)):
            tip = "\n".join(x for x in (r.input, r.reason, cells[3], f"{r.seconds:.1f} s") if x)
            for j in range(len(COLUMNS)):
                item = table.item(i, j)
                if item is None:
                    continue
                item.setToolTip(tip)
                if r.status == "failed":
                    item.setForeground(QColor(FAILED_COLOUR))
        table.resizeColumnsToContents()
        for j in range(len(COLUMNS) - 1):
            table.setColumnWidth(j, min(table.columnWidth(j), MAX_COLUMN_PX))
        table.horizontalHeader().setSectionResizeMode(len(COLUMNS) - 1, QHeaderView.ResizeMode.Stretch)

    def _finish(self, summary: BatchSummary, csv_path: Path) -> None:
        self.results = list(summary.results)
        self._show_table()
        self._next_case.enabled = any(r.mean_entropy is not None for r in self.results)
        failed = len(summary.failures)
        cancelled = self._cancel_event.is_set()
        self._status.value = (f"{'Cancelled after the current file. ' if cancelled else ''}"
                              f"{sum(r.status == 'done' for r in summary.results)} segmented, "
                              f"{sum(r.status == 'existing' for r in summary.results)} already done, "
                              f"{failed} failed. Summary: {html.escape(str(csv_path))}")
        if failed:
            show_warning(f"DAE-Former batch: {failed} file(s) failed; see the table")
        else:
            show_info("DAE-Former batch finished")

    def _failed(self, error: BaseException) -> None:
        self._files_bar.value = self._slices_bar.value = 0
        self.report(f"batch segmentation failed: {failure_message(error)}")

    def cancel(self) -> None:
        """Stop after the file being segmented; finished outputs stay."""
        self._cancel_event.set()

    def open_selected(self, row: int | None = None) -> None:
        """Add the image and labels of a finished file (the selected table row) to the viewer."""
        if row is None:
            row = self._table.native.currentRow()
        finished = [r for r in self.results if r.status in ("done", "existing")]
        chosen = self.results[row] if 0 <= row < len(self.results) else None
        if chosen is None or chosen not in finished or self.job is None:
            self.report("select a finished file in the table first")
            return
        self.open_case(chosen)

    def open_next_uncertain(self) -> None:
        """Open the most uncertain finished case not opened this way yet, at its most uncertain slice."""
        waiting = [r for r in ranked(self.results) if r.mean_entropy is not None and r.input not in self.opened]
        if not waiting:
            self._status.value = "Every ranked case has been opened; run the batch again to rank new ones."
            show_info(f"DAE-Former batch: {self._status.value}")
            return
        self.open_case(waiting[0])
        self._status.value = (f"Opened {html.escape(waiting[0].input)} (mean entropy {waiting[0].mean_entropy:.4f}), slice "
                              f"{waiting[0].uncertain_slice}; {len(waiting) - 1} more to review.")

    def open_case(self, chosen: FileResult) -> None:
        """Add a finished file's image and labels to the viewer, showing its most uncertain slice when known."""
        assert self.job is not None
        try:
            record = read_image(self.job.input_dir / chosen.input)
            labels = read_image(self.job.output_dir / chosen.output)
        except DaeformerError as e:
            self.report(str(e))
            return
        self.opened.add(chosen.input)                   # by the button or the table: "next" skips it
        data, kwargs, _ = record_to_layer(record)
        image = self.viewer.add_image(data, **kwargs)
        model = resolve_model(self.job.model, "skin" if record.rgb else "ct")
        card = read_card(model)
        prediction = for_display(labels)[0].data.astype("uint8", copy=False)    # turned as its image is
        layer = self.viewer.add_labels(prediction, **{**labels_kwargs(image, card.class_names, card.class_colors,
                                                                       prediction.ndim, chosen.checkpoint,
                                                                       chosen.checkpoint_sha256),
                                                      "name": f"{image.name} labels"})
        attach(self.viewer, layer, Annotation(image=image_identity(image, image_key(data)), layer_name=layer.name,
                                              class_names=tuple(card.class_names), class_colors=tuple(card.class_colors),
                                              prediction=prediction.copy(), checkpoint=chosen.checkpoint,
                                              checkpoint_sha256=chosen.checkpoint_sha256, checkpoint_path=str(model)))
        if chosen.uncertain_slice is not None and prediction.ndim == 3:      # a slice as shown (`segment_file`)
            self.viewer.dims.set_current_step(self.viewer.dims.ndim - 3, chosen.uncertain_slice)
