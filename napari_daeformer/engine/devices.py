"""Device and numeric-path choice: `auto` means cuda, then mps, then cpu."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from enum import Enum

import torch

from napari_daeformer.base.errors import InferenceError
from napari_daeformer.engine import probes

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


class NumericPath(str, Enum):
    """The engine's numeric paths (`stages.Predictor`): what `resolve_path` returns. A str, so that reports and
    provenance carry the plain name."""

    FP32 = "fp32"
    BF16_AUTOCAST = "bf16 autocast"
    FP16_AUTOCAST = "fp16 autocast"
    BF16_WEIGHTS = "bf16 weights"
    INT8_DYNAMIC = "int8 dynamic"
    INT8_STATIC = "int8 static"

    def __str__(self) -> str:
        return self.value


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an unavailable explicit device is an InferenceError."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InferenceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type not in ("cpu", "cuda", "mps"):
        raise InferenceError(f"device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"device {name!r} asked for, but no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InferenceError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                             f"GPU(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InferenceError(f"device {name!r} asked for, but Apple MPS is not available here; use --device cpu")
    return device


def resolve_path(precision: str, device: torch.device) -> NumericPath:
    """The engine's numeric path for `precision` on `device`.

    `auto`: bf16 weights on CUDA GPUs with bf16 (else fp16 autocast); on CPUs bf16 autocast where the CPU has native
    bf16, else fp32. Never int8: a whole `daeformer segment` of the bundled CT model with cached static int8 was
    slower than fp32 on both kinds of CPU measured (docs/troubleshooting.md#int8), its fixed cost per process (about
    5 s) never repaid by its per-slice gain. `bf16` on CUDA means bf16 weights. `int8` is static int8 (`static_int8`:
    compiled once per model) where torchao and a C++ compiler are installed, else int8 dynamic; the engine falls back
    to int8 dynamic where the compiled model cannot be made.
    """
    if precision not in PRECISIONS:
        raise InferenceError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and probes.cpu_has_native_bf16():
            precision = "bf16"
        else:
            precision = "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise InferenceError("fp16 autocast is not supported on the CPU; use bf16, int8 or fp32")
    if precision == "int8":
        if device.type != "cpu":
            raise InferenceError("int8 runs on the CPU only; use bf16 or fp16 on a GPU")
        if not probes.cpu_has_int8_kernels():
            raise InferenceError("this CPU or torch build has no int8 kernels; use fp32 (or bf16)")
        return NumericPath.INT8_DYNAMIC if probes.static_int8_unavailable(building=False) else NumericPath.INT8_STATIC
    if precision == "bf16" and device.type == "cuda":
        return NumericPath.BF16_WEIGHTS           # every kernel in bf16: 1.5x autocast's slices per second on an H100
    return NumericPath(precision if precision == "fp32" else f"{precision} autocast")


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """torch.autocast for `dtype` on `device`, or a no-op for fp32."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
