"""Our docks never crowd the napari window: a dock that would not fit, at a comfortable height, below the ones
already in its area is tabbed with the last of ours there instead (plain Qt: QMainWindow.tabifyDockWidget). Their
minimum height is kept small, so stacking never makes the window taller than the screen."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtWidgets import QDockWidget, QMainWindow, QScrollArea, QWidget

if TYPE_CHECKING:
    import napari

SETTLE_S = 3.0                      # how long after a dock opens the window's own layout may still move it
DEBOUNCE_MS = 100
COMFORTABLE = 470                   # the height at which each of our docks shows its buttons and verdict unscrolled
MARK = "napari-daeformer-dock"              # a Qt property on our docks: ours, among all the window's docks


def _dock_of(widget: QWidget) -> QDockWidget | None:
    parent = widget.parentWidget()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parentWidget()
    return parent


def _shown_in(window: QMainWindow, area: object, but: QDockWidget | None = None) -> list[QDockWidget]:
    """The docked, shown docks of `window` in `area`, `but` left out."""
    return [d for d in window.findChildren(QDockWidget) if d is not but and not d.isHidden() and not d.isFloating()
            and window.dockWidgetArea(d) == area]


def _needed_height(window: QMainWindow, docks: list[QDockWidget]) -> int:
    """The height `docks` need stacked: ours COMFORTABLE, the others their minimum (a tab group counts once, at its
    tallest)."""
    groups: list[set[QDockWidget]] = []
    for dock in docks:
        group = {dock, *(d for d in window.tabifiedDockWidgets(dock) if d in docks)}
        if not any(group & g for g in groups):
            groups.append(group)
    return sum(max(max(d.minimumSizeHint().height(), COMFORTABLE if d.property(MARK) else 0) for d in g)
               for g in groups)


def _content_height(dock: QDockWidget) -> int:
    """The height at which the dock shows all its content (title bar included) without scrolling."""
    scroll = dock.findChild(QScrollArea)
    if scroll is None or scroll.widget() is None:
        return dock.sizeHint().height()
    return scroll.widget().sizeHint().height() + max(dock.height() - scroll.height(), 0) + 2


def fit(dock: QDockWidget) -> bool:
    """Tab `dock` with the last of our docks in its area when stacking it would crowd the window; whether it was
    tabbed."""
    window = dock.parentWidget()
    if not isinstance(window, QMainWindow) or dock.isFloating():
        return False
    stacked = _shown_in(window, window.dockWidgetArea(dock), but=dock)
    ours = [d for d in stacked if d.property(MARK)]
    free = window.height() - window.menuBar().height() - (window.statusBar().height() if window.statusBar() else 0)
    tabbed = bool(ours) and _needed_height(window, [*stacked, dock]) > free
    if tabbed:
        window.tabifyDockWidget(ours[-1], dock)
        dock.raise_()
        _whole_titles(window, dock)
    return tabbed


def _whole_titles(window: QMainWindow, dock: QDockWidget) -> None:
    """The tab bar that holds `dock` shows whole titles (arrows scroll it where they do not fit), where Qt would
    cut every title to a few words ("Segment with DAE-F...")."""
    from qtpy.QtWidgets import QTabBar

    for bar in window.findChildren(QTabBar):
        if any(bar.tabText(i) == dock.windowTitle() for i in range(bar.count())):
            bar.setElideMode(Qt.TextElideMode.ElideNone)
            bar.setUsesScrollButtons(True)


def compact(dock: QDockWidget) -> None:
    """Share the height of our stacked docks in `dock`'s area by their content: where all fit, the upper ones take
    their content's height and the lowest the rest; where they do not, `dock` (the one just opened: what the user is
    about to use) takes its content's height first and the others share what is left, upper first, each scrolling
    what it cannot show (call once the window has laid the docks out)."""
    window = dock.parentWidget()
    if not isinstance(window, QMainWindow):
        return
    ours = [d for d in _shown_in(window, window.dockWidgetArea(dock)) if d.property(MARK)]
    groups: list[QDockWidget] = []                      # one of ours per tab group: the tab on top
    for d in ours:
        group = [g for g in groups if g in window.tabifiedDockWidgets(d)]
        if not group:
            groups.append(d)
        elif d.y() > group[0].y():                      # a tab behind another sits off screen (negative y)
            groups[groups.index(group[0])] = d
    stacked = sorted(groups, key=lambda d: d.y())
    if len(stacked) < 2:
        return
    total = sum(d.height() for d in stacked)
    wanted = {d: _content_height(d) for d in stacked}
    first = next((d for d in stacked if d is dock or d in window.tabifiedDockWidgets(dock)), None)
    if sum(wanted.values()) <= total or first is None:
        order = stacked[:-1]                            # the lowest takes the rest
    else:
        order = [first, *(d for d in stacked if d is not first)][:-1]
    heights: dict[QDockWidget, int] = {}
    for d in order:
        later = sum(o.minimumSizeHint().height() for o in stacked if o is not d and o not in heights)
        heights[d] = max(min(wanted[d], total - sum(heights.values()) - later), d.minimumSizeHint().height())
    rest = next(d for d in stacked if d not in heights)
    heights[rest] = max(total - sum(heights.values()), 0)
    window.resizeDocks(stacked, [heights[d] for d in stacked], Qt.Orientation.Vertical)


class FitOnShow(QObject):
    """Installed on a dock's content: the first time it is shown in a dock, `fit` that dock; then, while the window
    lays the docks out (for SETTLE_S), `compact` them once each burst of resizes ends. Later resizes are the
    user's: never undone."""

    def __init__(self, content: QWidget) -> None:
        super().__init__(content)
        self.dock: QDockWidget | None = None
        self.until = 0.0
        self.timer = QTimer(self)                      # dies with the dock: never fires on a deleted one
        self.timer.setSingleShot(True)
        self.timer.setInterval(DEBOUNCE_MS)
        self.timer.timeout.connect(lambda: self.dock is not None and compact(self.dock))
        content.installEventFilter(self)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        kind = event.type()
        if self.dock is None and kind == QEvent.Type.Show and isinstance(watched, QWidget):
            dock = _dock_of(watched)
            if dock is not None:
                dock.setProperty(MARK, True)
                fit(dock)
                self.dock, self.until = dock, time.monotonic() + SETTLE_S
                self.timer.start()
        elif self.dock is not None and kind == QEvent.Type.Resize and time.monotonic() < self.until:
            self.timer.start()                         # restarted: compact once the layout is still
        return False


def open_plugin_dock(viewer: napari.Viewer, command: str) -> QWidget:
    """Dock this plugin's widget contributed as `command` (its npe2 command id, e.g. `napari-daeformer.segment_widget`)
    under the name the Plugins menu gives it (`Widget (Plugin)`, both display names read from the manifest), so the
    menu finds that dock instead of adding a second; an open one is shown and raised. Returns the widget.

    napari's `add_plugin_dock_widget` names a dock after the plugin's package name, the menu after its display name:
    a dock opened one way and then the other was docked twice (napari 0.9)."""
    import npe2
    from napari.plugins import _npe2, menu_item_template

    manifest = npe2.PluginManager.instance().get_manifest("napari-daeformer")
    name = next(w.display_name for w in manifest.contributions.widgets or [] if w.command == command)
    full_name = menu_item_template.format(manifest.display_name, name)
    window = viewer.window
    dock = window._wrapped_dock_widgets.get(full_name)         # napari keeps its docks by name only here
    if dock is None:
        make, _ = _npe2.get_widget_contribution(manifest.name, name)  # type: ignore[misc]
        dock = window.add_dock_widget(make(viewer), name=full_name, area="right")
    dock.show()
    dock.raise_()
    return dock.inner_widget()
