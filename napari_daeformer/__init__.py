"""napari-daeformer: DAE-Former segmentation of CT volumes and skin photos in napari.

Importing this package loads neither Qt nor napari; the widgets live in `napari_daeformer.plugin.widgets`.
"""

__version__ = "0.1.0"
