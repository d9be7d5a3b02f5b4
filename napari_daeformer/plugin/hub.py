"""The plugin-held registry of one viewer: its labels layers' annotations and its open Segment docks.

The docks reach each other only through it (never by looking a dock up by its title): the Fine-tune dock asks it
which model made a labels layer and offers a fine-tuned model to every open Segment dock. Plain Python: the docks
register objects with `offer_model` and `checkpoint_path`; nothing here imports Qt or napari.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Protocol

from napari_daeformer.session.annotation import Annotation


class ModelUser(Protocol):
    """Every call another dock makes on a Segment dock."""

    def checkpoint_path(self) -> Path: ...

    def offer_model(self, path: Path, note: str) -> None: ...

    def segment_into_new_layer(self, image: object) -> None: ...


class Hub:
    """One viewer's annotations (by labels layer id) and Segment docks (most recently used last)."""

    def __init__(self) -> None:
        self.annotations: dict[Hashable, Annotation] = {}
        self.autosaved: dict[Hashable, Path] = {}      # labels layer id -> the session file a dock autosaves it into
        self._docks: list[weakref.ref[ModelUser]] = []
        self.on_annotation: list[Callable[[Hashable], None]] = []          # called with a layer id when one is added

    # ---- annotations -------------------------------------------------------------------------------------
    def annotate(self, layer_id: Hashable, annotation: Annotation) -> Annotation:
        self.annotations[layer_id] = annotation
        for callback in list(self.on_annotation):
            callback(layer_id)
        return annotation

    def annotation(self, layer_id: Hashable) -> Annotation | None:
        return self.annotations.get(layer_id)

    def forget(self, layer_id: Hashable) -> None:
        self.annotations.pop(layer_id, None)
        self.autosaved.pop(layer_id, None)

    # ---- Segment docks -----------------------------------------------------------------------------------
    def register(self, dock: ModelUser) -> None:
        """`dock` is open (again: it ran last, and is the one `segment_dock` returns)."""
        self._docks = [ref for ref in self._docks if ref() is not None and ref() is not dock] + [weakref.ref(dock)]

    def unregister(self, dock: ModelUser) -> None:
        self._docks = [ref for ref in self._docks if ref() is not None and ref() is not dock]

    def segment_docks(self) -> list[ModelUser]:
        return [dock for ref in self._docks if (dock := ref()) is not None]

    def segment_dock(self) -> ModelUser | None:
        """The Segment dock used last (None if none is open)."""
        docks = self.segment_docks()
        return docks[-1] if docks else None

    def offer_model(self, path: Path, note: str) -> int:
        """Give `path` to every open Segment dock; how many took it."""
        docks = self.segment_docks()
        for dock in docks:
            dock.offer_model(path, note)
        return len(docks)


_HUBS: dict[int, Hub] = {}


def hub_for(viewer: object) -> Hub:
    """The hub of `viewer`, made on first use and dropped with the viewer (napari hands each plugin widget its own
    proxy of the viewer: the hub belongs to the viewer behind them)."""
    viewer = getattr(viewer, "__wrapped__", viewer)
    key = id(viewer)
    if key not in _HUBS:
        _HUBS[key] = Hub()
        weakref.finalize(viewer, _HUBS.pop, key, None)
    return _HUBS[key]
