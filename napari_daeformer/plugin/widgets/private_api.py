"""The one place the widgets read magicgui's private members (magicgui has no public API for these); the GUI test
`tests/widgets/test_private_api.py` fails loudly when magicgui changes them.
"""

from __future__ import annotations

from magicgui.widgets import Container
from qtpy.QtWidgets import QWidget


def hide_empty_labels(container: Container) -> None:
    """Let rows without a label span the whole width: magicgui keeps an empty label column for them
    (`_labeled_widget_ref`, `_label_widget`)."""
    for widget in container:
        ref = getattr(widget, "_labeled_widget_ref", None)
        if ref is not None and not widget.label:
            ref()._label_widget.visible = False


def pack_to_top(container: Container) -> QWidget:
    """Rows sit at the top of the dock (a stretch after the last, in magicgui's `_layout`); the inner Qt widget."""
    container._widget._layout.addStretch()
    return container._widget._mgui_get_native_widget()
