"""Shared fixtures of the widget tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def errors(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The messages the widgets show as error or warning notifications, in order."""
    messages: list[str] = []
    monkeypatch.setattr("napari_daeformer.widgets._workers.show_error", messages.append)
    monkeypatch.setattr("napari_daeformer.widgets.segment.show_warning", messages.append)
    return messages
