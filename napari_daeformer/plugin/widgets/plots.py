"""The Fine-tune dock's two small plots, in napari's theme: the loss and held-out Dice of a run, and how much of each
model version's proposals the user kept."""

from __future__ import annotations

from napari_daeformer.session.agreement import VersionAgreement


class ThemedPlot:
    """A small matplotlib canvas in the dock, in napari's theme."""

    def __init__(self, theme: str = "dark") -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure
        from napari.utils.theme import get_theme

        colours = get_theme(theme)
        self.background, self.text = colours.background.as_hex(), colours.text.as_hex()
        self.highlight = colours.current.as_hex()
        self.figure = Figure(figsize=(3.4, 1.5), dpi=90, tight_layout=True, facecolor=self.background)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(130)
        self.axes = self.figure.add_subplot(111)

    def _style(self, axes: object, ylabel: str, colour: str) -> None:
        from matplotlib.ticker import MaxNLocator

        axes.set_facecolor(self.background)                                   # type: ignore[attr-defined]
        axes.set_ylabel(ylabel, fontsize=9, color=colour)                     # type: ignore[attr-defined]
        axes.tick_params(labelsize=8, colors=self.text)                       # type: ignore[attr-defined]
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))               # type: ignore[attr-defined]
        for spine in axes.spines.values():                                    # type: ignore[attr-defined]
            spine.set_color(self.text)


class LossPlot(ThemedPlot):
    """Training loss per step and the held-out Dice at each scoring (right axis)."""

    def __init__(self, theme: str = "dark") -> None:
        super().__init__(theme)
        self.dice_axes = self.axes.twinx()
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.scored: list[tuple[int, float]] = []
        self.reset()

    def reset(self, steps: int = 100) -> None:
        """Empty axes over the run's `steps`, with a line saying what will appear."""
        self.steps.clear()
        self.losses.clear()
        self.scored.clear()
        for axes in (self.axes, self.dice_axes):
            axes.clear()
        self._style(self.axes, "loss", self.text)
        self._style(self.dice_axes, "held-out Dice", self.highlight)
        self.axes.set_xlabel("step", fontsize=9, color=self.text)
        self.axes.set_xlim(0, max(steps, 1))                  # shared with the Dice axes
        self.axes.set_ylim(0, 1)
        self.dice_axes.set_ylim(0, 1.02)
        self.dice_axes.yaxis.set_label_position("right")          # clear() put it on the left, over the loss label
        (self.line,) = self.axes.plot([], [], color=self.text, linewidth=1)
        (self.dice_line,) = self.dice_axes.plot([], [], "o-", color=self.highlight, markersize=3, linewidth=1)
        self.note = self.axes.text(0.5, 0.5, "loss and held-out Dice appear here\nwhile fine-tuning", ha="center",
                                   va="center", transform=self.axes.transAxes, fontsize=8, color=self.text)
        self.canvas.draw_idle()

    def add(self, step: int, loss: float | None, dice: float | None = None) -> None:
        """Step 0 (the parent, before training) brings a Dice and no loss."""
        self.note.set_visible(False)
        if loss is not None:
            self.steps.append(step)
            self.losses.append(loss)
            self.line.set_data(self.steps, self.losses)
            self.axes.set_ylim(0, max(self.losses) * 1.1 or 1)
            if step > self.axes.get_xlim()[1]:                 # a stage that follows (the cross-check) stays in view
                self.axes.set_xlim(0, step)
        if dice is not None:
            self.scored.append((step, dice))
            self.dice_line.set_data(*zip(*self.scored))
        self.canvas.draw_idle()


class AgreementPlot(ThemedPlot):
    """Agreement between the model's proposals and the user's final labels, per model version of the lineage:
    mean Dice (dots) and the share of slices the user changed (squares), versions on x."""

    def __init__(self, theme: str = "dark") -> None:
        super().__init__(theme)
        self.versions: list[VersionAgreement] = []
        self.show([])

    def show(self, versions: list[VersionAgreement]) -> None:
        self.versions = versions
        ax = self.axes
        ax.clear()
        self._style(ax, "agreement", self.text)
        ax.set_ylim(0, 1.05)
        if not versions:
            ax.text(0.5, 0.5, "Dice of each proposal with your final labels,\nper model version, appears here",
                    ha="center", va="center", transform=ax.transAxes, fontsize=8, color=self.text)
            ax.set_xticks([])
        else:
            x = range(len(versions))
            ax.plot(x, [v.dice for v in versions], "o-", color=self.highlight, markersize=4, linewidth=1, label="Dice")
            ax.plot(x, [v.slices_changed for v in versions], "s--", color=self.text, markersize=3, linewidth=1,
                    label="slices changed")
            ax.set_xticks(list(x), [v.version.split(" (")[0].removesuffix(".safetensors")[-18:] for v in versions],
                          fontsize=7)
            ax.set_xlim(-0.5, len(versions) - 0.5)
            ax.legend(fontsize=7, loc="lower left", frameon=False, labelcolor=self.text)
        self.canvas.draw_idle()
