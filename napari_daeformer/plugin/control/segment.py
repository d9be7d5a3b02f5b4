"""What the Segment dock decides, without Qt or napari: which model, what a run writes where, what it proposed,
and which autosaved sessions are on offer. The dock (`widgets/segment.py`) only reads its controls, adds layers
and shows what this returns; tests drive this class with plain arrays.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_daeformer.base.errors import DaeformerError
from napari_daeformer.base.volumes import Measures
from napari_daeformer.engine.inference import Progress, Segmentation, SliceInferer
from napari_daeformer.model.checkpoint import Checkpoint, ModelCard, file_sha256, load_checkpoint
from napari_daeformer.session.annotation import (
    SUFFIX,
    Annotation,
    ImageIdentity,
    SavedSession,
    find_sessions,
    load_session,
    merge_slices,
)


@dataclass
class Run:
    """What one run writes: a new layer's labels, or an existing layer's whose corrected slices (`keep`) are left
    alone. The annotation, autosave folder and checkpoint are fixed when the run starts (switching or deleting the
    image, or choosing another model, mid-run changes none of them)."""

    axis: int
    annotation: Annotation
    folder: Path
    card: ModelCard
    made_by: tuple[str, str, str]         # the run's checkpoint: file name, SHA-256, path
    before: np.ndarray | None = None      # the layer's data before the run (an existing layer only)
    keep: np.ndarray | None = None        # (S,) bool along `axis`: the user's corrected slices

    @property
    def new(self) -> bool:
        return self.before is None

    def show(self, data: np.ndarray, p: Progress) -> bool:
        """Write the finished slices of `p` into `data` (the layer's array, in place) except corrected ones;
        whether anything was written."""
        if p.labels is None or not p.labels.size:
            return False
        if data.ndim == 2:
            data[...] = p.labels[0]
            return True
        write = np.ones(len(p.slices), bool) if self.keep is None else ~self.keep[p.slices]
        np.moveaxis(data, self.axis, 0)[p.slices[write]] = p.labels[write]
        return bool(write.any())

    def finish(self, result: Segmentation) -> tuple[np.ndarray, np.ndarray]:
        """(before, after): the layer's data before the run and the labels it ends with (corrected slices kept).
        The annotation now holds this run's proposal, classes and checkpoint."""
        before = np.zeros_like(result.labels) if self.before is None else self.before
        labels = result.labels if self.keep is None else merge_slices(before, result.labels, ~self.keep, self.axis)
        a = self.annotation
        if a.prediction is None and self.keep is not None:      # labels painted from scratch: the rest is the user's
            a.prediction = before.copy()
        a.proposed(labels, None if self.keep is None else ~self.keep, self.axis)
        a.class_names, a.class_colors = tuple(self.card.class_names), tuple(self.card.class_colors)
        a.checkpoint, a.checkpoint_sha256, a.checkpoint_path = self.made_by
        return before, labels

    def rows(self, measures: Measures) -> list[tuple[str, str, str]]:
        """(colour, class, "166.5 mL") per class, for `summary_html`."""
        return [(self.card.class_colors[i + 1], name, measures.text(name)) for i, name in enumerate(measures.values)]


def summary_html(layer_name: str, measures: list[tuple[str, str, str]]) -> str:
    """The dock's result lines: the layer's name, then a coloured square, class and measure per class; every name
    escaped (a class or layer called '<img src=...>' is shown as text, never rendered)."""
    return "<br>".join([f"<b>{html.escape(layer_name)}</b>"] + [
        f"<span style='color:{html.escape(colour, quote=True)}'>■</span> {html.escape(name)}: {html.escape(value)}"
        for colour, name, value in measures])


@dataclass(frozen=True)
class Offer:
    """An autosaved session on offer for an image: its file, the line shown, and whether it can be restored."""

    path: Path
    text: str
    readable: bool


class SegmentController:
    """The Segment dock's model, runs and autosaved sessions."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self._checkpoint: Checkpoint | None = None

    # ---- the model -------------------------------------------------------------------------------------------
    def choose(self, path: Path | None) -> None:
        """Use this checkpoint file from the next run on (loaded on first use)."""
        self.path, self._checkpoint = path, None

    def load(self) -> Checkpoint:
        if self._checkpoint is None:
            if self.path is None or not self.path.is_file():
                raise DaeformerError("choose a checkpoint file (.safetensors)")
            self._checkpoint = load_checkpoint(self.path)
        return self._checkpoint

    def describe(self) -> str:
        """'5 classes: liver, ... (demonstration model trained on synthetic data)'; the loading error, if any."""
        try:
            card = self.load().card
        except DaeformerError as e:
            return str(e)
        demo = "synthetic" in str(card.provenance.get("data", ""))
        return (f"{len(card.class_names) - 1} classes: {', '.join(card.class_names[1:])}"
                + (" (demonstration model trained on synthetic data)" if demo else "")
                + ("" if card.preprocessing.kind == "ct" else f"; intensities: {card.preprocessing.describe()}"))

    def made_by(self) -> tuple[str, str, str]:
        """The current checkpoint's file name, SHA-256 and path (hashed once per run, when it starts)."""
        path = self.load().path
        return (path.name, file_sha256(path), str(path)) if path else ("model", "", "")

    # ---- runs ------------------------------------------------------------------------------------------------
    @staticmethod
    def window(low: float, high: float) -> tuple[float, float]:
        if low >= high:
            raise DaeformerError(f"the CT window's low end ({low:g} HU) must be below its high end ({high:g} HU)")
        return low, high

    @staticmethod
    def uncorrected(annotation: Annotation, labels: np.ndarray, shape: tuple[int, ...], axis: int, name: str
                    ) -> np.ndarray:
        """(S,) bool: the slices of `labels` a partial run may write (those not corrected along `axis`)."""
        if tuple(labels.shape) != tuple(shape):
            raise DaeformerError(f"labels layer {name!r} has shape {labels.shape}, the image {tuple(shape)}")
        done = annotation.corrected(labels, axis)
        if done.all():
            raise DaeformerError("every slice of that layer has been corrected; nothing to re-segment")
        return ~done

    def new_run(self, image: ImageIdentity, layer_name: str, shape: tuple[int, ...], axis: int, folder: Path,
                made_by: tuple[str, str, str]) -> tuple[Run, np.ndarray]:
        """A run into a new labels layer: the run and the layer's empty uint8 labels (S, Y, X) or (Y, X)."""
        card = self.load().card
        empty = np.zeros(shape, np.uint8)
        annotation = Annotation(image=image, layer_name=layer_name, class_names=tuple(card.class_names),
                                class_colors=tuple(card.class_colors), prediction=empty.copy(),
                                checkpoint=made_by[0], checkpoint_sha256=made_by[1], checkpoint_path=made_by[2])
        return Run(axis, annotation, folder, card, made_by), empty

    def partial_run(self, annotation: Annotation, labels: np.ndarray, only: np.ndarray, image: ImageIdentity,
                    axis: int, folder: Path, made_by: tuple[str, str, str]) -> Run:
        """A run into an existing layer's slices `only` (S,) bool; labels the plugin did not make take `image`."""
        if not annotation.image.key:
            annotation.image = image
        return Run(axis, annotation, folder, self.load().card, made_by, before=np.array(labels, copy=True),
                   keep=~only)

    # ---- autosaved sessions ----------------------------------------------------------------------------------
    @staticmethod
    def unrestored(folders: list[Path], key: str, open_ids: Iterable[str], open_paths: Iterable[Path]) -> list[Path]:
        """The image's autosaved sessions whose labels are not open (ids or files in use), newest first."""
        ids, paths = {i[:12] for i in open_ids}, set(open_paths)
        return [p for p in find_sessions(folders, key)
                if p not in paths and not any(p.name.endswith(f"-{i}{SUFFIX}") for i in ids)]

    @staticmethod
    def offer(found: list[Path], image_name: str, voxels: int) -> Offer | None:
        """The newest of `found` that holds a corrected slice (or cannot be read) as an offer, with how many more
        there are; None when there is none. A session of a plain run that nobody corrected holds nothing a new run
        would not give back: it is not offered."""
        for i, path in enumerate(found):
            more = f" ({len(found) - i - 1} more after it)" if len(found) - i > 1 else ""
            try:
                saved = load_session(path, voxels)
            except DaeformerError as e:
                return Offer(path, f"An autosaved session for {image_name} cannot be read: {e}", False)
            if saved.annotation.corrected(saved.labels).any() or any(saved.annotation.touched.values()):
                return Offer(path, f"Autosaved corrections for {image_name}: {saved.describe()}{more}.", True)
        return None

    @staticmethod
    def restore(offer: Offer, image_shape: tuple[int, ...], voxels: int) -> SavedSession:
        """The offered session, checked to fit an image of `image_shape`."""
        saved = load_session(offer.path, voxels)
        rgb = len(image_shape) == 3 and image_shape[-1] in (3, 4) and saved.labels.ndim == 2
        spatial = tuple(image_shape[:-1]) if rgb else tuple(image_shape)
        if saved.labels.shape != spatial:                        # (Y, X) labels of an RGB photo, else the same shape
            raise DaeformerError(f"its labels {saved.labels.shape} do not fit the image {tuple(image_shape)}")
        return saved


def dock_inferer(checkpoint: Checkpoint, device: str, batch_size: int, precision: str,
                 window: tuple[float, float] | None, neighbour_weight: float | None = None) -> SliceInferer:
    """The inferer for a dock's run: batch size 0 means what fits the device; static int8 in a child process (the
    event loop keeps running)."""
    return SliceInferer(checkpoint, device=device, precision=precision, batch_size=batch_size or None, window=window,
                        int8_in_child=True, neighbour_weight=neighbour_weight)
