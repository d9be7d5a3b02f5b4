"""The project's error family. Every message reaches the user as is: what was wrong, the value, what to do.

None of these is a RuntimeError subclass: superqt's generator workers swallow RuntimeErrors silently.
"""


class DaeformerError(Exception):
    """Base class of every error meant for the user."""


class CheckpointError(DaeformerError):
    """A checkpoint file is missing, foreign, truncated or inconsistent."""


class ImageFormatError(DaeformerError):
    """An image or label file cannot be read or written as asked."""


class InferenceError(DaeformerError):
    """Segmentation failed (torch errors, out of memory, wrong kind of image)."""


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
