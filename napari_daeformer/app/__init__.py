"""The application layer: the `daeformer` command line and the demo.

Layers, each importing only those below it (tests/test_package.py walks every module to pin this):

    app (this package)        command line, demo
    widgets                   the napari dock widgets (Qt)
    training                  the bundled trainer and fine-tuning (plain PyTorch)
    core (napari_daeformer)   model, checkpoints, I/O, inference engine, batch, metrics (no Qt, no training)
"""
