"""magicgui's private members that `widgets/private_api` reads still exist and still do what it takes them to do."""

from __future__ import annotations

import pytest
from magicgui.widgets import Container, Label, SpinBox
from qtpy.QtWidgets import QWidget

from napari_daeformer.plugin.widgets.private_api import hide_empty_labels, pack_to_top

pytestmark = pytest.mark.gui


def test_unlabelled_rows_span_and_rows_pack_to_the_top(qtbot) -> None:  # type: ignore[no-untyped-def]
    status, spin = Label(value="Segmenting…", label=""), SpinBox(label="batch size")
    container = Container(widgets=[spin, status], labels=True)
    hide_empty_labels(container)
    assert status._labeled_widget_ref()._label_widget.native.isHidden()          # hidden, not just unshown
    assert not spin._labeled_widget_ref()._label_widget.native.isHidden()
    layout = container._widget._layout
    count = layout.count()
    inner = pack_to_top(container)
    assert isinstance(inner, QWidget) and layout.count() == count + 1
    assert layout.itemAt(count).spacerItem() is not None                    # the stretch after the last row
