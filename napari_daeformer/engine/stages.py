"""The inference engine's three stages, kept apart as MONAI's SliceInferer and nnU-Net's predictor keep prediction
and resampling apart, so that a faster path replaces one stage without touching the others:

- `SliceSource` (prepare): the image's slices as normalised, resized network-input batches on the device (the copy
  overlapping earlier work: `transfers.Transfers`).
- `Predictor` (predict): network-size logits of a batch, by one numeric path (fp32, autocast, bf16 weights,
  int8 dynamic, int8 static).
- `Accumulator` (accumulate): logits resized back to the source and reduced on the device to uint8 labels (and, if
  asked for, probabilities, entropy, per-slice uncertainty), then, once copied back, written into the output arrays.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from napari_daeformer.base.private_api import tensor_versions
from napari_daeformer.engine.devices import NumericPath, autocast
from napari_daeformer.engine.neighbours import NeighbourMix
from napari_daeformer.engine.transfers import Transfers
from napari_daeformer.model.preprocessing import Preprocessing

_TORCH_SAFE = {np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.int32, np.int64, np.float32, np.float64)}


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """A CPU tensor of `a` in its own dtype where torch handles it natively, else float32."""
    if a.dtype.newbyteorder("=") in _TORCH_SAFE and a.dtype.isnative:
        return torch.from_numpy(np.ascontiguousarray(a))
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


@dataclass
class SliceSource:
    """Prepare: slices `stack[order]` as network input.

    Args:
        stack: (S, Y, X[, 3]) slices (a view of the image).
        order: (N,) indices of the slices to run, in order.
        prep: the image's intensity normalisation (measured on the whole image where it must be).
        max_value: the RGB full scale (255 for uint8 photos).
        input_size: the network's (H, W).
        transfers: the run's host-to-device copies (made for `device` if not given).
    """

    stack: np.ndarray
    order: np.ndarray
    rgb: bool
    prep: Preprocessing
    max_value: float
    input_size: tuple[int, int]
    device: torch.device
    transfers: Transfers | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.transfers = self.transfers or Transfers(self.device)

    @property
    def size(self) -> tuple[int, int]:
        """(Y, X) of the source slices."""
        return self.stack.shape[1], self.stack.shape[2]

    def batch(self, start: int, stop: int) -> tuple[np.ndarray, torch.Tensor]:
        """Slice indices `order[start:stop]` and their (b, C, H, W) float32 network input on the device."""
        idx = self.order[start:stop]
        raw = self.transfers.upload(as_tensor(self.stack[idx]))    # source dtype: int16 CT moves half the bytes
        x = self.prep.apply_tensor(raw, self.max_value)          # on the device
        x = x.permute(0, 3, 1, 2) if self.rgb else x[:, None]    # (b, C, Y, X)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return idx, F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)


_COPIES: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, tuple[tuple[int, ...], torch.nn.Module]]] = \
    weakref.WeakKeyDictionary()


def _cached_copy(model: torch.nn.Module, kind: str, make: Callable[[torch.nn.Module], torch.nn.Module]) -> torch.nn.Module:
    """`make(deepcopy(model))`, made once per model and kind (and again when the model's weights change)."""
    versions = tensor_versions(model.parameters())
    copies = _COPIES.setdefault(model, {})
    if kind not in copies or copies[kind][0] != versions:
        copies[kind] = (versions, make(copy.deepcopy(model)).eval())
    return copies[kind][1]


def low_precision_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of `model` with its weights in `dtype`; the model itself is left in fp32."""
    return _cached_copy(model, str(dtype), lambda m: m.to(dtype))


def int8_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose Linear layers run in int8 (weights quantised per tensor once, activations on the fly:
    torch's dynamic quantisation, FBGEMM kernels). Linears whose weights a layer reads itself (`folded_linears`, the
    attention folds) stay fp32."""
    def quantise(m: torch.nn.Module) -> torch.nn.Module:
        keep = {f"{name}.{child}" if name else child for name, module in m.named_modules()
                for child in getattr(module, "folded_linears", ())}
        linears = {name for name, module in m.named_modules() if isinstance(module, torch.nn.Linear) and name not in keep}
        with warnings.catch_warnings():                     # torch.ao.quantization warns that it is moving to torchao
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(m, linears, dtype=torch.qint8)
    return _cached_copy(model, "int8", quantise)


class Predictor:
    """Predict: (b, C, H, W) network input -> (b, n, H, W) float32 logits, by one `devices.NumericPath`.

    "fp32"; "bf16/fp16 autocast" (low-precision matrix products, fp32 weights and normalisations); "bf16 weights" (a
    copy of the model stored in bf16: every kernel in bf16); "int8 dynamic" (a copy with int8 Linear layers); "int8
    static" (`compiled`: the model's static int8 package, `static_int8`). The model itself stays fp32; the copies are
    cached and follow its weights.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, path: NumericPath = NumericPath.FP32,
                 compiled: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        path = NumericPath(path)                            # a ValueError names an unknown path
        if (path == NumericPath.INT8_STATIC) != (compiled is not None):
            raise ValueError("the int8 static path runs a compiled package, and only it does")
        self.device, self.numeric_path = device, path
        model = model.to(device).eval()
        self.autocast_dtype = {"bf16 autocast": torch.bfloat16, "fp16 autocast": torch.float16}.get(path)
        if compiled is not None:
            self.model = compiled
        elif path == "bf16 weights":
            self.model = low_precision_copy(model, torch.bfloat16)
        elif path == "int8 dynamic":
            self.model = int8_copy(model)
        else:
            self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.numeric_path == NumericPath.BF16_WEIGHTS:
            return self.model(x.to(torch.bfloat16)).float()
        with autocast(self.device, self.autocast_dtype):
            return self.model(x).float()


def entropy(p: torch.Tensor, dim: int) -> torch.Tensor:
    """Predictive entropy in nats of the probabilities `p` over their class axis `dim`."""
    return -(p * p.clamp_min(1e-12).log()).sum(dim)


class Accumulator:
    """Accumulate: network-size logits of a batch, resized to the source size, into the run's output arrays.

    Args:
        total: number of slices (S).
        size: (Y, X) of the source slices.
        mix: each slice's softmax averaged with its neighbours' (`neighbours.NeighbourMix`): the device returns
            probabilities and the labels of a slice are made on the host once its neighbours have come.
    """

    def __init__(self, total: int, size: tuple[int, int], num_classes: int, probabilities: bool = False,
                 entropy: bool = False, slice_uncertainty: bool = False, mix: NeighbourMix | None = None) -> None:
        self.size, self.mix = size, mix
        self.labels = np.zeros((total, *size), np.uint8)
        self.probabilities = np.zeros((num_classes, total, *size), np.float16) if probabilities else None
        self.entropy = np.zeros((total, *size), np.float16) if entropy else None
        self.slice_uncertainty = np.zeros(total, np.float32) if slice_uncertainty else None

    def outputs(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """On the device, from (b, n, H, W) logits at network size: [labels (b, Y, X) uint8] at the source size
        (bilinear, then argmax), then as asked for: probabilities (n, b, Y, X) fp16, entropy (b, Y, X) fp16 in
        nats, slice uncertainty (b,) fp32 (mean entropy). With `mix`: [probabilities (b, Y, X, n) fp32], classes
        innermost (on a CPU the layout the logits already have)."""
        if logits.device.type == "cpu":       # classes innermost: the argmax reads contiguous rows (4x faster at 512)
            logits = logits.contiguous(memory_format=torch.channels_last)
        logits = F.interpolate(logits, size=self.size, mode="bilinear", align_corners=False)    # (b, n, Y, X)
        if self.mix is not None:
            return [logits.softmax(1).permute(0, 2, 3, 1)]
        out = [logits.argmax(1).to(torch.uint8)]
        if self.probabilities is None and self.entropy is None and self.slice_uncertainty is None:
            return out
        p = logits.softmax(1)
        if self.probabilities is not None:
            out.append(p.transpose(0, 1).half())
        h = entropy(p, 1)                                    # (b, Y, X)
        if self.entropy is not None:
            out.append(h.half())
        if self.slice_uncertainty is not None:
            out.append(h.mean((1, 2)))
        return out

    def store(self, idx: np.ndarray, arrays: list[np.ndarray]) -> np.ndarray:
        """Write slices `idx` of `outputs(...)`, copied to the host, into the run's arrays; the slices now final
        (with `mix`, those whose neighbours have come), ascending."""
        if self.mix is not None:
            done = self.mix.add(idx, torch.from_numpy(arrays[0]))
            for z, p in done:
                self._store_probabilities(z, p)
            return np.array([z for z, _ in done], int)
        values = iter(arrays)
        self.labels[idx] = next(values)
        if self.probabilities is not None:
            self.probabilities[:, idx] = next(values)
        if self.entropy is not None:
            self.entropy[idx] = next(values)
        if self.slice_uncertainty is not None:
            self.slice_uncertainty[idx] = next(values)
        return np.sort(idx)

    def _store_probabilities(self, z: int, p: torch.Tensor) -> None:
        """Slice `z`'s labels and what was asked for from its (Y, X, n) probabilities (classes innermost: the
        argmax reads contiguous rows, 8x faster than over (n, Y, X) at 512 x 512)."""
        self.labels[z] = p.argmax(-1).to(torch.uint8).numpy()
        if self.probabilities is not None:
            self.probabilities[:, z] = p.permute(2, 0, 1).half().numpy()
        if self.entropy is None and self.slice_uncertainty is None:
            return
        h = entropy(p, -1)
        if self.entropy is not None:
            self.entropy[z] = h.half().numpy()
        if self.slice_uncertainty is not None:
            self.slice_uncertainty[z] = float(h.mean())
