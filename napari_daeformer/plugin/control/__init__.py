"""The docks' decisions as plain Python (no Qt, no napari): one controller under each dock widget."""
