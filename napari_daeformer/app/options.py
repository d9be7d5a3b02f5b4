"""argparse value types that refuse, in argparse's own one-line error, numbers no command can use (an input size
of 0, validation every 0 epochs, a learning rate of NaN) before any work starts; a config file's values pass
through the same types."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def whole(minimum: int, maximum: int | None = None, multiple: int = 1) -> Callable[[str], int]:
    """A type for a whole number in minimum..maximum, a multiple of `multiple`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum) or value % multiple:
            span = f"{minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"expected {span}{f', a multiple of {multiple}' if multiple > 1 else ''}"
                                             f", got {value}")
        return value
    return parse


def number(low: float, high: float = math.inf, *, above_low: bool = False) -> Callable[[str], float]:
    """A type for a finite number in [low, high] (or (low, high] with `above_low`)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (above_low and value == low):
            bounds = f"{'above' if above_low else 'at least'} {low:g}" + (f" and at most {high:g}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text}")
        return value
    return parse


def ct_window(text: str) -> tuple[float, float]:
    """`--window`: a preset name (abdomen, lung, ...) or LOWER,UPPER in HU, lower below upper, as (lower, upper)."""
    from napari_daeformer.model.preprocessing import CT_WINDOWS

    if text in CT_WINDOWS:
        return CT_WINDOWS[text]
    try:
        lower, upper = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"give LOWER,UPPER in HU or one of {', '.join(CT_WINDOWS)}; got {text!r}") from None
    if not (math.isfinite(lower) and math.isfinite(upper) and lower < upper):
        raise argparse.ArgumentTypeError(f"the lower bound must be below the upper, both finite; got {text!r}")
    return lower, upper


def window_text(text: str) -> str:
    """The argparse type of `--window`: checked by `ct_window`, kept as written (it goes to config.yaml as such)."""
    ct_window(text)
    return text


def class_list(text: str) -> tuple[str, ...]:
    """`--classes a,b,c` as names (spaces around each dropped), refused if a checkpoint could not carry them."""
    from napari_daeformer.io.record import MAX_CLASSES
    from napari_daeformer.model.checkpoint import check_class_names

    names = tuple(n.strip() for n in text.split(","))
    if not 2 <= len(names) <= MAX_CLASSES:
        raise argparse.ArgumentTypeError(f"give the background and 1 to {MAX_CLASSES - 1} classes, comma-separated "
                                         f"(e.g. background,liver), got {len(names)} name(s)")
    try:
        check_class_names(names)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return names


def class_list_text(text: str) -> str:
    """The argparse type of `--classes`: checked by `class_list`, kept as written (for config.yaml)."""
    class_list(text)
    return text
