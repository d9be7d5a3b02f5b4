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
