"""How the viewer feels during a run: event-loop gaps per numeric path and the time to the first visible slice.

A real napari viewer (run under Xvfb: `xvfb-run -a env QT_QPA_PLATFORM=xcb python benchmarks/bench_responsiveness.py`)
segments the bundled CT sample from the Segment dock with each precision in turn. A 10 ms QTimer ticks on the GUI
thread meanwhile; a gap between ticks is time the viewer could not answer the user. Reported per path: the longest
and 99th-percentile gap, the time from Run to the first slice drawn and to the end. The int8 package is compiled
before timing (its one-time cost is `bench_model.py`'s "prepare" column).

`--teach SECONDS`: a teaching session instead (the Teach dock on the chest phantom, 34 x 128 x 128, 3 slices
painted): for SECONDS the robot moves to the next slice every 2 s (wrapping round) and paints the truth on another
every 10 s. Reported: the event loop's gaps (p95, max), the seconds from opening a slice to its proposal, and from
painting a slice to a proposal from a model trained on it on the slice on screen.
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
    parser.add_argument("--teach", type=float, help="seconds of a teaching session (instead of the precisions)")
    args = parser.parse_args()
    if args.teach:
        teach_session(args.teach, args.threads)
        return
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
        report = getattr(widget, "last_result", None)                   # a FileReport
        path = report.segmentation.numeric_path if report else "?"
        print(f"{precision:<10} {path:<14} {gaps.max():>9.3f} {np.percentile(gaps, 99):>9.3f} "
              f"{(first[0] - t0) if first else float('nan'):>13.2f} {total:>8.2f}")
        for layer in [x for x in viewer.layers if x.name.startswith("synthetic CT DAE-Former")]:
            viewer.layers.remove(layer)
    viewer.close()


def teach_session(seconds: float, threads: int) -> None:
    """The `--teach` run (module docstring)."""
    os.environ.setdefault("DAEFORMER_AUTOSAVE_DIR", tempfile.mkdtemp(prefix="daeformer-autosave-"))
    os.environ["HOME"] = tempfile.mkdtemp(prefix="daeformer-home-")          # the saved model goes there
    import napari
    import torch
    from napari._app_model import get_app_model
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_daeformer.io.sample_data import synthetic_chest

    torch.set_num_threads(threads)
    s = synthetic_chest(0)
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    viewer.add_image(s.image, name="chest", scale=s.spacing)
    layer = viewer.add_labels(np.zeros(s.labels.shape, np.uint8), name="chest labels", scale=s.spacing)
    widget, _ = get_app_model().commands.execute_command("napari-daeformer.teach_widget").result()

    def paint(z: int) -> None:
        index = np.nonzero(s.labels[z])
        layer.data_setitem((np.full(index[0].shape, z), *index), s.labels[z][index])

    for z in (4, 16, 28):
        paint(z)
    widget._labels.value = layer
    widget._classes.value = ", ".join(s.class_names)
    app = QApplication.instance()
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    widget._run.clicked()
    while widget.proposal_layer is None:                             # the session has started (its model built)
        app.processEvents()
        time.sleep(0.001)
    timer.start()
    t0 = time.perf_counter()
    todo = [z for z in range(len(s.labels)) if z not in (4, 16, 28)]
    visit, painted_at, refreshed = 0, [], []
    events: list[tuple[float, str]] = []                             # what the robot did, when: for the longest gaps
    next_move, next_paint = t0 + 2.0, t0 + 10.0
    while time.perf_counter() - t0 < seconds:
        app.processEvents()
        time.sleep(0.001)
        now, teaching = time.perf_counter(), widget.control.teaching
        if now >= next_move:
            z = todo[visit % len(todo)]
            visit += 1
            events.append((now, f"moved to slice {z}"))
            viewer.dims.set_point(0, float(layer.data_to_world([z, 0, 0])[0]))
            next_move = now + 2.0
        if now >= next_paint and teaching is not None:
            z = todo.pop(len(todo) // 2)
            events.append((now, f"painted slice {z}"))
            paint(z)
            painted_at.append((z, now, None))
            next_paint = now + 10.0
        for k, (z, at, version) in enumerate(painted_at):           # the first version trained on the slice
            if version is None and teaching is not None and teaching.trained_on[z]:
                painted_at[k] = (z, at, teaching.version)
            elif version is not None and any(v >= version for v in widget.shown.values()) and \
                    widget.shown.get(widget._slice_now(), -1) >= version:
                refreshed.append(time.perf_counter() - at)
                painted_at[k] = (z, at, 10 ** 9)
    timer.stop()
    widget._cancel.clicked()
    end = time.perf_counter() + 2.0                                  # the last proposal and the save settle
    while widget.running or time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.001)
    gaps = np.diff(ticks)
    latency = np.array(widget.latencies)
    print(f"CPU: {cpu_name()}, {threads} threads, torch {torch.__version__}; teaching {seconds:.0f} s, model "
          f"v{widget.control.teaching.version}, {int(widget.control.teaching.trained_on.sum())} slices trained on")
    print(f"event-loop gaps: p95 {1000 * np.percentile(gaps, 95):.0f} ms, p99 {1000 * np.percentile(gaps, 99):.0f} "
          f"ms, max {1000 * gaps.max():.0f} ms")
    for k in np.argsort(gaps)[::-1][:5]:                             # the longest gaps, and what came just before
        at = ticks[k]
        before = [what for when, what in events if at - 0.5 <= when <= at + gaps[k]]
        print(f"  gap {1000 * gaps[k]:.0f} ms at {at - t0:.1f} s{': ' + before[-1] if before else ''}")
    print(f"opening a slice to its proposal: median {np.median(latency):.2f} s, max {latency.max():.2f} s "
          f"({len(latency)} proposals)")
    print(f"painting a slice to a proposal trained on it, on the slice on screen: "
          f"{', '.join(f'{r:.1f}' for r in refreshed) or 'none'} s")
    viewer.close()


if __name__ == "__main__":
    main()
