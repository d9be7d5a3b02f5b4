"""The application layer: the `daeformer` command line and the demo, on top of every other layer.

The layers, each a folder importing only those below it (tests/test_package.py pins this; docs/architecture.md):
base < io < model < engine < session < tasks < training < plugin < plugin.control < plugin.widgets < app.
"""
