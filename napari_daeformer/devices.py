"""Device and precision choice: `auto` means cuda, then mps, then cpu."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from .errors import InferenceError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"device {name!r} asked for, but no CUDA GPU is available here; use --device cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InferenceError(f"device {name!r} asked for, but Apple MPS is not available here; use --device cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast is fast."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain fp32.

    `auto`: bf16 on CUDA GPUs that support it (else fp16), bf16 on CPUs with native bf16, fp32 otherwise.
    """
    if precision not in PRECISIONS:
        raise InferenceError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return None
    if precision == "fp16" and device.type == "cpu":
        raise InferenceError("fp16 autocast is not supported on the CPU; use bf16 or fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def low_precision_weights(device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether the engine stores the weights themselves in `dtype` rather than autocasting: bf16 on CUDA (every
    kernel in bf16; 1.5x the slices per second of autocast on an H100, labels as autocast's)."""
    return device.type == "cuda" and dtype == torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """torch.autocast for `dtype` on `device`, or a no-op for fp32."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
