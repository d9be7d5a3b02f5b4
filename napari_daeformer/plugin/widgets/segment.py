"""The "Segment with DAE-Former" dock widget: image layer in, a new editable Labels layer out."""

from __future__ import annotations

import html
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FileEdit, FloatSpinBox, Label, ProgressBar, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.utils.notifications import show_info, show_warning

from napari_daeformer.base.errors import Cancelled, DaeformerError, InferenceError
from napari_daeformer.base.volumes import Measures
from napari_daeformer.engine.devices import PRECISIONS
from napari_daeformer.engine.inference import Progress, SliceInferer, check_compatible, image_warnings
from napari_daeformer.io import ImageRecord
from napari_daeformer.io.record import CLASSES_KEY
from napari_daeformer.model.bundled import bundled_model
from napari_daeformer.model.checkpoint import MAX_WEIGHT, Checkpoint
from napari_daeformer.plugin.control.segment import Offer, Run, SegmentController, dock_inferer, summary_html
from napari_daeformer.plugin.hub import hub_for
from napari_daeformer.plugin.widgets._layers import (
    attach,
    engine_writes,
    follow,
    image_identity,
    labels_kwargs,
    proposals_first,
    record_from_layer,
)
from napari_daeformer.plugin.widgets._workers import WorkerWidget, collapsible, device_picker, failure_message, guarded, row
from napari_daeformer.plugin.widgets.autosave import Autosaver
from napari_daeformer.plugin.widgets.restore import SessionRestore
from napari_daeformer.session.annotation import (
    ENV_FOLDER,
    USER_FOLDER,
    session_path,
)
from napari_daeformer.tasks.segment_file import FileReport, segment_record

if TYPE_CHECKING:
    import napari
    from napari.qt.threading import GeneratorWorker

BUNDLED_CHOICES = {"bundled CT demo (synthetic)": "ct", "bundled skin demo (synthetic)": "skin"}
FILE_CHOICE = "checkpoint file…"
MODES = ("new labels layer", "only slices not yet corrected")
PHOTO_OPACITY = 0.45                      # a photo's mask must not hide the lesion it outlines
_segment_job = guarded(lambda inferer, record, options: segment_record(inferer, record, **options), InferenceError,
                       "segmentation")


@dataclass
class RunTarget:
    """A run's labels layer and what the controller planned for it."""

    layer: Labels
    run: Run


class SegmentWidget(SessionRestore, WorkerWidget):
    """Choose an image and a model, press Run: a new uint8 Labels layer fills slice by slice."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._image = ComboBox(label="image", choices=self._image_layers,
                               tooltip="The image layer to segment (CT volume or photo)")
        self._model = ComboBox(label="model", choices=[*BUNDLED_CHOICES, FILE_CHOICE],
                               tooltip="The bundled models are demonstrations trained on synthetic data; "
                               "train or import a real model for real scans")
        self._file = FileEdit(label="checkpoint", filter="*.safetensors", visible=False,
                              tooltip="A napari-daeformer checkpoint (.safetensors)")
        self._device = device_picker()
        self._axis = SpinBox(label="slice axis", min=0, max=2, value=0,
                             tooltip="Array axis to slice along (0 = axial for NIfTI and DICOM)")
        self._lower = FloatSpinBox(label="window low (HU)", min=-3000, max=5000, step=5, value=-125,
                                   tooltip="CT window lower bound; prefilled from the checkpoint")
        self._upper = FloatSpinBox(label="window high (HU)", min=-3000, max=5000, step=5, value=275,
                                   tooltip="CT window upper bound; prefilled from the checkpoint")
        self._neighbours = FloatSpinBox(label="neighbouring slices", min=0.0, max=MAX_WEIGHT, step=0.05, value=0.0,
                                        tooltip="Each neighbouring slice's share of a slice's class probabilities "
                                        "(0: each slice alone); prefilled from the checkpoint: a new model "
                                        "taught on a volume sets it")
        self._batch = SpinBox(label="batch size", min=0, max=256, value=0,
                              tooltip="Slices per forward pass; 0 = what fits the device")
        self._precision = ComboBox(label="precision", choices=list(PRECISIONS), value="auto",
                                   tooltip="auto: the fastest path measured to keep the labels (bf16 on GPUs and "
                                   "CPUs with native bf16, else fp32). int8 compiles a static int8 model for this CPU "
                                   "on first use (about 1 min on 2 idle cores, 3-4 busy; cached); it was measured "
                                   "slower than fp32 for whole runs of the bundled models, so auto never picks it")
        self._mode = ComboBox(label="mode", choices=list(MODES), value=MODES[0],
                              tooltip="'only slices not yet corrected' re-segments the chosen labels layer "
                              "around your edits and keeps every slice you changed")
        self._target = ComboBox(label="labels layer", choices=self._labels_layers, visible=False,
                                tooltip="The labels layer to update in place (one Ctrl+Z undoes the run)")
        self._uncertain = CheckBox(label="rank uncertain slices", value=True,
                                   tooltip="Also compute each slice's mean predictive entropy")
        self._run = PushButton(text="Run", tooltip="Segment the image (runs in the background)")
        self._cancel = PushButton(text="Cancel", enabled=False, tooltip="Stop after the current batch")
        self._progress = ProgressBar(label="progress", value=0, min=0, max=1, visible=True)
        self._next = PushButton(text="Next uncertain slice", enabled=False,
                                tooltip="Jump to the slice with the highest mean predictive entropy not yet visited")
        self._status = self._wrap(Label(value="Demonstration models: trained on synthetic data, not for clinical use."))
        self._autosave_dir = FileEdit(label="autosave folder", mode="d",
                                      tooltip="Where corrections are saved while you paint (empty: beside the image "
                                      f"file, else {USER_FOLDER}; ${ENV_FOLDER} overrides)")
        self._restore_info = self._wrap(Label(value="", visible=False))
        self._restore = PushButton(text="Restore corrections", visible=False,
                                   tooltip="Bring back the labels, the corrected slices and the model of the session "
                                           "autosaved for this image")
        self._discard = PushButton(text="Discard", visible=False, tooltip="Delete the autosaved session of this image")
        self.extend([self._image, self._model, self._file, self._device, self._lower, self._upper, self._mode,
                     self._target, collapsible("More settings", [self._axis, self._neighbours, self._batch, self._precision,
                                                                  self._autosave_dir]),
                     row(self._run, self._cancel), self._progress, row(self._uncertain, self._next), self._restore_info,
                     row(self._restore, self._discard), self._status])
        self._tidy()
        self._image.changed.connect(self._image_changed)
        self._model.changed.connect(self._model_changed)
        self._model.native.activated.connect(self._model_picked)     # a user's choice, not a programmatic one
        self._file.changed.connect(self._model_changed)
        self._mode.changed.connect(lambda v: setattr(self._target, "visible", v == MODES[1]))
        self._run.clicked.connect(self._start)
        self._cancel.clicked.connect(self.cancel)
        self._next.clicked.connect(self._jump_to_uncertain)
        self._restore.clicked.connect(self.restore_session)
        self._discard.clicked.connect(self._discard_session)
        self.viewer.layers.events.removed.connect(self._layer_removed)
        self.viewer.layers.events.inserted.connect(self._layer_inserted)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(lambda _: self.reset_choices())
        self._cancel_event = threading.Event()
        self._target_running: RunTarget | None = None
        self.hub = hub_for(self.viewer)
        self.hub.register(self)
        self.control = SegmentController()
        self._uncertain_order: list[int] = []
        self._model_chosen = False            # set once the user picks a model: then never switched for them
        self.autosavers: dict[str, Autosaver] = {}      # labels layer's unique_id -> its autosaver
        self._session: tuple[Image, Offer] | None = None  # the image and the autosaved session on offer
        self._keys: dict[str, tuple[Any, str]] = {}       # image layer unique_id -> (its data, image_key)
        self._model_changed()
        self._image_changed(self._image.value)

    # ---- choices -------------------------------------------------------------------------------------
    def _image_layers(self, _: Any = None) -> list[Image]:
        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _labels_layers(self, _: Any = None) -> list[Labels]:
        return proposals_first(self.viewer)

    def _image_changed(self, layer: Image | None = None) -> None:
        """A photo is one slice: no slice axis and no slice ranking. Until the user picks a model, the bundled one
        that fits the image kind is chosen."""
        volume = layer is not None and (np.ndim(layer.data) - (1 if layer.rgb else 0)) == 3
        self._axis.visible = self._uncertain.visible = self._next.visible = volume
        if layer is not None and not self._model_chosen and self._model.value != FILE_CHOICE:
            kind = "skin" if layer.rgb else "ct"
            fitting = next(name for name, k in BUNDLED_CHOICES.items() if k == kind)
            if self._model.value != fitting:
                self._model.value = fitting

        self._offer_restore(layer)

    def _layer_inserted(self, event: Any) -> None:
        """An image opened while the dock is open: if it has an autosaved session, select it so the offer shows."""
        layer = event.value
        if isinstance(layer, Image) and layer is not self._image.value and self._unrestored(layer):
            self.reset_choices()
            self._image.value = layer

    def _layer_removed(self, event: Any) -> None:
        """A labels layer deleted: its autosave stops (its file stays, offered again); deleted mid-run: the run
        is cancelled."""
        layer = event.value
        saver = self.autosavers.pop(layer.unique_id, None)
        if saver is not None:
            saver.close()
        self.hub.forget(layer.unique_id)
        if self._target_running is not None and self._target_running.layer.unique_id == layer.unique_id:
            self.cancel()

    def _model_picked(self, _: int) -> None:
        self._model_chosen = True

    # ---- public API (used by the fine-tune widget) ---------------------------------------------------
    def checkpoint_path(self) -> Path:
        choice = self._model.value
        if choice == FILE_CHOICE:
            return Path(self._file.value)
        return bundled_model(BUNDLED_CHOICES[choice])

    def offer_model(self, path: Path, note: str) -> None:
        """The hub's hand-off (a fine-tuned model, a revert): use `path` from the next run on, and say so."""
        self.set_checkpoint(path)
        self._status.value = html.escape(note)

    def set_checkpoint(self, path: str | Path) -> None:
        """Use this checkpoint for the next runs (a bundled model's file selects its entry)."""
        path = Path(path)
        bundled = {bundled_model(kind).resolve(): name for name, kind in BUNDLED_CHOICES.items()}
        self._model_chosen = True
        if path.resolve() in bundled:
            self._model.value = bundled[path.resolve()]
        else:
            self._model.value = FILE_CHOICE
            self._file.value = path
        self._model_changed()

    def segment_into_new_layer(self, image: Image) -> GeneratorWorker | None:
        """Segment `image` with the current model into a new labels layer; the worker, or None if refused."""
        self._mode.value = MODES[0]
        self._image.value = image
        return self._start()

    def _model_changed(self, _: Any = None) -> None:
        self._file.visible = self._model.value == FILE_CHOICE
        self.control.choose(self.checkpoint_path())
        self._status.value = html.escape(self.control.describe())
        try:
            card = self.control.load().card
        except DaeformerError:
            return
        preprocessing = card.preprocessing
        self._neighbours.value = card.neighbour_weight
        self._lower.visible = self._upper.visible = preprocessing.kind == "ct"
        if preprocessing.kind == "ct" and preprocessing.window:
            self._lower.value, self._upper.value = preprocessing.window

    # ---- running -------------------------------------------------------------------------------------
    def _start(self) -> GeneratorWorker | None:
        image = self._image.value
        if image is None:
            self.report("add or open an image layer to segment first")
            return None
        try:
            checkpoint = self.control.load()
            record = record_from_layer(image)
            check_compatible(record.data, record.rgb, checkpoint, axis=int(self._axis.value))
            inferer = self._inferer(checkpoint)
            options = self._run_options(record)
        except (DaeformerError, ValueError) as e:
            self.report(failure_message(e))
            return None
        for warning in image_warnings(record.data):
            show_warning(f"DAE-Former: {image.name}: {warning}")
        target = self._prepare_target(image, checkpoint, record, options["only"])
        self._target_running = target
        self.hub.register(self)                                # the dock used last
        self._cancel_event.clear()
        self._progress.value = 0
        self._uncertain_order = []
        self._next.enabled = False
        self._status.value = f"Segmenting {html.escape(image.name)}…"
        return self._launch(_segment_job, inferer, record, {**options, "cancel": self._cancel_event},
                            yielded=lambda p: self._show_progress(target, p),
                            returned=lambda report: self._finish(target, report, record),
                            errored=lambda e: self._failed(target, e), aborted=lambda: self._failed(target, None))

    def _inferer(self, checkpoint: Checkpoint) -> SliceInferer:
        window = (self.control.window(float(self._lower.value), float(self._upper.value))
                  if checkpoint.card.preprocessing.kind == "ct" else None)
        return dock_inferer(checkpoint, self._device.value, int(self._batch.value), self._precision.value, window,
                            float(self._neighbours.value))

    def _run_options(self, record: ImageRecord) -> dict[str, Any]:
        """`segment_record`'s options: the axis, the slice on screen first, the uncorrected slices in partial
        mode, per-slice uncertainty if asked for."""
        axis = int(self._axis.value)
        first = None
        if len(record.spatial_shape) == 3 and self.viewer.dims.ndim >= 3:        # the slice on screen fills first
            first = int(self.viewer.dims.current_step[self.viewer.dims.ndim - 3 + axis])
        only = None
        if self._mode.value == MODES[1]:
            target = self._target.value
            if target is None:
                raise DaeformerError("choose the labels layer to update, or use mode 'new labels layer'")
            only = self.control.uncorrected(follow(self.viewer, target), np.asarray(target.data), record.spatial_shape,
                                            axis, target.name)
        return {"axis": axis, "first": first, "only": only, "slice_uncertainty": bool(self._uncertain.value)}

    def _prepare_target(self, image: Image, checkpoint: Checkpoint, record: ImageRecord,
                        only: np.ndarray | None) -> RunTarget:
        """Where the run writes: a new layer (added now, so slices appear live) or the chosen one."""
        axis = int(self._axis.value)
        folder = self.autosave_folders(image)[0]
        made_by = self.control.made_by()
        identity = image_identity(image, self._image_key(image))
        if self._mode.value == MODES[1] and only is not None:
            layer = self._target.value
            return RunTarget(layer, self.control.partial_run(follow(self.viewer, layer), np.asarray(layer.data), only,
                                                             identity, axis, folder, made_by))
        card = checkpoint.card
        kwargs = labels_kwargs(image, card.class_names, card.class_colors, len(record.spatial_shape), made_by[0],
                               made_by[1])
        if record.rgb:
            kwargs["opacity"] = PHOTO_OPACITY
        run, empty = self.control.new_run(identity, kwargs["name"], record.spatial_shape, axis, folder, made_by)
        layer = self.viewer.add_labels(empty, **kwargs)
        run.annotation.layer_name = layer.name
        attach(self.viewer, layer, run.annotation)
        return RunTarget(layer, run)

    def _show_progress(self, target: RunTarget, p: Progress) -> None:
        """Show finished slices at once (no undo history yet: `_finish` records the run as one step); a one-time
        compile shows a busy bar."""
        self._progress.max = 0 if p.busy else p.total
        self._progress.value = 0 if p.busy else p.done
        if p.note:
            self._status.value = html.escape(p.note)
        layer = target.layer
        if layer in self.viewer.layers and target.run.show(np.asarray(layer.data), p):
            layer.refresh()

    def _finish(self, target: RunTarget, report: FileReport, record: ImageRecord) -> None:
        self._target_running = None
        layer, run, result = target.layer, target.run, report.segmentation
        if layer not in self.viewer.layers:
            self._status.value = "The labels layer was deleted during the run; nothing was written."
            return
        before, labels = run.finish(result)
        layer.data[...] = before                               # then apply the run as one undoable edit
        changed = np.nonzero(before != labels)
        with engine_writes(layer), layer.block_history():
            layer.data_setitem(changed, labels[changed])
        layer.metadata[CLASSES_KEY] = list(run.card.class_names)
        measures = report.measures if run.new else Measures.of(labels, record.spacing, record.source_format,
                                                                run.card.class_names)     # corrected slices kept
        self._status.value = summary_html(layer.name, run.rows(measures))
        if result.slice_uncertainty is not None and labels.ndim == 3:
            self._uncertain_order = [int(i) for i in np.argsort(-result.slice_uncertainty)]
            self._next.enabled = True
        self.last_result = report
        self.reset_choices()
        self._target.value = layer                                 # partial mode's default: this proposal
        saver = self.autosavers.get(layer.unique_id)
        self._autosave(layer, run.annotation, saver.path if saver else session_path(run.folder, run.annotation))
        self._offer_restore(self._image.value)                     # an unrestored session stays on offer
        show_info(f"DAE-Former: segmented {layer.name}")

    def _failed(self, target: RunTarget, error: BaseException | None) -> None:
        """A failed or cancelled run leaves the viewer as it was (a cancel is not an error)."""
        self._target_running = None
        layer = target.layer
        if target.run.new:
            self.hub.forget(layer.unique_id)
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        elif layer in self.viewer.layers:
            layer.data[...] = target.run.before
            layer.refresh()
        self._progress.max, self._progress.value = 1, 0
        if error is None or isinstance(error, Cancelled):
            self._status.value = "Cancelled: nothing was changed."
        else:
            self.report(f"segmentation failed: {failure_message(error)}")

    def cancel(self) -> None:
        """Stop the running job after its current batch; the viewer is left as before the run."""
        self._cancel_event.set()
        super().cancel()

    def _on_closed(self) -> None:
        self.hub.unregister(self)
        super()._on_closed()

    def _jump_to_uncertain(self) -> None:
        if not self._uncertain_order:
            return
        index = self._uncertain_order.pop(0)
        self._uncertain_order.append(index)
        self.viewer.dims.set_current_step(self.viewer.dims.ndim - 3 + int(self._axis.value), index)
