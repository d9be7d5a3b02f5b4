"""The Segment dock's autosave and restore offer, in Qt: the decisions (which sessions are unrestored, what to offer,
how to read one back) are the controller's (`control.segment.SegmentController`); this mixin shows the offer, adds
the restored labels as a layer and starts its autosave."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_info

from napari_daeformer.base.errors import DaeformerError
from napari_daeformer.io import geometry_from_metadata
from napari_daeformer.plugin.widgets._layers import attach, labels_kwargs
from napari_daeformer.plugin.widgets.autosave import Autosaver, autosave
from napari_daeformer.session.annotation import USER_FOLDER, Annotation, SavedSession, default_folder, image_key

if TYPE_CHECKING:
    from magicgui.widgets import FileEdit, Label, PushButton

    from napari_daeformer.plugin.control.segment import Offer, SegmentController
    from napari_daeformer.plugin.hub import Hub


def voxels(image: Image) -> int:
    """The voxels of an image layer's spatial grid (a photo's colour channels not counted)."""
    return int(np.prod(np.shape(image.data)[:-1] if image.rgb else np.shape(image.data)))


class SessionRestore:
    """Autosave and the restore offer of the Segment dock (a mixin over its controls and controller)."""

    viewer: Any
    control: SegmentController
    hub: Hub
    autosavers: dict[Any, Autosaver]
    _autosave_dir: FileEdit
    _restore_info: Label
    _restore: PushButton
    _discard: PushButton
    _session: tuple[Image, Offer] | None
    _keys: dict[Any, tuple[Any, str]]
    _target: Any

    def autosave_folders(self, image: Image) -> list[Path]:
        """Where this image's sessions are written (first) and looked for."""
        chosen = str(self._autosave_dir.value)
        source = (geometry_from_metadata(image.metadata) or {}).get("source_path") or (
            str(image.source.path) if image.source.path else None)
        default = default_folder(source)
        return list(dict.fromkeys([Path(chosen) if chosen not in ("", ".") else default, default, USER_FOLDER]))

    def _unrestored(self, image: Image) -> list[Path]:
        """The image's autosaved sessions whose labels are not open in this viewer, newest first."""
        return self.control.unrestored(self.autosave_folders(image), self._image_key(image),
                                       [a.id for a in self.hub.annotations.values()],
                                       [saver.path for saver in self.autosavers.values()])

    def _offer_restore(self, image: Image | None) -> None:
        """Offer the newest autosaved session of `image` whose labels are not open (how many more there are, too)."""
        offer = self.control.offer(self._unrestored(image), image.name, voxels(image)) if image is not None else None
        self._session = None if offer is None else (image, offer)
        self._restore_info.value = html.escape(offer.text) if offer else ""
        self._restore_info.visible = offer is not None
        self._restore.visible = offer is not None and offer.readable
        self._discard.visible = offer is not None                            # a damaged one can be discarded too

    def _image_key(self, image: Image) -> str:
        """`image_key` of the layer's pixels, computed once per data array."""
        cached = self._keys.get(image.unique_id)
        if cached is None or cached[0] is not image.data:
            cached = (image.data, image_key(np.asarray(image.data)))
            self._keys[image.unique_id] = cached
        return cached[1]

    def restore_session(self) -> Labels | None:
        """Add the offered session's labels as a new layer on its image: corrected slices, proposal and model kept;
        autosaving goes on into the same file."""
        if self._session is None:
            return None
        image, offer = self._session
        try:
            saved: SavedSession = self.control.restore(offer, np.shape(image.data), voxels(image))
        except DaeformerError as e:
            self.report(f"cannot restore: {e}")
            return None
        a = saved.annotation
        kwargs = labels_kwargs(image, a.class_names, a.class_colors, saved.labels.ndim, a.checkpoint,
                               a.checkpoint_sha256)
        kwargs["name"] = a.layer_name or kwargs["name"]
        layer = self.viewer.add_labels(saved.labels, **kwargs)
        attach(self.viewer, layer, a)
        self.reset_choices()
        self._target.value = layer
        self._autosave(layer, a, offer.path)
        show_info(f"DAE-Former: restored the autosaved corrections of {image.name}")
        self._offer_restore(image)
        self._restore_info.value = f"Restored {html.escape(saved.describe())}." + (
            f" {self._restore_info.value}" if self._session is not None else "")
        self._restore_info.visible = True
        return layer

    def _discard_session(self) -> None:
        if self._session is not None:
            image, offer = self._session
            offer.path.unlink(missing_ok=True)
            self._offer_restore(image)

    def _autosave(self, layer: Labels, annotation: Annotation, path: Path) -> None:
        """Save `layer` now (into `path`, its annotation's own file) and whenever the user pauses painting."""
        saver = self.autosavers.get(layer.unique_id)
        if saver is None:
            self.autosavers[layer.unique_id] = autosave(self.hub, layer, annotation, path)
        else:
            saver.save_now()
