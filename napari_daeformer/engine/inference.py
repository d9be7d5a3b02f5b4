"""The inference engine: a 2D DAE-Former run slice by slice over a volume, in bounded memory.

`SliceInferer(checkpoint, ...)` is configured once; its `run(image)` is a generator: it yields `Progress` after
every batch and returns a `Segmentation`. A GUI worker drains it (`segment(image)` does so without progress);
closing it (or setting `cancel`) stops the run with nothing partial.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from napari_daeformer.base.errors import Cancelled, InferenceError, first_line
from napari_daeformer.base.jobs import drain
from napari_daeformer.engine import package_cache, static_int8
from napari_daeformer.engine.devices import NumericPath, resolve_device, resolve_path
from napari_daeformer.engine.int8_worker import build_in_child, child_runner
from napari_daeformer.engine.neighbours import NeighbourMix
from napari_daeformer.engine.stages import Accumulator, Predictor, SliceSource
from napari_daeformer.engine.transfers import Pending
from napari_daeformer.io import ImageRecord
from napari_daeformer.io.record import MAX_CLASSES, is_rgb
from napari_daeformer.model.checkpoint import Checkpoint, check_weight
from napari_daeformer.model.preprocessing import Preprocessing

# Peak activation bytes per 224x224 slice of the `paper` model under inference_mode, fp32 (measured,
# rounded up); scaled by area and width for other sizes and configurations.
_BYTES_PER_SLICE_PAPER_224 = 160e6
CPU_BATCH_BYTES = 100e6
CUDA_MAX_BATCH = 256


@dataclass(frozen=True)
class Progress:
    """`done` of `total` slices finished; `labels` holds slices `start`... (along the slice axis) for live display;
    `note`: what the engine is doing or chose, for the user (a one-time compile, a fallback); `busy`: work of
    unknown length under way (show a busy bar)."""

    done: int
    total: int
    slices: np.ndarray | None = None     # (b,) indices along the slice axis of the finished slices, ascending
    labels: np.ndarray | None = None     # (b, Y, X) their labels, for live display
    note: str = ""
    busy: bool = False


@dataclass
class Segmentation:
    """Engine output in the source's spatial shape.

    Args:
        labels: ([Z,] Y, X) uint8 class per voxel.
        probabilities: (C, [Z,] Y, X) float16 softmax, if asked for.
        entropy: ([Z,] Y, X) float16 predictive entropy in nats, if asked for.
        slice_uncertainty: (S,) mean entropy of each slice along the slice axis, if asked for.
        batch_size: the batch size that finally ran (after any out-of-memory halving).
        numeric_path: the numeric path that ran.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    entropy: np.ndarray | None = None
    slice_uncertainty: np.ndarray | None = None
    batch_size: int = 0
    numeric_path: NumericPath = NumericPath.FP32


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
    if image.size and image.min() == image.max():                # np.ptp cannot subtract booleans (a mask layer)
        return [f"every voxel has the same value ({image.flat[0]}): the image holds nothing to segment"]
    return []


def _network_bytes(checkpoint: Checkpoint) -> float:
    """Peak activation bytes of one slice in the network (fp32)."""
    h, w = checkpoint.card.input_size
    return _BYTES_PER_SLICE_PAPER_224 * (h * w) / 224**2 * checkpoint.card.config.embed_dims[0] / 128


def default_batch_size(checkpoint: Checkpoint, device: torch.device, size: tuple[int, int] | None = None) -> int:
    """On CUDA, what fits half the free memory (at most CUDA_MAX_BATCH), counting the network's activations and, for
    source slices of `size` (Y, X), the input and the logits resized to it. On a CPU, what keeps a batch's
    activations near the caches (CPU_BATCH_BYTES): 1 for `paper` at 224, 2 for the bundled `small` models, the
    fastest per slice on 2 cores (larger batches spill the caches; `benchmarks/bench_model.py`)."""
    if device.type != "cuda":
        return int(max(1, min(8, CPU_BATCH_BYTES // _network_bytes(checkpoint))))
    y, x = size or checkpoint.card.input_size
    source = y * x * 4 * (2 + 2 * checkpoint.card.config.num_classes)     # input, resized logits and their argmax
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(CUDA_MAX_BATCH, 0.5 * free // (_network_bytes(checkpoint) + source))))


class SliceInferer:
    """The one way to get labels from a model: a 2D DAE-Former configured once (checkpoint, device, numeric path,
    batch size, CT window, int8 package) and run slice by slice over each image it is given, as MONAI's
    SliceInferer is. The CLI, batch, the widgets, the trainer's validation and fine-tuning all use it.

    Args:
        checkpoint: model and card (preprocessing, input size, classes).
        device: auto, cpu, cuda[:N] or mps.
        precision: auto, fp32, bf16, fp16 or int8 (`devices.resolve_path`: auto picks the fastest path measured
            to keep the labels).
        batch_size: slices per forward pass (default: what fits the device, per image).
        window: a CT window (lower, upper) HU overriding the checkpoint's.
        int8_in_child: run static int8 in a child process (`int8_worker.ChildInt8`): a GUI's event loop keeps
            running, where the in-process package would hold the GIL for each whole batch.
        neighbour_weight: each neighbouring slice's share of a slice's softmax (`neighbours`; default the card's):
            0 where the slices given are not neighbours in a volume (a trainer's sampled slices).
    Raises:
        InferenceError: an unknown or unavailable device or precision, a bad batch size, too many classes.
    """

    def __init__(self, checkpoint: Checkpoint, *, device: str | torch.device = "auto", precision: str = "auto",
                 batch_size: int | None = None, window: tuple[float, float] | None = None,
                 int8_in_child: bool = False, neighbour_weight: float | None = None
                 ) -> None:
        card = checkpoint.card
        if card.config.num_classes > MAX_CLASSES:
            raise InferenceError(f"{card.config.num_classes} classes do not fit a uint8 label map")
        if batch_size is not None and batch_size < 1:
            raise InferenceError(f"batch size must be at least 1, got {batch_size}")
        self.checkpoint, self.batch_size, self.int8_in_child = checkpoint, batch_size, int8_in_child
        self.device = resolve_device(device)
        self.numeric_path = resolve_path(precision, self.device)
        self.preprocessing = card.preprocessing if window is None else card.preprocessing.with_window(window)
        try:
            self.neighbour_weight = check_weight(card.neighbour_weight if neighbour_weight is None else neighbour_weight)
        except ValueError as e:
            raise InferenceError(str(e)) from e
        self._package: Callable[[torch.Tensor], torch.Tensor] | None = None     # static int8, once found or built

    def segment(self, image: np.ndarray | ImageRecord, **options: Any) -> Segmentation:
        """`run` drained: the Segmentation of one image, with no progress reported."""
        return drain(self.run(image, **options))

    def run(self, image: np.ndarray | ImageRecord, *, rgb: bool | None = None, axis: int = 0,
            probabilities: bool = False, entropy: bool = False, slice_uncertainty: bool = False,
            only: np.ndarray | None = None, first: int | None = None, preprocessing: Preprocessing | None = None,
            cancel: threading.Event | None = None) -> Generator[Progress, None, Segmentation]:
        """Segment a 2D image or a 3D volume slice by slice.

        Args:
            image: ([Z,] Y, X) intensities (HU for CT) or (Y, X, 3) RGB, or an ImageRecord.
            rgb: whether the last axis is colour (default: from the record, else a trailing axis of 3).
            axis: the spatial axis to slice along (0 = Z of a (Z, Y, X) volume).
            probabilities, entropy: also return softmax probabilities / per-voxel entropy.
            slice_uncertainty: also return the mean entropy of each slice (cheap: no per-voxel array kept).
            only: (S,) bool, segment only these slices (the others stay 0), e.g. those the user has not corrected.
            first: start at this slice and work outwards (the slice on screen fills first); default 0 upwards.
            preprocessing: this image's concrete normalisation (default: the model's, measured on the image).
            cancel: set it to stop after the current batch (raises Cancelled).
        Yields:
            Progress as each batch is collected (batch k once batch k+1 is queued, so that a GPU never waits).
        Returns:
            Segmentation in the source's spatial shape.
        Raises:
            InferenceError: the image does not suit the model, or torch failed (out of memory at batch 1).
            Cancelled: `cancel` was set.
        """
        if isinstance(image, ImageRecord):
            image, rgb = image.data, image.rgb if rgb is None else rgb
        image = np.asarray(image)
        rgb = is_rgb(image) if rgb is None else rgb
        check_compatible(image, rgb, self.checkpoint, axis)
        stack = slices_of(image, rgb, axis)                       # (S, Y, X[, 3]) view
        source = self._source(image, stack, rgb, only, first, preprocessing)
        mix = None
        if self.neighbour_weight and len(stack) > 1:
            members = np.zeros(len(stack), bool)
            members[source.order] = True
            mix = NeighbourMix(self.neighbour_weight, members)
        out = Accumulator(len(stack), source.size, self.checkpoint.card.config.num_classes, probabilities, entropy,
                          slice_uncertainty, mix)
        training = self.checkpoint.model.training               # a trainer's model is left in its mode
        try:
            predict = yield from self._predictor(source, cancel)
            batch = yield from self._batches(source, predict, out, cancel)
        finally:
            self.checkpoint.model.train(training)

        def back(a: np.ndarray, lead: int) -> np.ndarray:
            """Undo the slice-axis move (and the extra axis of a 2D image)."""
            if stack.shape[0] == 1 and image.ndim - (1 if rgb else 0) == 2:
                return a[(slice(None),) * lead + (0,)]
            return np.moveaxis(a, lead, lead + (axis % 3))

        return Segmentation(
            labels=np.ascontiguousarray(back(out.labels, 0)),
            probabilities=None if out.probabilities is None else np.ascontiguousarray(back(out.probabilities, 1)),
            entropy=None if out.entropy is None else np.ascontiguousarray(back(out.entropy, 0)),
            slice_uncertainty=out.slice_uncertainty, batch_size=batch, numeric_path=predict.numeric_path)

    def _source(self, image: np.ndarray, stack: np.ndarray, rgb: bool, only: np.ndarray | None, first: int | None,
                preprocessing: Preprocessing | None) -> SliceSource:
        """The slices to run, in the order to run them, as network input."""
        todo = np.ones(len(stack), bool) if only is None else np.asarray(only, bool)
        if todo.shape != (len(stack),):
            raise InferenceError(f"`only` needs one flag per slice ({len(stack)}), got shape {todo.shape}")
        order = np.flatnonzero(todo)
        if first is not None:
            order = order[np.argsort(np.abs(order - int(first)), kind="stable")]
        prep = preprocessing or self.preprocessing.for_image(image)
        max_value = float(np.iinfo(image.dtype).max) if rgb and np.issubdtype(image.dtype, np.integer) else 255.0
        return SliceSource(stack, order, rgb, prep, max_value, self.checkpoint.card.input_size, self.device)

    def _predictor(self, source: SliceSource, cancel: threading.Event | None
                   ) -> Generator[Progress, None, Predictor]:
        """The numeric path's predictor; static int8 needs the model's package (found or built once, calibrated on
        the first image's slices), else it runs int8 dynamic."""
        path = self.numeric_path
        if path == NumericPath.INT8_STATIC and self._package is None:
            compiled = yield from _static_int8(self.checkpoint, source, cancel)
            if compiled is not None and self.int8_in_child:
                card = self.checkpoint.card
                compiled = child_runner(compiled, (card.config.in_channels, *card.input_size),
                                        card.config.num_classes)
            self._package = compiled
        if path == NumericPath.INT8_STATIC and self._package is None:
            path = NumericPath.INT8_DYNAMIC
        return Predictor(self.checkpoint.model, self.device, path,
                         self._package if path == NumericPath.INT8_STATIC else None)

    def _batches(self, source: SliceSource, predict: Predictor, out: Accumulator, cancel: threading.Event | None
                 ) -> Generator[Progress, None, int]:
        """Run every slice of `source` into `out`, halving the batch on a GPU out-of-memory; the batch that ran.
        Batch k+1 is queued before batch k is collected, so that on a GPU its copies and compute overlap k's
        return."""
        batch = self.batch_size or default_batch_size(self.checkpoint, self.device, source.size)
        start, total = 0, len(source.order)
        in_flight: tuple[int, np.ndarray, Pending] | None = None
        # Inference mode is entered per batch and never held across a yield: the mode belongs to the thread, and a
        # job cancelled at a yield left a worker thread in it, where a later fine-tune could not train.
        while start < total or in_flight is not None:
            if cancel is not None and cancel.is_set():
                raise Cancelled("segmentation cancelled")
            queued = None
            if start < total:
                stop = min(start + batch, total)
                try:
                    with torch.inference_mode():
                        idx, x = source.batch(start, stop)
                        logits = predict(x)
                        finite = torch.isfinite(logits).all().reshape(1)
                        queued = (stop, idx, source.transfers.download(finite, *out.outputs(logits)))
                except torch.cuda.OutOfMemoryError as e:
                    if batch == 1:
                        raise InferenceError("out of GPU memory even at batch size 1; use --device cpu or a "
                                             "smaller model input") from e
                    batch = max(1, batch // 2)           # halve and retry the same slices
                    torch.cuda.empty_cache()
                    continue
                except RuntimeError as e:                # torch errors are RuntimeErrors: make them ours
                    raise InferenceError(f"segmentation failed: {first_line(e)}") from e
                start = stop
            if in_flight is not None:
                with torch.inference_mode():
                    collected = self._collect(*in_flight, total, out, predict.numeric_path)
                yield collected
            in_flight = queued
        return batch

    @staticmethod
    def _collect(stop: int, idx: np.ndarray, pending: Pending, total: int, out: Accumulator, path: str) -> Progress:
        """Wait for a queued batch's results and store them."""
        try:
            finite, *arrays = pending.wait()
        except RuntimeError as e:                            # a CUDA error surfaces where the host waits
            raise InferenceError(f"segmentation failed: {first_line(e)}") from e
        if not finite[0]:                                    # never an all-background map passed off as a result
            raise InferenceError("the model produced NaN or infinite scores"
                                 + (f" in {path}; try --precision fp32" if path != "fp32" else
                                    "; its weights or preprocessing are damaged"))
        done = out.store(idx, arrays)
        return Progress(stop, total, done, out.labels[done])


def calibration_batches(source: SliceSource, batch: int) -> list[torch.Tensor]:
    """Up to `static_int8.CALIBRATION_SLICES` of the source's slices, spread evenly, as (batch, C, H, W) inputs."""
    n = len(source.order)
    picks = np.unique(np.linspace(0, n - 1, min(static_int8.CALIBRATION_SLICES, n)).round().astype(int))
    spread = dataclasses.replace(source, order=source.order[picks], transfers=None)
    return [spread.batch(s, s + batch)[1] for s in range(0, len(picks), batch)]


def _static_int8(checkpoint: Checkpoint, source: SliceSource, cancel: threading.Event | None
                 ) -> Generator[Progress, None, static_int8.StaticInt8 | None]:
    """The model's static int8 package: from the cache, else compiled now (calibrated on this image's slices). None
    (run int8 dynamic) where it cannot be made (a note says why)."""
    total = len(source.order)
    batch = default_batch_size(checkpoint, torch.device("cpu"))     # one package per model: the fastest CPU batch
    model, size = checkpoint.model, checkpoint.card.input_size
    try:
        compiled = static_int8.load(model, batch, size)
        if compiled is not None:
            return compiled
        yield Progress(0, total, busy=True, note="compiling the int8 model for this CPU, once per model (one to a few "
                                                 f"minutes; Cancel stops it); cached in {package_cache.cache_folder()}")
        t0 = time.perf_counter()
        compiled, agreement = build_in_child(model, calibration_batches(source, batch), batch, size, cancel)
    except static_int8.Unavailable as e:
        yield Progress(0, total, note=f"{e}; running int8 dynamic")
        return None
    yield Progress(0, total, note=f"int8 model compiled in {time.perf_counter() - t0:.0f} s; its labels matched "
                                  f"fp32's on {agreement:.2%} of the calibration slices' voxels")
    return compiled
