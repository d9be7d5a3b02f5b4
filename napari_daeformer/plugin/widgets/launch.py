"""Open napari with the plugin, the synthetic CT sample and the Segment widget (used by `daeformer demo`)."""

from __future__ import annotations


def open_viewer_with_sample() -> None:
    import napari

    viewer = napari.Viewer(title="napari-daeformer demo")
    viewer.open_sample("napari-daeformer", "synthetic_ct")
    viewer.window.add_plugin_dock_widget("napari-daeformer", "Segment with DAE-Former")
    napari.run()
