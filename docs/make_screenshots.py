"""Regenerate the documentation's screenshots from a real napari window.

    xvfb-run -a -s "-screen 0 1600x1000x24" env QT_QPA_PLATFORM=xcb python docs/make_screenshots.py [ct skin batch teach]

Each scene drives the plugin as a user would (open a file through the reader, press Run, paint corrections,
fine-tune, run a folder) and saves the whole window, dock widgets included, under docs/images/.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication
from skimage import io as skio

from napari_daeformer.io.nifti import write_nifti
from napari_daeformer.io.record import default_affine
from napari_daeformer.io.sample_data import (
    CHEST_CLASSES,
    CT_CLASSES,
    Sample,
    shifted,
    spine_mask,
    synthetic_chest,
    synthetic_ct,
    synthetic_skin,
    with_liver_lesions,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_sparse import annotated  # noqa: E402  (the slices an annotator picks, as the benchmark paints them)

OUT = Path(__file__).parent / "images"
SIZE = (1600, 1000)


def wait(condition, timeout: float = 300.0) -> None:  # type: ignore[no-untyped-def]
    end = time.time() + timeout
    while not condition():
        QApplication.processEvents()
        time.sleep(0.02)
        if time.time() > end:
            raise TimeoutError("scene did not finish")
    for _ in range(20):
        QApplication.processEvents()


def new_viewer() -> napari.Viewer:
    from napari.settings import get_settings

    get_settings().application.gui_notification_level = "none"     # no toasts over the canvas
    viewer = napari.Viewer(title="napari-daeformer", show=True)
    viewer.window._qt_window.resize(*SIZE)
    return viewer


def from_plugins_menu(name: str):  # type: ignore[no-untyped-def]
    """Open a dock as Plugins > DAE-Former > ... does."""
    from napari._app_model import get_app_model

    return get_app_model().commands.execute_command(f"napari-daeformer.{name}").result()[0]


def save(viewer: napari.Viewer, name: str) -> None:
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    viewer.reset_view()
    wait(lambda: True)
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    wait(lambda: True)
    viewer.window.screenshot(str(OUT / name), canvas_only=False)
    print("wrote", OUT / name)


def ct_scenes(tmp: Path) -> None:
    sample = synthetic_ct(seed=0)
    path = write_nifti(tmp / "abdomen.nii.gz", sample.image, default_affine(sample.spacing))
    viewer = new_viewer()
    viewer.open(str(path), plugin="napari-daeformer")
    _, segment = viewer.window.add_plugin_dock_widget("napari-daeformer", "Segment with DAE-Former")
    segment._image.value = viewer.layers["abdomen"]
    segment._run.clicked()
    wait(lambda: not segment.running)
    viewer.dims.set_current_step(0, 30)
    save(viewer, "ct_segment.png")
    labels = viewer.layers["abdomen DAE-Former"]
    yy, xx = np.mgrid[80:100, 60:80]
    for z in (24, 30):                                  # two slices painted, then napari "crashes" (closed)
        labels.data_setitem((np.full(yy.size, z), yy.ravel(), xx.ravel()), 4)
    saver = next(iter(segment.autosavers.values()))
    wait(lambda: not saver.timer.isActive() and saver.pending is not None and saver.pending.done())
    viewer.close()

    viewer = new_viewer()                               # the same file opened again: the dock offers to restore
    viewer.open(str(path), plugin="napari-daeformer")
    _, segment = viewer.window.add_plugin_dock_widget("napari-daeformer", "Segment with DAE-Former")
    segment._image.value = viewer.layers["abdomen"]
    viewer.dims.set_current_step(0, 30)
    save(viewer, "ct_restore.png")
    viewer.close()

    # Fine-tuning pays off when the scan does not look like the training data: here the same phantom from a
    # scanner whose calibration is 150 HU off; the bundled model is unchanged.
    offset = shifted(sample, "offset")
    path = write_nifti(tmp / "abdomen_offset.nii.gz", offset.image, default_affine(sample.spacing))
    viewer = new_viewer()
    viewer.open(str(path), plugin="napari-daeformer")
    viewer.layers[-1].name = "abdomen"
    segment = from_plugins_menu("segment_widget")       # as a user does: the Plugins menu, then the fine-tune dock
    segment._image.value = viewer.layers["abdomen"]
    segment._run.clicked()
    wait(lambda: not segment.running)

    labels = viewer.layers["abdomen DAE-Former"]
    segment_before = np.array(labels.data, copy=True)
    for z in (12, 20, 28, 36):                          # "corrections": the phantom's ground truth, as painting
        index = np.nonzero(np.ones_like(sample.labels[z], bool))
        labels.data_setitem((np.full(index[0].shape, z), *index), sample.labels[z][index])
    tune = from_plugins_menu("finetune_widget")
    assert tune._corrected.value is labels                # the default: the proposal just corrected
    tune._add.clicked()
    tune._device.value = "cpu"
    tune._run.clicked()
    wait(lambda: not tune.running)
    viewer.dims.set_current_step(0, 30)
    save(viewer, "ct_finetune.png")
    segment._run.clicked()                              # Run in the same Segment dock: the fine-tuned model
    wait(lambda: not segment.running)
    viewer.layers["abdomen DAE-Former"].visible = False
    save(viewer, "ct_resegmented.png")
    again = viewer.layers[-1]                           # the new model's proposal, corrected on the same slices
    from napari_daeformer.base.metrics import dice_per_class
    rest = [z for z in range(len(sample.labels)) if z not in (12, 20, 28, 36)]
    for name, layer in (("parent", labels), ("fine-tuned", again)):
        proposal = np.asarray(layer.data)[rest] if layer is again else segment_before[rest]
        print(f"{name}: mean Dice on the uncorrected slices",
              round(float(np.nanmean(dice_per_class(proposal, sample.labels[rest], 6))), 3))
    print("Segment docks:", [n for n in viewer.window.dock_widgets if n.startswith("Segment")])
    for z in (12, 20, 28, 36):
        index = np.nonzero(np.ones_like(sample.labels[z], bool))
        again.data_setitem((np.full(index[0].shape, z), *index), sample.labels[z][index])
    tune._clear.clicked()
    tune._image.value, tune._corrected.value = viewer.layers["abdomen"], again
    tune._add.clicked()
    tune.tabs.setCurrentIndex(1)
    print("agreement per version:", [(v.version, round(v.dice, 3)) for v in tune.agreement_plot.versions])
    save(viewer, "ct_agreement.png")
    viewer.close()


def skin_scene(tmp: Path) -> None:
    skio.imsave(str(tmp / "lesion.png"), synthetic_skin(seed=7, size=(384, 384)).image, check_contrast=False)
    viewer = new_viewer()
    viewer.open(str(tmp / "lesion.png"), plugin="napari-daeformer")
    _, segment = viewer.window.add_plugin_dock_widget("napari-daeformer", "Segment with DAE-Former")
    segment._model.value = "bundled skin demo (synthetic)"
    segment._image.value = viewer.layers["lesion"]
    segment._run.clicked()
    wait(lambda: not segment.running)
    viewer.layers["lesion DAE-Former"].opacity = 0.45
    save(viewer, "skin_segment.png")
    viewer.close()


def batch_scene(tmp: Path) -> None:
    src = tmp / "scans"
    (src / "photos").mkdir(parents=True)
    for s in range(3):
        ct = synthetic_ct(seed=20 + s, shape=(24, 160, 160))
        ct = shifted(ct, "offset") if s == 1 else ct    # patient02 from a miscalibrated scanner: ranked first
        write_nifti(src / f"patient{s + 1:02d}.nii.gz", ct.image, default_affine(ct.spacing))
    for s in range(2):
        skio.imsave(str(src / "photos" / f"lesion{s + 1}.png"), synthetic_skin(seed=30 + s).image,
                    check_contrast=False)
    (src / "notes.txt").write_text("not an image")
    viewer = new_viewer()
    _, batch = viewer.window.add_plugin_dock_widget("napari-daeformer", "Batch segment folder")
    batch._input.value, batch._output.value = src, tmp / "masks"
    batch._run.clicked()
    wait(lambda: not batch.running)
    batch._next_case.clicked()                          # the case the model doubts most, at its most uncertain slice
    save(viewer, "batch.png")
    viewer.close()


def paint(layer, truth: np.ndarray, slices: list[int], only: int | None = None) -> None:  # type: ignore[no-untyped-def]
    """Paint `truth` (or only its label `only`) on `slices` of a labels layer, as the brush does."""
    for z in slices:
        index = np.nonzero(truth[z] == only) if only is not None else np.nonzero(np.ones_like(truth[z], bool))
        layer.data_setitem((np.full(index[0].shape, z), *index), truth[z][index])


def teach_scenes(tmp: Path, minutes: float) -> None:
    """A chest CT no bundled model knows: 5 slices painted, a new model trained, then the Segment dock runs it."""
    from napari_daeformer.plugin.widgets.finetune import FROM_NEW

    chest = synthetic_chest(seed=0)
    path = write_nifti(tmp / "chest.nii.gz", chest.image, default_affine(chest.spacing))
    viewer = new_viewer()
    viewer.open(str(path), plugin="napari-daeformer")
    viewer.layers[-1].name = "chest"
    painted = viewer.add_labels(np.zeros(chest.labels.shape, np.uint8), name="chest structures", scale=chest.spacing)
    slices = annotated(chest.labels, 5).tolist()
    paint(painted, chest.labels, slices)
    segment = from_plugins_menu("segment_widget")
    tune = from_plugins_menu("finetune_widget")
    tune._image.value, tune._corrected.value = viewer.layers["chest"], painted
    tune._start_from.value = FROM_NEW
    tune._classes.value = ", ".join(CHEST_CLASSES)
    tune._minutes.value, tune._device.value = minutes, "cpu"
    tune._run.clicked()
    wait(lambda: not tune.running, timeout=60 * minutes + 300)
    viewer.dims.set_current_step(0, slices[2])
    save(viewer, "teach_train.png")
    segment._image.value = viewer.layers["chest"]
    segment._run.clicked()
    wait(lambda: not segment.running)
    painted.visible = False
    viewer.dims.set_current_step(0, (slices[1] + slices[2]) // 2)      # a slice nobody painted
    save(viewer, "teach_segment.png")
    viewer.close()


def added_class_scene(tmp: Path, sample: Sample, mask: np.ndarray, name: str, slices: list[int], at: int,
                      shot: str) -> None:
    """A class added to the bundled CT model: `mask` painted as label 6 (`name`) on `slices` of its proposal,
    fine-tuned, re-segmented, and shown at slice `at`."""
    path = write_nifti(tmp / "abdomen.nii.gz", sample.image, default_affine(sample.spacing))
    viewer = new_viewer()
    viewer.open(str(path), plugin="napari-daeformer")
    viewer.layers[-1].name = "abdomen"
    segment = from_plugins_menu("segment_widget")
    segment._image.value = viewer.layers["abdomen"]
    segment._run.clicked()
    wait(lambda: not segment.running)
    labels = viewer.layers["abdomen DAE-Former"]
    paint(labels, np.where(mask, 6, 0).astype(np.uint8), slices, only=6)
    tune = from_plugins_menu("finetune_widget")
    tune._image.value, tune._corrected.value = viewer.layers["abdomen"], labels
    tune._classes.value = ", ".join((*CT_CLASSES, name))
    tune._add.clicked()
    tune._device.value = "cpu"
    tune._run.clicked()
    wait(lambda: not tune.running, timeout=900)
    segment._run.clicked()
    wait(lambda: not segment.running)
    labels.visible = False
    viewer.dims.set_current_step(0, at)
    save(viewer, shot)
    viewer.close()


def add_class_scene(tmp: Path) -> None:
    """The spine (bone the model calls background) painted on 4 slices."""
    sample = synthetic_ct(seed=31)
    added_class_scene(tmp, sample, spine_mask(sample), "spine", [6, 18, 30, 42], 24, "add_class.png")


def tumour_scene(tmp: Path) -> None:
    """A class inside one the model knows: two liver tumours painted on 4 of the slices holding them, shown on the
    widest slice nobody painted."""
    sample, mask = with_liver_lesions(synthetic_ct(seed=31), 31, radius_mm=(8.0, 14.0))
    slices = annotated(mask, 4).tolist()
    widest = max((z for z in range(len(mask)) if z not in slices), key=lambda z: int(mask[z].sum()))
    added_class_scene(tmp, sample, mask, "liver tumour", slices, int(widest), "add_class_tumour.png")


def main() -> int:
    OUT.mkdir(exist_ok=True)
    only = sys.argv[1:]                                 # scene names (ct, skin, batch, teach, add-class, tumour); default: all
    with tempfile.TemporaryDirectory() as tmp:
        if not only or "ct" in only:
            ct_scenes(Path(tmp))
        if not only or "skin" in only:
            skin_scene(Path(tmp))
        if not only or "batch" in only:
            batch_scene(Path(tmp))
        if not only or "teach" in only:
            teach_scenes(Path(tmp), minutes=5.0)
        if not only or "add-class" in only:
            add_class_scene(Path(tmp))
        if not only or "tumour" in only:
            tumour_scene(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
