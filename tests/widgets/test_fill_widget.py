"""Fill between slices in a real viewer: paint two slices, press the Fine-tune dock's button (or Shift+I on the
layer), the slices between hold the shape, one Ctrl+Z takes it all back; one painted slice is one warning."""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_daeformer.io.sample_data import synthetic_ct

from .conftest import from_plugins_menu


def _paint(layer: Any, z: int, mask: np.ndarray, value: int) -> None:
    """Paint `mask` on slice `z` through the layer API, as the brush does (undo history, paint event)."""
    index = np.nonzero(mask)
    layer.data_setitem((np.full(index[0].shape, z), *index), value)


def _disk(shape: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 <= radius ** 2


def test_fill_between_two_painted_slices_and_undo_in_one_step(make_napari_viewer, qtbot) -> None:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    s = synthetic_ct(seed=3, shape=(16, 64, 64))
    viewer.add_image(s.image, name="CT", scale=s.spacing)
    layer = viewer.add_labels(np.zeros(s.image.shape, np.uint8), name="painted", scale=s.spacing)
    tune = from_plugins_menu("finetune_widget")
    tune._corrected.value = layer
    disk = _disk((64, 64), 12)
    _paint(layer, 3, disk, 2)
    _paint(layer, 11, disk, 2)
    assert any("Shift" in str(k) and "I" in str(k) for k in layer.keymap)      # the key binding is there too
    tune._fill.clicked()
    qtbot.waitUntil(lambda: np.asarray(layer.data)[7].any(), timeout=60_000)
    data = np.asarray(layer.data)
    for z in range(4, 11):
        inter = np.logical_and(data[z] == 2, disk).sum()
        assert 2 * inter / ((data[z] == 2).sum() + disk.sum()) > 0.95
    assert not data[:3].any() and not data[12:].any()                            # nothing beyond the painted range
    layer.undo()                                                                 # Ctrl+Z
    data = np.asarray(layer.data)
    assert not data[4:11].any() and (data[3] == 2).sum() == (data[11] == 2).sum() == disk.sum()


def test_one_painted_slice_is_one_warning(make_napari_viewer, errors: list[str]) -> None:  # type: ignore[no-untyped-def]
    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.zeros((6, 32, 32), np.uint8), name="painted")
    _paint(layer, 2, _disk((32, 32), 5), 1)
    tune = from_plugins_menu("finetune_widget")
    tune._corrected.value = layer
    tune._fill.clicked()
    assert errors == ["DAE-Former: paint at least two slices to fill between them (1 painted)"]
    assert np.asarray(layer.data)[2].any() and not np.asarray(layer.data)[[0, 1, 3, 4, 5]].any()
