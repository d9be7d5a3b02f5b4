"""The Fine-tune dock's (image, corrected labels) pairs, in Qt: the layers offered (the Segment dock's proposals
first), the pair made of a layer that just got a proposal, the list of pairs for several images, and the `Pair`s
they give (`control.finetune.pair`: each layer's corrected slices along the axis it was painted)."""

from __future__ import annotations

import html
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from napari.layers import Image, Labels
from napari_daeformer_training.pairs import Pair

from napari_daeformer.plugin.control.finetune import pair
from napari_daeformer.plugin.widgets._layers import follow, proposals_first

if TYPE_CHECKING:
    from magicgui.widgets import ComboBox, Label

    from napari_daeformer.plugin.hub import Hub


class Pairs:
    """The pairs of the Fine-tune dock (a mixin over its controls)."""

    viewer: Any
    hub: Hub
    closed: bool
    pairs: list[tuple[Image, Labels]]
    _image: ComboBox
    _corrected: ComboBox
    _pairs_info: Label

    def _labels_layers(self, _: Any = None) -> list[Labels]:
        return proposals_first(self.viewer)

    def _layer_added(self, event: Any) -> None:
        if isinstance(event.value, Labels):
            follow(self.viewer, event.value)
        self.reset_choices()

    def _annotated(self, layer_id: Hashable) -> None:
        """A labels layer got a proposal (a run or a restore): make it, and its image, the pair to add."""
        if self.closed:
            return
        self.reset_choices()
        layer = next((x for x in self.viewer.layers if x.unique_id == layer_id), None)
        annotation = self.hub.annotation(layer_id)
        if layer is None or annotation is None or annotation.prediction is None:
            return
        self._corrected.value = layer
        image = next((x for x in self.viewer.layers if isinstance(x, Image) and x.name == annotation.image.name), None)
        if image is not None:
            self._image.value = image

    def _add_pair(self) -> None:
        image, labels = self._image.value, self._corrected.value
        if image is None or labels is None:
            self.report("choose an image layer and its corrected labels layer first")
            return
        self.pairs.append((image, labels))
        self._show_pairs()

    def _clear_pairs(self) -> None:
        self.pairs.clear()
        self._show_pairs()

    def _show_pairs(self) -> None:
        lines = []
        for image, labels in self.pairs:
            n = (int(pair(image.name, image.data, labels.data, follow(self.viewer, labels)).slices.sum())
                 if labels in self.viewer.layers else 0)
            lines.append(f"{html.escape(image.name)} + {html.escape(labels.name)}: {n} corrected slice"
                         f"{'s' if n != 1 else ''}")
        self._pairs_info.value = "<br>".join(lines) or "No pairs yet."
        self._show_plan(fresh=True)
        self.show_agreement()

    def _collect(self) -> list[Pair]:
        pairs = self.pairs or ([(self._image.value, self._corrected.value)]
                               if self._image.value is not None and self._corrected.value is not None else [])
        return [pair(image.name, image.data, labels.data, follow(self.viewer, labels)) for image, labels in pairs]
