"""The project's error family. Every message reaches the user as is: what was wrong, the value, what to do.

None of these is a RuntimeError subclass: superqt's generator workers swallow RuntimeErrors silently.
"""

from __future__ import annotations


class DaeformerError(Exception):
    """Base class of every error meant for the user."""


class InvalidValue(DaeformerError, ValueError):
    """A value given by the user or read from a file (a model configuration, a card, a CT window) is out of range;
    a ValueError too, for callers of the library."""


class CheckpointError(DaeformerError):
    """A checkpoint file is missing, foreign, truncated or inconsistent."""


class ImageFormatError(DaeformerError):
    """An image or label file cannot be read or written as asked."""


class InferenceError(DaeformerError):
    """Segmentation failed (torch errors, out of memory, wrong kind of image)."""


class Cancelled(DaeformerError):
    """The user cancelled the work; nothing was returned or written (not a failure)."""


class TrainingError(DaeformerError):
    """Training data or settings are unusable, or training failed."""


def printable(text: str) -> str:
    """`text` safe to print or store as UTF-8: undecodable bytes of file names as \\xNN, control characters
    (terminal escape codes, newlines) as escapes."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:                            # a lone surrogate that was never a byte
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def first_line(error: BaseException, empty: str | None = None) -> str:
    """The first line of `error`'s message; when it has none, `empty` (default: the type's name)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__ if empty is None else empty


def short_repr(value: object, limit: int = 40) -> str:
    """repr cut to `limit` characters (values from files can be huge)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**limit else f"<{value.bit_length()}-bit int>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
