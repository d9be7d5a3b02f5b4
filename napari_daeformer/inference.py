"""The inference engine: a 2D DAE-Former run slice by slice over a volume, in bounded memory.

`segment(...)` is a generator: it yields `Progress` after every batch and returns a `Segmentation`.
A GUI worker or the CLI drains it; closing it (or setting `cancel`) stops the run with nothing partial.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint
from .devices import autocast, resolve_device, resolve_precision
from .errors import DaeformerError, InferenceError
from .io import ImageRecord

# Peak activation bytes per 224x224 slice of the `paper` model under inference_mode, fp32 (measured,
# rounded up); scaled by area and width for other sizes and configurations.
_BYTES_PER_SLICE_PAPER_224 = 160e6


class Cancelled(DaeformerError):
    """The run was cancelled; nothing was returned."""


@dataclass(frozen=True)
class Progress:
    """`done` of `total` slices finished; `labels` holds slices `start`... (along the slice axis) for live display."""

    done: int
    total: int
    start: int = 0
    labels: np.ndarray | None = None


@dataclass
class Segmentation:
    """Engine output in the source's spatial shape.

    Args:
        labels: ([Z,] Y, X) uint8 class per voxel.
        probabilities: (C, [Z,] Y, X) float16 softmax, if asked for.
        entropy: ([Z,] Y, X) float16 predictive entropy in nats, if asked for.
        slice_uncertainty: (S,) mean entropy of each slice along the slice axis, if asked for.
        batch_size: the batch size that finally ran (after any out-of-memory halving).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    entropy: np.ndarray | None = None
    slice_uncertainty: np.ndarray | None = None
    batch_size: int = 0


def slices_of(image: np.ndarray, rgb: bool, axis: int) -> np.ndarray:
    """A view of `image` as (S, Y, X[, 3]) slices along spatial `axis`; a 2D image is one slice."""
    spatial = image.ndim - 1 if rgb else image.ndim
    if spatial == 2:
        return image[None]
    if spatial != 3:
        raise InferenceError(f"expected a 2D image or a 3D volume, got an array of shape {image.shape}")
    if not -3 <= axis < 3:
        raise InferenceError(f"slice axis {axis} does not exist in a 3D volume (use 0, 1 or 2)")
    return np.moveaxis(image, axis, 0)


_TORCH_SAFE = {np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.int32, np.int64, np.float32, np.float64)}


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """A CPU tensor of `a` in its own dtype where torch handles it natively, else float32."""
    if a.dtype.newbyteorder("=") in _TORCH_SAFE and a.dtype.isnative:
        return torch.from_numpy(np.ascontiguousarray(a))
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


MIN_SIDE = 8           # pixels: a slice smaller than this along either side is refused


def check_compatible(image: np.ndarray, rgb: bool, checkpoint: Checkpoint, axis: int = 0) -> None:
    """Refuse an image the model cannot take (RGB into a CT model, a 4D array, slices under MIN_SIDE pixels)."""
    channels = checkpoint.card.config.in_channels
    if rgb and channels == 1:
        raise InferenceError("this is an RGB image but the model expects single-channel (CT/greyscale) input; "
                             "choose a model trained on photos")
    if not rgb and channels == 3:
        raise InferenceError("this is a single-channel image but the model expects RGB photos; "
                             "choose a model trained on CT")
    spatial = image.shape[:-1] if rgb else image.shape
    if len(spatial) not in (2, 3):
        raise InferenceError(f"cannot segment an array of shape {image.shape}: expected a 2D image or a 3D volume")
    plane = spatial if len(spatial) == 2 else tuple(n for i, n in enumerate(spatial) if i != axis % 3)
    if min(plane) < MIN_SIDE:
        raise InferenceError(f"slices of {plane[0]}x{plane[1]} pixels are too small to segment; the minimum is "
                             f"{MIN_SIDE}x{MIN_SIDE}")


def image_warnings(image: np.ndarray) -> list[str]:
    """What the user should hear before segmenting `image` (it is still segmented): a constant image."""
    if image.size and np.ptp(image) == 0:
        return [f"every voxel has the same value ({image.flat[0]}): the image holds nothing to segment"]
    return []


def default_batch_size(checkpoint: Checkpoint, device: torch.device) -> int:
    """On CUDA, what fits half the free memory (at most 64); elsewhere 8."""
    if device.type != "cuda":
        return 8
    h, w = checkpoint.card.input_size
    width = checkpoint.card.config.embed_dims[0] / 128
    per_slice = _BYTES_PER_SLICE_PAPER_224 * (h * w) / 224**2 * width
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(64, 0.5 * free // per_slice)))


def segment(
    image: np.ndarray | ImageRecord,
    checkpoint: Checkpoint,
    *,
    rgb: bool | None = None,
    axis: int = 0,
    device: str | torch.device = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    window: tuple[float, float] | None = None,
    probabilities: bool = False,
    entropy: bool = False,
    slice_uncertainty: bool = False,
    only: np.ndarray | None = None,
    cancel: threading.Event | None = None,
) -> Generator[Progress, None, Segmentation]:
    """Segment a 2D image or a 3D volume slice by slice.

    Args:
        image: ([Z,] Y, X) intensities (HU for CT) or (Y, X, 3) RGB, or an ImageRecord.
        checkpoint: model and card (preprocessing, input size, classes).
        rgb: whether the last axis is colour (default: from the record, else a trailing axis of 3).
        axis: the spatial axis to slice along (0 = Z of a (Z, Y, X) volume).
        device: auto, cpu, cuda[:N] or mps.
        precision: auto, fp32, bf16 or fp16 (autocast).
        batch_size: slices per forward pass (default: what fits the device).
        window: a CT window (lower, upper) HU overriding the checkpoint's.
        probabilities, entropy: also return softmax probabilities / per-voxel entropy.
        slice_uncertainty: also return the mean entropy of each slice (cheap: no per-voxel array kept).
        only: (S,) bool, segment only these slices (the others stay 0), e.g. those the user has not corrected.
        cancel: set it to stop after the current batch (raises Cancelled).
    Yields:
        Progress after each batch.
    Returns:
        Segmentation in the source's spatial shape.
    Raises:
        InferenceError: the image does not suit the model, or torch failed (out of memory at batch 1).
        Cancelled: `cancel` was set.
    """
    if isinstance(image, ImageRecord):
        rgb = image.rgb if rgb is None else rgb
        image = image.data
    image = np.asarray(image)
    if rgb is None:
        rgb = image.ndim == 3 and image.shape[-1] == 3
    check_compatible(image, rgb, checkpoint, axis)
    card = checkpoint.card
    prep = (card.preprocessing if window is None else card.preprocessing.with_window(window)).for_image(image)
    max_value = float(np.iinfo(image.dtype).max) if rgb and np.issubdtype(image.dtype, np.integer) else 255.0
    stack = slices_of(image, rgb, axis)                       # (S, Y, X[, 3]) view
    total, size = len(stack), stack.shape[1:3]
    dev = resolve_device(device)
    amp = resolve_precision(precision, dev)
    batch = batch_size or default_batch_size(checkpoint, dev)
    if batch < 1:
        raise InferenceError(f"batch size must be at least 1, got {batch}")
    model = checkpoint.model.to(dev).eval()
    n_classes = card.config.num_classes
    if n_classes > 256:
        raise InferenceError(f"{n_classes} classes do not fit a uint8 label map")

    labels = np.zeros((total, *size), np.uint8)
    probs = np.zeros((n_classes, total, *size), np.float16) if probabilities else None
    ent = np.zeros((total, *size), np.float16) if entropy else None
    per_slice = np.zeros(total, np.float32) if slice_uncertainty else None
    todo = np.ones(total, bool) if only is None else np.asarray(only, bool)
    if todo.shape != (total,):
        raise InferenceError(f"`only` needs one flag per slice ({total}), got shape {todo.shape}")
    order = np.flatnonzero(todo)                              # slice indices to run, in order
    staging: dict[str, torch.Tensor] = {}

    def run(start: int, stop: int) -> None:
        """Segment slices order[start:stop]."""
        idx = order[start:stop]
        raw = _as_tensor(stack[idx])                          # source dtype: int16 CT moves half the bytes
        if dev.type == "cuda":                                # reuse one pinned buffer for the host-to-device copy
            if staging.get("buf") is None or staging["buf"].numel() < raw.numel() or staging["buf"].dtype != raw.dtype:
                staging["buf"] = torch.empty(raw.numel(), dtype=raw.dtype).pin_memory()
            raw = staging["buf"][: raw.numel()].view(raw.shape).copy_(raw)
        x = prep.apply_tensor(raw.to(dev, non_blocking=True), max_value)   # normalised on the device
        x = x.permute(0, 3, 1, 2) if rgb else x[:, None]     # (b, C, Y, X)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.interpolate(x, size=card.input_size, mode="bilinear", align_corners=False, antialias=True)
        with autocast(dev, amp):
            logits = model(x)
        if not bool(torch.isfinite(logits).all()):           # never an all-background map passed off as a result
            raise InferenceError("the model produced NaN or infinite scores"
                                 + (f" in {str(amp).removeprefix('torch.')}; try --precision fp32" if amp is not None else
                                    "; its weights or preprocessing are damaged"))
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)  # (b, n, Y, X)
        labels[idx] = logits.argmax(1).to(torch.uint8).cpu().numpy()
        if probs is not None or ent is not None or per_slice is not None:
            p = logits.softmax(1)
            if probs is not None:
                probs[:, idx] = p.transpose(0, 1).half().cpu().numpy()
            h = -(p * p.clamp_min(1e-12).log()).sum(1)           # (b, Y, X) entropy in nats
            if ent is not None:
                ent[idx] = h.half().cpu().numpy()
            if per_slice is not None:
                per_slice[idx] = h.mean((1, 2)).cpu().numpy()

    start, total = 0, len(order)
    with torch.inference_mode():
        while start < total:
            if cancel is not None and cancel.is_set():
                raise Cancelled("segmentation cancelled")
            stop = min(start + batch, total)
            try:
                run(start, stop)
            except torch.cuda.OutOfMemoryError as e:
                if batch == 1:
                    raise InferenceError("out of GPU memory even at batch size 1; use --device cpu or a smaller "
                                         "model input") from e
                batch = max(1, batch // 2)                   # halve and retry the same slices
                torch.cuda.empty_cache()
                continue
            except RuntimeError as e:                        # torch errors are RuntimeErrors: make them ours
                raise InferenceError(f"segmentation failed: {str(e).splitlines()[0]}") from e
            yield Progress(stop, total, int(order[start]), labels[order[start]:order[stop - 1] + 1])
            start = stop

    def back(a: np.ndarray, lead: int) -> np.ndarray:
        """Undo the slice-axis move (and the extra axis of a 2D image)."""
        if stack.shape[0] == 1 and image.ndim - (1 if rgb else 0) == 2:
            return a[(slice(None),) * lead + (0,)]
        return np.moveaxis(a, lead, lead + (axis % 3))

    return Segmentation(
        labels=np.ascontiguousarray(back(labels, 0)),
        probabilities=None if probs is None else np.ascontiguousarray(back(probs, 1)),
        entropy=None if ent is None else np.ascontiguousarray(back(ent, 0)),
        slice_uncertainty=per_slice,
        batch_size=batch,
    )


def run_segmentation(gen: Generator[Progress, None, Segmentation],
                     on_progress: Callable[[Progress], None] | None = None) -> Segmentation:
    """Drain a `segment` generator, calling `on_progress` after each batch; return its result."""
    while True:
        try:
            progress = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(progress)
