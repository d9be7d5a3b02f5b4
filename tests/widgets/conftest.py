"""Shared fixtures of the widget tests."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def errors(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The messages the widgets show as error or warning notifications, in order."""
    messages: list[str] = []
    monkeypatch.setattr("napari_daeformer.plugin.widgets._workers.show_error", messages.append)
    monkeypatch.setattr("napari_daeformer.plugin.widgets.segment.show_warning", messages.append)
    monkeypatch.setattr("napari_daeformer.plugin.widgets.fill.show_warning", messages.append)
    return messages


def from_plugins_menu(name: str) -> Any:
    """Open one of our docks as *Plugins > DAE-Former > ...* does (the menu item's command, in the current
    viewer); the dock's widget."""
    from napari._app_model import get_app_model

    widget, _ = get_app_model().commands.execute_command(f"napari-daeformer.{name}").result()
    return widget
