"""napari widgets: thin Qt/magicgui layers over the engine and the trainer (the only Qt code in the package)."""
