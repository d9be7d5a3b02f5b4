"""What this machine can run, asked once per call and importing nothing of ours but the low-level helpers: the
device and precision choice (`devices`) and static int8 (`static_int8`) both read these, so neither imports the
other."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import platform
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from napari_daeformer.base.private_api import cpu_supports

_X86 = {"x86_64", "amd64", "i686", "x86"}


@contextmanager
def quiet_torchao() -> Iterator[None]:
    """torchao logs a warning per CUDA-only extension it cannot load on a CPU build, torch one on torchao's enums, and
    the int8 lowering a UserWarning per layer: none is the user's concern."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast is fast, and torch may use
    it (ATEN_CPU_CAPABILITY=avx2 limits torch to AVX2, where bf16 is emulated and slow)."""
    allowed = torch.backends.cpu.get_cpu_capability() == "AVX512"
    return allowed and (cpu_supports("avx512_bf16") or cpu_supports("amx_tile"))


def cpu_has_int8_kernels() -> bool:
    """Whether torch's x86 int8 kernels (FBGEMM) and its dynamic quantisation are available here."""
    engines = torch.backends.quantized.supported_engines
    quantization = getattr(getattr(torch, "ao", None), "quantization", None)    # moving to torchao: may go away
    return ("x86" in engines or "fbgemm" in engines) and hasattr(quantization, "quantize_dynamic")


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would call, if it is installed."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return next((c for c in candidates if shutil.which(c)), None)


def has_torchao(imported: bool = True) -> bool:
    """Whether torchao's pt2e int8 quantisation can be imported (`find_spec` alone would not see a broken install);
    `imported=False`: only whether it is installed (importing it costs 2 s, and only a compile needs it)."""
    if not imported:
        return importlib.util.find_spec("torchao") is not None
    try:
        with quiet_torchao():
            importlib.import_module("torchao.quantization.pt2e.quantize_pt2e")
    except ImportError:
        return False
    return True


def static_int8_unavailable(building: bool = True) -> str | None:
    """Why static int8 cannot be made (`building`) or run on this machine (None when it can). Running a cached
    package needs torchao installed, not imported."""
    if platform.machine().lower() not in _X86 or not cpu_has_int8_kernels():
        return "static int8 needs an x86 CPU with torch's int8 kernels"
    if not has_torchao(imported=building):
        return "static int8 needs torchao (pip install torchao)"
    if cpp_compiler() is None:
        return "static int8 needs a C++ compiler (g++ or clang++) to compile the model once"
    return None
