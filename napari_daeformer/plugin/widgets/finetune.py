"""The "Fine-tune DAE-Former" dock widget: learn from the user's corrected slices, without leaving napari.

A thin layer over `training/finetune.py`: it gathers (image, corrected labels) pairs, runs the fine-tuning in a
worker with a live loss curve, saves a new checkpoint version and hands it to the Segment widget.
"""

from __future__ import annotations

import html
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FileEdit, FloatSpinBox, Label, LineEdit, ProgressBar, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.utils.notifications import show_info, show_warning
from napari_daeformer_training.losses import IGNORE
from napari_daeformer_training.pairs import pair_agreement, require_pairs
from napari_daeformer_training.recipes import REFINE, TEACH, Overrides, Task, describe, settings_for, task_for
from napari_daeformer_training.verdict import FinetuneProgress, FinetuneResult
from qtpy.QtWidgets import QTabWidget

from napari_daeformer.base.errors import DaeformerError, TrainingError
from napari_daeformer.io.record import CLASSES_KEY
from napari_daeformer.model.checkpoint import MAX_WEIGHT, ModelCard, read_card
from napari_daeformer.plugin.control.finetune import FinetuneController, check_kept_classes, finetune_and_save
from napari_daeformer.plugin.control.recipe_form import RecipeForm, class_names_for, unnamed_classes
from napari_daeformer.plugin.hub import ModelUser, hub_for
from napari_daeformer.plugin.widgets._docking import open_plugin_dock
from napari_daeformer.plugin.widgets._layers import annotation_of, follow
from napari_daeformer.plugin.widgets._workers import WorkerWidget, collapsible, device_picker, failure_message, guarded, holder, row
from napari_daeformer.plugin.widgets.fill import fill_action
from napari_daeformer.plugin.widgets.pairs import Pairs
from napari_daeformer.plugin.widgets.plots import AgreementPlot, LossPlot
from napari_daeformer.session.agreement import by_version, history, merged

if TYPE_CHECKING:
    import napari

FROM_PROPOSER = "the model that proposed the labels"
FROM_NEW = "a new model (small)"
PROTECT_CHOICES = {"parent's confident labels": "pseudo", "pull towards parent": "l2sp", "off": "none"}
_PROTECT_NAMES = {v: k for k, v in PROTECT_CHOICES.items()}
_finetune_job = guarded(finetune_and_save, TrainingError, "fine-tuning")


class FinetuneWidget(Pairs, WorkerWidget):
    """Pairs of (image, corrected labels) in, a new checkpoint version out, loaded into the Segment widget."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._image = ComboBox(label="image", choices=lambda _: [x for x in self.viewer.layers if isinstance(x, Image)],
                               tooltip="The image the corrections belong to")
        self._corrected = ComboBox(label="corrected labels", tooltip="The labels layer you corrected (layers the "
                                   "Segment dock made come first, newest first)", choices=self._labels_layers)
        self._start_from = ComboBox(label="start from", choices=[FROM_PROPOSER, FROM_NEW], value=FROM_PROPOSER,
                                    tooltip="Refine the model that proposed the labels (or the Segment dock's), or "
                                            "train a new model for any structure from the slices you annotated")
        self._classes = LineEdit(label="classes", tooltip="Class names, background first, one per label value. Names "
                                 "after the model's own teach it new classes (its old ones are kept)")
        self._fill = PushButton(text="Fill between slices", tooltip="Fill the slices between those you painted in "
                                "the corrected labels, class by class (Shift+I on the layer); Ctrl+Z undoes it")
        self._add = PushButton(text="Add pair", tooltip="Use this image with these labels (several pairs allowed)")
        self._clear = PushButton(text="Clear pairs")
        self._pairs_info = self._wrap(Label(value="No pairs yet."))
        self._steps = SpinBox(label="steps", min=1, max=20000, value=REFINE.steps,
                              tooltip="Optimiser steps; 100 take 25-35 s for the small model on 2 CPU cores")
        self._minutes = FloatSpinBox(label="time budget (min)", min=0, max=600, step=1, value=0,
                                     tooltip="Stop after this long with the best state so far (0: no limit)")
        self._lr = FloatSpinBox(label="learning rate", min=1e-5, max=1.0, step=1e-5, value=REFINE.lr,
                                tooltip="AdamW peak learning rate, reached after a warm-up of "
                                        f"{REFINE.warmup_steps} steps")
        self._neighbours = FloatSpinBox(label="neighbouring slices", min=0.0, max=MAX_WEIGHT, step=0.05,
                                        value=TEACH.neighbour_weight, visible=False,
                                        tooltip="The new model segments each slice of a volume with its neighbours' "
                                                "class probabilities at this weight each (0: each slice alone, for "
                                                "structures seen on one slice only, such as small nodules)")
        self._protect = ComboBox(label="protect the rest", choices=list(PROTECT_CHOICES), value=_PROTECT_NAMES[REFINE.protect],
                                 tooltip="Keep what the model knew on the slices you did not correct: its confident "
                                         "labels there as extra targets, or a pull of the weights towards the "
                                         "starting model")
        self._parts = ComboBox(label="train", choices=["all", "decoder"], value="all",
                               tooltip="'decoder' keeps the encoder fixed: safer with very few slices")
        self._augment = CheckBox(label="augmentation", value=True, tooltip="Random affine, contrast, blur, noise")
        self._calibrate = CheckBox(label="calibrate intensities", value=REFINE.calibrate,
                                   tooltip="Also learn an intensity scale and shift (a scanner's HU offset, a camera's "
                                           "colour cast), saved as the new model's CT window or colour normalisation")
        self._device = device_picker()
        self._save_to = FileEdit(label="save as", mode="w", filter="*.safetensors",
                                 tooltip="New checkpoint file (default: PARENT-ftN.safetensors)")
        self._overwrite = CheckBox(label="overwrite parent", value=False,
                                   tooltip="Replace the starting checkpoint instead of writing a new version")
        self._run = PushButton(text="Fine-tune", tooltip="Fine-tune the Segment widget's model on the pairs")
        self._cancel = PushButton(text="Cancel", enabled=False, tooltip="Stop; the loaded model stays as it was")
        self._progress = ProgressBar(label="progress", value=0, min=0, max=1)
        self._status = self._wrap(Label(value=""))
        self._resegment = PushButton(text="Re-segment", enabled=False,
                                     tooltip="Segment the first pair's image again with the new model, into a new layer")
        self._keep_anyway = PushButton(text="Keep anyway", visible=False,
                                       tooltip="Save the fine-tuned model and use it although it was not shown better")
        self._revert = PushButton(text="Revert model", enabled=False,
                                  tooltip="Give the Segment widget its starting (parent) model again")
        self.plot = LossPlot(str(self.viewer.theme))
        self.agreement_plot = AgreementPlot(str(self.viewer.theme))
        self.tabs = QTabWidget()
        self.tabs.addTab(self.plot.canvas, "Training")
        self.tabs.addTab(self.agreement_plot.canvas, "Agreement per version")
        self.tabs.setTabToolTip(1, "Is the model good enough yet: Dice between each model version's proposals and "
                                   "your final labels, and the share of slices you changed")
        plot = holder(self.tabs, "Training: loss per step and held-out Dice at each scoring (right axis). Agreement: "
                                 "how much of each model version's proposals you kept")
        self.extend([self._image, self._corrected, self._fill, self._start_from, self._classes,
                     collapsible("Several images", [row(self._add, self._clear), self._pairs_info]),
                     collapsible("Settings", [self._steps, self._minutes, self._lr, self._neighbours, self._protect,
                                              self._parts, self._augment, self._calibrate, self._device, self._save_to,
                                              self._overwrite]),
                     row(self._run, self._cancel), self._progress, self._status,   # the verdict above the fold
                     self._keep_anyway, row(self._resegment, self._revert), plot])
        self._tidy()
        self.pairs: list[tuple[Image, Labels]] = []
        self.control = FinetuneController()
        self._add.clicked.connect(self._add_pair)
        self._fill.clicked.connect(self._fill_between)
        self._clear.clicked.connect(self._clear_pairs)
        self._run.clicked.connect(self._start)
        self._plan_shown, self._watched = False, None                   # the status holds a plan; the layer followed
        self.form, self._showing = RecipeForm(), False
        for name, control in self._recipe_controls().items():
            control.changed.connect(lambda _, n=name: self._touched(n))
        self._start_from.changed.connect(self._start_from_changed)
        self._corrected.changed.connect(self._default_start)
        self._corrected.changed.connect(lambda _: self._fill_classes())
        self._corrected.changed.connect(lambda layer: (self._watch_painting(layer), self._show_plan(fresh=True)))
        self._image.changed.connect(lambda _: self._show_plan(fresh=True))
        for control in (self._steps, self._minutes, self._start_from):
            control.changed.connect(lambda _: self._show_plan())
        self._cancel.clicked.connect(self.cancel)
        self._resegment.clicked.connect(self._resegment_image)
        self._revert.clicked.connect(self._revert_model)
        self._keep_anyway.clicked.connect(self._keep)
        self.hub = hub_for(self.viewer)
        self.hub.on_annotation.append(self._annotated)
        self.viewer.layers.events.inserted.connect(self._layer_added)
        self.viewer.layers.events.removed.connect(lambda _: self.reset_choices())
        for layer in self.viewer.layers:
            if isinstance(layer, Labels):
                follow(self.viewer, layer)
        self.reset_choices()
        self._default_start(self._corrected.value)
        self._fill_classes()
        self._watch_painting(self._corrected.value)                     # chosen before the signals were connected
        self._show_plan(fresh=True)

    def _fill_between(self) -> None:
        if self._corrected.value is None:
            self.report("choose the labels layer you painted first")
            return
        fill_action(self.viewer, self._corrected.value)
        self._show_plan(fresh=True)

    def _annotated(self, layer_id: Hashable) -> None:
        """A labels layer got a model's proposal: it is the pair to add, and the model that made it is refined."""
        super()._annotated(layer_id)
        if not self.closed:
            self._default_start(self._corrected.value)

    def _default_start(self, labels: Labels | None) -> None:
        """A labels layer no model proposed (painted from scratch, opened from a file) starts a new model; one a
        model proposed refines that model. The user's choice stands until another layer is chosen."""
        if isinstance(labels, Labels):
            a = annotation_of(self.viewer, labels)
            self._start_from.value = FROM_PROPOSER if a is not None and a.prediction is not None else FROM_NEW

    def _start_from_changed(self, choice: str) -> None:
        new = choice == FROM_NEW
        self._neighbours.visible = new                          # fine-tuning keeps the parent's
        for control in (self._protect, self._calibrate, self._overwrite):   # a new model has no parent to protect,
            control.visible = not new                                      # calibrate against or overwrite
        self._run.text = "Train" if new else "Fine-tune"
        self._fill_classes()
        self._show_recipe(self._task_guess())

    def _recipe_controls(self) -> dict[str, Any]:
        return {"steps": self._steps, "lr": self._lr, "minutes": self._minutes, "protect": self._protect,
                "train_parts": self._parts, "augment": self._augment, "calibrate": self._calibrate,
                "neighbour_weight": self._neighbours}

    def _show_recipe(self, task: Task) -> None:
        """The controls the user has not set show `task`'s recipe (`RecipeForm`)."""
        self._showing = True
        controls = self._recipe_controls()
        try:
            for name, value in self.form.shown(task).items():
                controls[name].value = _PROTECT_NAMES[value] if name == "protect" else value
        finally:
            self._showing = False

    def _touched(self, name: str) -> None:
        if not self._showing:
            self.form.touch(name)

    def _fill_classes(self) -> None:
        """The chosen labels layer's class names (those of the model that made it, or of its file); the field is
        shown for a new model, or when the labels hold values beyond those names."""
        labels = self._corrected.value
        if labels is None:
            return
        a = annotation_of(self.viewer, labels)
        names = list(a.class_names) if a is not None and a.class_names else list(labels.metadata.get(CLASSES_KEY, []))
        dock = self.hub.segment_dock()                                 # an open one: choosing a layer opens no dock
        if not names and self._start_from.value != FROM_NEW and dock is not None:   # a layer of the user's
            try:
                names = list(read_card(dock.checkpoint_path()).class_names)     # the model it would fine-tune
            except DaeformerError:
                names = []
        self._classes.value = ", ".join(class_names_for(names or ["background"], labels.data))
        self._classes.visible = self._start_from.value == FROM_NEW or len(self._class_names()) > len(names)

    def _class_names(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in str(self._classes.value).split(",") if n.strip())

    def _on_closed(self) -> None:
        if self._annotated in self.hub.on_annotation:
            self.hub.on_annotation.remove(self._annotated)
        self._watch_painting(None)
        super()._on_closed()

    def _show_plan(self, fresh: bool = False) -> None:
        """Say in the status what pressing the button will do with the chosen pair(s) (`describe`), unless it holds
        a run's result and nothing new was chosen (`fresh`: a new pair or labels layer)."""
        if self._showing or self.running or not (fresh or self._plan_shown or not self._status.value):
            return
        try:
            slices = sum(int(p.slices.sum()) for p in self._collect())
        except DaeformerError:
            slices = 0
        task = self._task_guess()
        self._show_recipe(task)
        plan = describe(settings_for(task, self._overrides(task)), slices) if slices else ""
        self._status.value, self._plan_shown = html.escape(plan), True

    def _watch_painting(self, labels: Labels | None) -> None:
        """Follow the chosen labels layer's painting: its corrected slices are the plan's."""
        if self._watched is not None:
            self._watched.events.paint.disconnect(self._on_paint)
        self._watched = labels if isinstance(labels, Labels) else None
        if self._watched is not None:
            self._watched.events.paint.connect(self._on_paint)

    def _on_paint(self, _: Any = None) -> None:
        self._show_plan()

    def _task_guess(self) -> Task:
        """The task the button would run, from the controls and the first pair's class names (the run itself
        decides with the parent's card, `task_for`)."""
        if self._start_from.value == FROM_NEW:
            return "new_model"
        a = annotation_of(self.viewer, self.pairs[0][1]) if self.pairs else None
        return task_for(False, tuple(a.class_names) if a is not None else (), self._class_names()) \
            if a is not None and a.class_names else "refine"

    def show_agreement(self, card: ModelCard | None = None) -> None:
        """Plot the lineage's agreement (from `card`, default the model to fine-tune) with the current pairs'."""
        try:
            card = card or read_card(self._parent_path())
        except DaeformerError:
            return
        try:
            current = pair_agreement(self._collect(), card.config.num_classes)
        except DaeformerError:                                   # labels beyond the model's classes: nothing to plot yet
            return
        self.agreement_plot.show(by_version(merged(history(card.provenance), current)))

    # ---- running -------------------------------------------------------------------------------------
    def segment_widget(self) -> ModelUser:
        """The Segment dock used last in this viewer (one is docked, as the Plugins menu does, if none is open)."""
        return self.hub.segment_dock() or open_plugin_dock(self.viewer, "napari-daeformer.segment_widget")  # type: ignore[return-value]

    def _parent_path(self) -> Path:
        """The model to fine-tune: the one that proposed the first pair's labels, else the Segment dock's."""
        labels = self.pairs[0][1] if self.pairs else self._corrected.value
        annotation = annotation_of(self.viewer, labels) if labels is not None else None
        return self.control.parent_of(annotation, lambda: self.segment_widget().checkpoint_path())

    def _offer(self, path: Path, note: str) -> None:
        """Every open Segment dock uses `path` from its next run (one is docked if none is open)."""
        if not self.hub.offer_model(path, note):
            self.segment_widget().offer_model(path, note)

    def _start(self) -> None:
        try:
            pairs = self._collect()
            require_pairs(pairs)                                 # before the labels' values are read
            parent_path = self._parent_path()
            chosen = Path(self._save_to.value) if str(self._save_to.value) not in ("", ".") else None
            own_names: tuple[str, ...] = ()
            classes: tuple[str, ...] = ()
            if self._start_from.value == FROM_NEW:
                name = self._corrected.value.name if self._corrected.value is not None else "model"
                parent, out, overwrite = self.control.prepare_new(pairs, self._class_names(), name, chosen)
            else:
                classes = self._class_names()                    # longer than the model's: new classes
                own_names = read_card(parent_path).class_names
                if not self._classes.native.isHidden():          # what the user could type: never ignored
                    check_kept_classes(own_names, classes)
                if why := unnamed_classes(pairs, classes, len(own_names)):   # a painted value nobody named yet
                    top = max(int(p.labels[p.labels != IGNORE].max(initial=0)) for p in pairs)
                    self._classes.value = ", ".join(class_names_for(classes, np.array([top])))
                    self._classes.visible = True
                    self._show_recipe("add_classes")
                    self.ask(why)
                    return
                parent, out, overwrite = self.control.prepare(pairs, parent_path, chosen, bool(self._overwrite.value),
                                                              classes)
        except DaeformerError as e:
            self.report(str(e))
            return
        task = "new_model" if self._start_from.value == FROM_NEW else task_for(False, own_names, classes)
        self._show_recipe(task)
        settings = settings_for(task, self._overrides(task))
        self.plot.reset(settings.steps)
        self._keep_anyway.visible = False
        self._resegment.enabled = self._revert.enabled = False
        self._progress.max = settings.steps
        self._progress.value = 0
        plan = describe(settings, sum(int(p.slices.sum()) for p in pairs))
        intensities = f" Intensities: {self.control.chosen_intensities}." if task == "new_model" else ""
        self._status.value = html.escape(f"{plan}{intensities}")
        if self.control.unpainted:                             # new classes painted nowhere
            self._status.value += f"<br>{html.escape(self.control.unpainted)}."
            show_warning(f"DAE-Former: {self.control.unpainted}.")
        self._launch(_finetune_job, parent, pairs, settings, out, overwrite, yielded=self._on_step,
                     returned=lambda r: self._finish(parent_path, *r), errored=self._failed,
                     aborted=self._aborted)

    def _overrides(self, task: Task) -> Overrides:
        """What the user set on top of the task's recipe (`RecipeForm`)."""
        values = {name: control.value for name, control in self._recipe_controls().items()}
        values["protect"] = PROTECT_CHOICES[values["protect"]]
        return self.form.overrides(task, values, self._device.value)

    def _aborted(self) -> None:
        self._plan_shown = False
        self._progress.value = 0
        self._status.value = "Cancelled: no checkpoint written; the Segment widget keeps its model."

    def _on_step(self, p: FinetuneProgress) -> None:
        self._progress.max = p.total
        self._progress.value = p.step
        self.plot.add(p.step, p.loss, p.holdout_dice)

    def _finish(self, parent_path: Path, result: FinetuneResult, path: Path | None) -> None:
        self._plan_shown = False
        lines = self.control.finished(parent_path, result, path)
        self._keep_anyway.visible = path is None
        if path is None:
            show_info(f"DAE-Former: {result.headline}.")
        else:
            self._use()
            show_info(self.control.saved_note())
        self._status.value = "<br>".join(map(html.escape, lines))
        self.show_agreement(result.candidate.card)

    def _use(self) -> None:
        """Every open Segment dock uses the new version from its next run."""
        self._offer(self.control.new_path, self.control.use_note())  # type: ignore[arg-type]
        self._resegment.enabled = self._revert.enabled = True

    def _keep(self) -> None:
        try:
            path = self.control.keep()
        except DaeformerError as e:
            self.report(f"could not save the fine-tuned model: {e}")
            return
        self._use()
        self._keep_anyway.visible = False
        self._status.value += f"<br>Kept anyway: saved {html.escape(path.name)} and loaded it into the Segment widget."

    def _failed(self, error: BaseException) -> None:
        self._progress.value = 0
        self.report(f"fine-tuning failed: {failure_message(error)}")

    def _resegment_image(self) -> None:
        image = self.pairs[0][0] if self.pairs else self._image.value
        if image is not None:
            self.segment_widget().segment_into_new_layer(image)

    def _revert_model(self) -> None:
        parent = self.control.parent_path
        if parent is not None:
            self._offer(parent, f"Reverted to {parent.name}.")
            self._resegment.enabled = self._revert.enabled = False
            self._status.value += f"<br>Reverted to {html.escape(parent.name)}; the Segment widget uses it again."
