"""How the viewer feels during a run: event-loop gaps per numeric path and the time to the first visible slice.

A real napari viewer (run under Xvfb: `xvfb-run -a env QT_QPA_PLATFORM=xcb python benchmarks/bench_responsiveness.py`)
segments the bundled CT sample from the Segment dock with each precision in turn. A 10 ms QTimer ticks on the GUI
thread meanwhile; a gap between ticks is time the viewer could not answer the user. Reported per path: the longest
and 99th-percentile gap, the time from Run to the first slice drawn and to the end. The int8 package is compiled
before timing (its one-time cost is `bench_model.py`'s "prepare" column).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import cpu_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", default="fp32,bf16,int8", help="comma-separated segment-widget precisions")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("DAEFORMER_CACHE", tempfile.mkdtemp(prefix="daeformer-int8-"))
    os.environ.setdefault("DAEFORMER_AUTOSAVE_DIR", tempfile.mkdtemp(prefix="daeformer-autosave-"))
    import napari
    import torch
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_daeformer.engine import probes
    from napari_daeformer.engine.inference import SliceInferer
    from napari_daeformer.model.bundled import bundled_model
    from napari_daeformer.model.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    viewer.open_sample("napari-daeformer", "synthetic_ct")
    image = viewer.layers["synthetic CT"]
    _, widget = viewer.window.add_plugin_dock_widget("napari-daeformer", "Segment with DAE-Former")
    app = QApplication.instance()
    print(f"CPU: {cpu_name()}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'precision':<10} {'path':<14} {'max gap s':>9} {'p99 gap s':>9} {'first slice s':>13} {'total s':>8}")
    for precision in args.precisions.split(","):
        if precision == "bf16" and not probes.cpu_has_native_bf16():
            continue
        if precision == "int8":                                      # compile once, outside the timing
            SliceInferer(load_checkpoint(bundled_model("ct")), device="cpu", precision="int8").segment(np.asarray(image.data))
        widget._precision.value = precision
        widget._mode.value = "new labels layer"
        ticks: list[float] = []
        timer = QTimer()
        timer.setInterval(10)
        timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
        first: list[float] = []
        show = widget._show_progress
        widget._show_progress = lambda target, p: (first.append(time.perf_counter()) if p.labels is not None
                                                   and not first else None, show(target, p))
        timer.start()
        t0 = time.perf_counter()
        widget._run.clicked()
        while widget.running:
            app.processEvents()
            time.sleep(0.001)
        total = time.perf_counter() - t0
        timer.stop()
        widget._show_progress = show
        gaps = np.diff(ticks) if len(ticks) > 1 else np.array([total])
        path = getattr(widget, "last_result", None)
        print(f"{precision:<10} {(path.path if path else '?'):<14} {gaps.max():>9.3f} {np.percentile(gaps, 99):>9.3f} "
              f"{(first[0] - t0) if first else float('nan'):>13.2f} {total:>8.2f}")
        for layer in [x for x in viewer.layers if x.name.startswith("synthetic CT DAE-Former")]:
            viewer.layers.remove(layer)
    viewer.close()


if __name__ == "__main__":
    main()
