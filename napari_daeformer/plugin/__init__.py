"""The napari plugin: npe2 contributions (reader, writer, samples, activation), the per-viewer `hub`, the docks'
Qt-free controllers (`control`) and the Qt widgets over them (`widgets`)."""
