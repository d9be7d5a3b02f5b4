"""The "Teach while painting" dock: a model trains in the background from the slices the user paints, and every
slice the user moves to shows its latest proposal in a separate layer (`LABELS proposal`), never in the user's: the
model's, or fill between slices' where that needed fewer changes on the last slices the user finished.

A thin layer over `training.continuous` (the rounds) and `control/teach.py` (the session's decisions). Shift+A on
the labels layer accepts the proposal on the slice on screen (one undo step; the slice becomes painted and is
trained on), Shift+N moves to the unpainted slice the model is least sure of. Stop keeps and saves the model and
hands it to every Segment dock; Start again continues it (docs/annotate.md#teach-while-you-paint).
"""

from __future__ import annotations

import html
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, FileEdit, Label, LineEdit, ProgressBar, PushButton
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_info, show_warning
from napari_daeformer_training.continuous import Teaching, TeachProgress
from qtpy.QtCore import QThreadPool, QTimer

from napari_daeformer.base.errors import DaeformerError, TrainingError
from napari_daeformer.plugin.control.recipe_form import class_names_for
from napari_daeformer.plugin.control.teach import Offer, TeachController, to_propose, writable
from napari_daeformer.plugin.hub import hub_for
from napari_daeformer.plugin.widgets._docking import open_plugin_dock
from napari_daeformer.plugin.widgets._layers import follow, image_identity
from napari_daeformer.plugin.widgets._workers import WorkerWidget, failure_message, guarded, row
from napari_daeformer.plugin.widgets.autosave import Autosaver, autosave
from napari_daeformer.plugin.widgets.fill import painted_slices
from napari_daeformer.session.annotation import default_folder, image_key, session_path

if TYPE_CHECKING:
    import napari

ACCEPT_KEY, SUGGEST_KEY = "Shift-A", "Shift-N"
SYNC_MS = 300                   # painting is handed to the trainer this long after the last stroke
SUGGEST_FROM = 16               # unpainted slices (evenly spaced) a suggestion compares
CLOSE_WAIT_MS = 5000            # a closing dock waits this long at most for the training step and proposal under way


def _session(control: TeachController, *start: Any) -> Generator[tuple[Teaching, str] | TeachProgress, None, None]:
    """Start (or resume) the session off the GUI thread (a new model loads weights), yield it, then its rounds."""
    yield control.start(*start)
    assert control.teaching is not None
    yield from control.teaching.rounds()


_teach_job = guarded(_session, TrainingError, "teaching")


class TeachWidget(WorkerWidget):
    """Start teaching on an image and its labels layer; proposals follow the slice on screen."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._image = ComboBox(label="image", choices=lambda _: [x for x in self.viewer.layers if isinstance(x, Image)],
                               tooltip="The volume you are annotating")
        self._labels = ComboBox(label="labels", tooltip="The labels layer you paint (a new one is made if none)",
                                choices=lambda _: [x for x in self.viewer.layers if isinstance(x, Labels)
                                                   and not x.name.endswith(" proposal")])
        self._classes = LineEdit(label="classes", value="background, structure",
                                 tooltip="A new model's class names, background first, one per label value you paint")
        self._continue = FileEdit(label="continue from", mode="r", filter="*.safetensors",
                                  tooltip="A model saved by an earlier session to go on teaching (empty: a new model; "
                                          "after Stop, the model just saved)")
        self._run = PushButton(text="Start teaching", tooltip="Train in the background from the slices you paint; "
                               "every slice you move to shows the latest proposal")
        self._cancel = PushButton(text="Stop", enabled=False, tooltip="Stop training; the model is kept, saved and "
                                  "handed to the Segment docks. Start again continues it")
        self._progress = ProgressBar(label="round", value=0, min=0, max=1)
        self._status = self._wrap(Label(value="Paint a structure on a slice or two, then press Start teaching."))
        self._accept = PushButton(text="Accept proposal (Shift+A)", enabled=False,
                                  tooltip="Copy the proposal on the slice on screen into your labels (Ctrl+Z undoes "
                                          "it): the slice counts as painted and is trained on")
        self._suggest = PushButton(text="Suggest slice (Shift+N)", enabled=False,
                                   tooltip="Go to the unpainted slice where the model is least sure")
        self._save = PushButton(text="Save model", enabled=False,
                                tooltip="Save the latest model now and give it to the Segment docks")
        self.extend([self._image, self._labels, self._classes, self._continue, row(self._run, self._cancel),
                     self._progress, self._status, row(self._accept, self._suggest), self._save])
        self._tidy()
        self.control = TeachController()
        self.layer: Labels | None = None
        self.proposal_layer: Labels | None = None
        self.shown: dict[int, int] = {}              # slice -> model version of the proposal shown there
        self.axis = 0                                # the axis taught: the one painted along at Start
        self._proposing, self._wanted, self._last_z = False, None, 0
        self.latencies: list[float] = []             # seconds to compute each proposal
        self.saver: Autosaver | None = None           # the labels layer's autosave, where no Segment dock keeps one
        self._sync_timer = QTimer(self.root_native_widget)            # goes with the dock
        self._sync_timer.setSingleShot(True)
        self._sync_timer.setInterval(SYNC_MS)
        self._sync_timer.timeout.connect(self._sync)
        self._run.clicked.connect(self._start)
        self._cancel.clicked.connect(self.cancel)
        self._accept.clicked.connect(self.accept)
        self._suggest.clicked.connect(self.suggest)
        self._save.clicked.connect(self._save_now)
        self._labels.changed.connect(lambda _: self._fill_classes())
        self.viewer.layers.events.inserted.connect(lambda _: self.reset_choices())
        self.viewer.layers.events.removed.connect(self._layer_removed)
        self.viewer.dims.events.current_step.connect(self._moved)
        self.reset_choices()
        self._fill_classes()

    # ---- layers ----------------------------------------------------------------------------------------
    def _fill_classes(self) -> None:
        layer = self._labels.value
        if layer is not None and self.control.teaching is None:
            names = [n.strip() for n in str(self._classes.value).split(",") if n.strip()] or ["background"]
            self._classes.value = ", ".join(class_names_for(names, np.asarray(layer.data)))

    def _layers(self) -> tuple[Image, Labels]:
        image = self._image.value
        if image is None or image.rgb or image.ndim != 3:
            raise DaeformerError("choose a volume (a 3D image layer) to teach on")
        layer = self._labels.value
        if layer is None:
            layer = self.viewer.add_labels(np.zeros(image.data.shape, np.uint8), name=f"{image.name} labels",
                                           scale=image.scale, translate=image.translate)
            self.reset_choices()
            self._labels.value = layer
        return image, layer

    def _slice_now(self) -> int:
        """The labels layer's slice on screen along the axis taught."""
        assert self.layer is not None
        point = self.layer.world_to_data(self.viewer.dims.point[-self.layer.ndim:])
        return int(np.clip(round(float(point[self.axis])), 0, self.layer.data.shape[self.axis] - 1))

    def _along(self, data: Any) -> np.ndarray:
        """A layer's (Z, Y, X) data as slices along the axis taught, first: a view (writes reach the layer)."""
        return np.moveaxis(np.asarray(data), self.axis, 0)

    def _done(self) -> np.ndarray:
        assert self.layer is not None
        return follow(self.viewer, self.layer).painted(np.asarray(self.layer.data), self.axis)

    # ---- the session -----------------------------------------------------------------------------------
    def _start(self) -> None:
        try:
            image, layer = self._layers()
            done, self.axis = painted_slices(self.viewer, layer)        # along the axis the user painted
            if not done.any():
                raise DaeformerError("paint a structure on at least one slice, then start teaching")
        except DaeformerError as e:
            self.report(str(e))
            return
        self._autosave(image, layer)
        classes = [n.strip() for n in str(self._classes.value).split(",") if n.strip()]
        chosen = Path(self._continue.value) if str(self._continue.value) not in ("", ".") else None
        self._status.value = html.escape(f"Starting from {int(done.sum())} painted slice(s)...")
        self._launch(_teach_job, self.control, (id(image), id(layer), self.axis), self._along(image.data),
                     self._along(layer.data).copy(), done, classes, chosen, layer.name, yielded=self._on_step,
                     returned=lambda _: None, errored=self._failed, aborted=self._stopped)

    def _layer_removed(self, event: Any) -> None:
        """A layer deleted: the choices follow; the autosave of a deleted labels layer stops (its file stays, and
        the Segment dock offers it back)."""
        self.reset_choices()
        if self.saver is not None and event.value is self.saver.layer:
            self._stop_autosave()

    def _stop_autosave(self) -> None:
        """The autosave's last queued write completes; the layer is no longer autosaved by this dock."""
        assert self.saver is not None
        self.saver.close()
        hub_for(self.viewer).autosaved.pop(self.saver.layer.unique_id, None)
        self.saver = None

    def _autosave(self, image: Image, layer: Labels) -> None:
        """Autosave `layer` (its painted slices, after each pause in painting) as the Segment dock does for its
        layers, unless a dock already does: a crash while teaching loses no painting, and the Segment dock offers
        the session back when the image is opened again."""
        hub = hub_for(self.viewer)
        if layer.unique_id in hub.autosaved:        # by a Segment dock, or by this one already
            return
        if self.saver is not None:
            self._stop_autosave()
        annotation = follow(self.viewer, layer)
        if not annotation.image.key:                 # painted from scratch: whose image it is, for the restore offer
            annotation.image = image_identity(image, image_key(np.asarray(image.data)))
        path = session_path(default_folder(annotation.image.source_path or None), annotation)
        self.saver = autosave(hub, layer, annotation, path)

    def _started(self, teaching: Teaching, warning: str) -> None:
        """The session runs (its model built off the GUI thread): proposals follow the slice on screen."""
        if warning:
            show_warning(f"DAE-Former: {warning}.")
        self._follow(self._labels.value)
        self._progress.max = teaching.settings.steps
        self._status.value = html.escape(f"Teaching from {int(teaching.painted.sum())} painted slice(s) "
                                         f"({self.control.intensities}); move to a slice to see its proposal.")
        self._accept.enabled = self._suggest.enabled = self._save.enabled = True

    def _follow(self, layer: Labels) -> None:
        """Paint events of `layer` reach the trainer; proposals go into a layer of their own beside it."""
        if self.layer is not layer:
            if self.layer is not None:
                self.layer.events.paint.disconnect(self._painted)
            self.layer = layer
            layer.events.paint.connect(self._painted)
            layer.bind_key(ACCEPT_KEY, lambda _: self.accept(), overwrite=True)
            layer.bind_key(SUGGEST_KEY, lambda _: self.suggest(), overwrite=True)
        name = f"{layer.name} proposal"
        if self.proposal_layer is None or self.proposal_layer not in self.viewer.layers:
            self.proposal_layer = self.viewer.add_labels(np.zeros(layer.data.shape, np.uint8), name=name,
                                                         scale=layer.scale, translate=layer.translate, opacity=0.45)
            self.proposal_layer.colormap = layer.colormap
            self.shown = {}
        self.viewer.layers.selection.active = layer              # the brush paints the user's layer
        self._request(self._slice_now())

    def _on_step(self, p: TeachProgress | tuple[Teaching, str]) -> None:
        if isinstance(p, tuple):
            self._started(*p)
            return
        self._progress.value = p.step
        if p.published:
            self._status.value = html.escape(
                f"Model v{p.version}: trained on {p.slices} slice(s) for {p.seconds:.0f} s. "
                f"{self._latency_words()}")
            self._request(self._slice_now())

    def _latency_words(self) -> str:
        if not self.latencies:
            return "Move to a slice to see its proposal."
        source = "fill between slices" if self.control.choice.source == "fill" else "the model"
        return f"Last proposal in {self.latencies[-1]:.2f} s; proposals from {source}."

    def _stopped(self) -> None:
        self._progress.value = 0
        teaching = self.control.teaching
        if teaching is None or teaching.version == 0:
            self._status.value = "Stopped before a round finished: nothing to save."
            return
        self._save_now(stopped=True)

    def _failed(self, error: BaseException) -> None:
        self.report(failure_message(error) if self.control.teaching is None else
                    f"teaching stopped: {failure_message(error)}")

    def _save_now(self, stopped: bool = False) -> None:
        teaching = self.control.teaching
        if teaching is None or teaching.version == 0:
            self.report("nothing trained yet: paint a slice and let a round finish")
            return
        try:
            path = self.control.save(self.layer.name if self.layer is not None else "taught")
        except DaeformerError as e:
            self.report(f"could not save the model: {e}")
            return
        note = f"New model {path.name} loaded (taught on {int(teaching.trained_on.sum())} slices); Run uses it." + (
            f" It was taught on slices along axis {self.axis}; Run segments along axis 0." if self.axis else "")
        hub = hub_for(self.viewer)
        if not hub.offer_model(path, note):
            open_plugin_dock(self.viewer, "napari-daeformer.segment_widget").offer_model(path, note)  # type: ignore[attr-defined]
        self._continue.value = path
        done = "Stopped; " if stopped else ""
        self._status.value = html.escape(f"{done}model v{teaching.version} saved as {path.name} and given to the "
                                         f"Segment dock.{' Start teaching continues it.' if stopped else ''}")
        show_info(f"DAE-Former: new model saved as {path}")

    # ---- painting --------------------------------------------------------------------------------------
    def _painted(self, _: Any = None) -> None:
        self._sync_timer.start()

    def _sync(self) -> None:
        """The user's labels and painted slices to the trainer; proposals on painted slices taken away."""
        teaching = self.control.teaching
        if teaching is None or self.layer is None or self.closed:
            return
        done = self._done()
        teaching.update(self._along(self.layer.data), done)
        self._clear(np.flatnonzero(done))

    def _clear(self, slices: np.ndarray) -> None:
        if self.proposal_layer is None:
            return
        stale = [int(z) for z in slices if self.shown.pop(int(z), None) is not None]
        if stale:
            self._along(self.proposal_layer.data)[stale] = 0
            self.proposal_layer.refresh()

    # ---- proposals -------------------------------------------------------------------------------------
    def _moved(self, _: Any = None) -> None:
        if self.running and self.layer is not None and not self.closed:
            left = self._last_z
            if self._done()[left] and self.control.finished(left, self._along(self.layer.data)[left]):
                self._status.value = html.escape(f"Proposals now from {self.control.choice.why()}.")
            self._request(self._slice_now())

    def _request(self, z: int) -> None:
        """A proposal for slice `z` and the next few along the direction of travel, once the one under way is shown."""
        teaching = self.control.teaching
        if teaching is None or self.layer is None:
            return
        step = -1 if z < self._last_z else 1
        self._last_z = z
        wanted = [k for k in to_propose(z, step, self._done()) if self.shown.get(k) != teaching.version]
        if not wanted:
            return
        if self._proposing:
            self._wanted = z
            return
        self._proposing = True
        worker = create_worker(self.control.offer, teaching, self._along(self.layer.data), self._done(), wanted,
                               _start_thread=False)
        worker.returned.connect(self._show)
        worker.errored.connect(lambda e: self.report(f"no proposal: {failure_message(e)}"))
        worker.finished.connect(self._proposed)
        worker.start()

    def _proposed(self) -> None:
        self._proposing = False
        if self._wanted is not None and not self.closed:
            z, self._wanted = self._wanted, None
            self._request(z)

    def _show(self, offer: Offer) -> None:
        """Write `offer` (the model's proposal or fill between slices') into the proposal layer on the slices still
        unpainted."""
        if self.closed or self.proposal_layer is None or self.layer is None:
            return
        proposal = offer.proposal
        self.latencies.append(proposal.seconds)
        keep = writable(proposal, self._done())
        for z, labels in zip(proposal.slices[keep], offer.labels[keep]):
            self._along(self.proposal_layer.data)[int(z)] = labels
            self.shown[int(z)] = proposal.version
        self.control.shown(offer, keep)
        self.proposal_layer.refresh()

    def accept(self) -> None:
        """Copy the proposal on the slice on screen into the user's labels as one undo step; the slice is painted."""
        if self.layer is None or self.proposal_layer is None:
            self.report("start teaching first")
            return
        z = self._slice_now()
        if self._done()[z]:
            self.ask(f"slice {z} is painted already: a proposal never overwrites it")
            return
        if z not in self.shown:
            self.ask(f"no proposal on slice {z} yet: wait a moment")
            return
        proposal, current = self._along(self.proposal_layer.data)[z], self._along(self.layer.data)[z]
        ys, xs = np.nonzero(proposal != current)
        if ys.size:
            index = [ys, xs]
            index.insert(self.axis, np.full(ys.size, z))              # back to the layer's axes
            self.layer.data_setitem(tuple(index), proposal[ys, xs])
        follow(self.viewer, self.layer).touched.setdefault(self.axis, set()).add(z)
        self._sync()
        self._status.value = html.escape(f"Accepted the proposal on slice {z}: it is trained on from the next round.")

    def suggest(self) -> None:
        """Move to the unpainted slice (of SUGGEST_FROM evenly spaced) where the model is least sure."""
        teaching = self.control.teaching
        if teaching is None or self.layer is None:
            self.report("start teaching first")
            return
        open_ = np.flatnonzero(~self._done())
        if not open_.size:
            self.ask("every slice is painted")
            return
        sample = open_[np.unique(np.linspace(0, open_.size - 1, min(SUGGEST_FROM, open_.size)).round().astype(int))]
        worker = create_worker(self.control.offer, teaching, self._along(self.layer.data), self._done(), sample.tolist(),
                               _start_thread=False)
        worker.returned.connect(lambda o: self._go(teaching.suggest(o.proposal), o))
        worker.errored.connect(lambda e: self.report(f"no suggestion: {failure_message(e)}"))
        worker.start()

    def _on_closed(self) -> None:
        """The dock is closing: the trainer stops after its step, no thread outlives the widgets it reports to, and
        the autosave writes once more and stops."""
        super()._on_closed()
        QThreadPool.globalInstance().waitForDone(CLOSE_WAIT_MS)
        if self.saver is not None:
            self.saver.save_now()
            self._stop_autosave()

    def _go(self, z: int | None, offer: Offer) -> None:
        if z is None or self.layer is None or self.closed:
            return
        self._show(offer)
        point = np.zeros(3)
        point[self.axis] = z
        self.viewer.dims.set_point(self.viewer.dims.ndim - self.layer.ndim + self.axis,
                                   float(self.layer.data_to_world(point)[self.axis]))
        self._status.value = html.escape(f"Slice {z}: where the model is least sure of the slices not painted.")
