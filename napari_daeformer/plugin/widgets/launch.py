"""Open napari with the plugin, the synthetic CT sample and the Segment widget (used by `daeformer demo`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import napari


def demo_viewer(viewer: napari.Viewer) -> None:
    """The demo's first screen in `viewer`: the CT selected (the hidden ground truth is not the layer the controls
    edit), the Segment dock as the Plugins menu opens it, and the view fitted once the dock has taken its width."""
    from qtpy.QtCore import QTimer

    from napari_daeformer.plugin.widgets._docking import open_plugin_dock

    layers = viewer.open_sample("napari-daeformer", "synthetic_ct")
    open_plugin_dock(viewer, "napari-daeformer.segment_widget")
    viewer.layers.selection.active = next(layer for layer in layers if layer.visible)
    QTimer.singleShot(0, viewer.reset_view)


def open_viewer_with_sample() -> None:
    import napari

    demo_viewer(napari.Viewer(title="napari-daeformer demo"))
    napari.run()
