"""Static int8 on x86 CPUs: the model quantised by torchao's PT2E flow (weights per channel, activations per tensor
with ranges calibrated once), compiled ahead of time by AOTInductor into a package cached on disk.

The package is made once per model weights, batch size, input size, torch/torchao version and CPU instruction
set (57-59 s for `paper` on 2 idle cores, README; 204 s under load) and loads in well under a second afterwards.
It is accepted only when its labels agree with fp32 on the calibration slices (`MIN_AGREEMENT`, `MIN_CLASS_DICE`);
otherwise the engine keeps int8 dynamic.
`benchmarks/bench_model.py` measures it against the official model.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from napari_daeformer.base.errors import DaeformerError, first_line
from napari_daeformer.base.metrics import dice_per_class
from napari_daeformer.base.private_api import cpu_supports
from napari_daeformer.engine import package_cache, probes

MIN_AGREEMENT = 0.995              # share of calibration voxels whose label must equal fp32's (issue 15's bar)
MIN_CLASS_DICE = 0.98              # and each class fp32 finds (on 0.1% of the voxels or more): its Dice against fp32's
CALIBRATION_SLICES = 16           # at most, spread evenly over the first image that needs a package
class Unavailable(DaeformerError):
    """Static int8 cannot run here or for this model; the message says why (the engine falls back)."""


def _torchao() -> tuple[Callable[..., torch.nn.Module], Callable[..., torch.nn.Module], object]:
    """torchao's (prepare_pt2e, convert_pt2e, x86 inductor quantizer module); ImportError if it is missing."""
    with probes.quiet_torchao():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    return prepare_pt2e, convert_pt2e, x86_inductor_quantizer


def seven_bit_activations() -> bool:
    """Whether activations must use 7 bits: without VNNI, x86 int8 kernels sum pairs of u8 x s8 products in int16,
    which 8-bit activations can saturate (torchao's advice; on AVX2 it cost 0.013 Dice on the bundled CT model)."""
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in {"SSE41", "AVX", "AVX2"}
    return capped or torch.backends.cpu.get_cpu_capability() != "AVX512" or not cpu_supports("vnni")


def package_key(model: torch.nn.Module, batch: int, input_size: tuple[int, int], weights: str | None = None) -> str:
    """A digest of everything the compiled package depends on: weights (`weights`: their digest, if known),
    architecture, shapes, versions, CPU. torchao's version is read from its metadata: importing it costs 2 s."""
    meta = [weights or package_cache.weights_digest(model), repr(getattr(model, "cfg", None)), type(model).__qualname__,
            batch, list(input_size), torch.__version__, importlib.metadata.version("torchao"),
            torch.backends.cpu.get_cpu_capability(),
            seven_bit_activations()]
    return hashlib.sha256(json.dumps(meta, default=str).encode()).hexdigest()[:24]


class StaticInt8:
    """A compiled package as a forward function: (b, C, H, W) fp32 -> (b, n, H, W) fp32 logits for any b, run in
    chunks of the compiled batch (the last one zero-padded)."""

    def __init__(self, path: Path, batch: int) -> None:
        self.path, self.batch = path, batch
        self._run = torch._inductor.aoti_load_package(str(path))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._run(chunk) for chunk in _padded([x.float()], self.batch)])[:len(x)]


def load(model: torch.nn.Module, batch: int, input_size: tuple[int, int]) -> StaticInt8 | None:
    """The cached package of `model` at this batch and input size, if one was made and verified (None if not).
    Raises Unavailable where one was made and rejected, cannot run here, or the cache is not private to this user."""
    reason = probes.static_int8_unavailable(building=False)
    if reason:
        raise Unavailable(reason)
    weights = package_cache.weights_digest(model)
    key = package_key(model, batch, input_size, weights)
    try:
        rejected = package_cache.rejection(key)
        if rejected:
            raise Unavailable(rejected)
        path = package_cache.lookup(key, weights)
    except package_cache.UntrustedCache as e:
        raise Unavailable(str(e)) from e
    if path is None:
        return None
    try:
        return StaticInt8(path, batch)
    except RuntimeError:                                  # verified bytes that this torch cannot load: make it again
        package_cache.discard(key)
        return None


def _padded(batches: Sequence[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """`batches` re-cut into batches of exactly `batch` (the last zero-padded)."""
    x = torch.cat(list(batches)).contiguous()
    pad = -len(x) % batch
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    return list(x.split(batch))


def build(model: torch.nn.Module, calibration: Sequence[torch.Tensor], batch: int, input_size: tuple[int, int],
          min_agreement: float | None = None) -> tuple[StaticInt8, float]:
    """Quantise `model` (fp32, CPU) statically, calibrated on `calibration` ((b, C, H, W) network-input batches),
    compile it with AOTInductor, check it against fp32 on the same slices and cache it atomically.

    Returns the package's forward function and the label agreement with fp32 on the calibration slices.
    Raises Unavailable if it cannot be made here, or if its labels agree with fp32 on less than `min_agreement`
    (default MIN_AGREEMENT) of the voxels or a class's Dice against fp32 falls under MIN_CLASS_DICE (remembered, so
    that it is not tried again for these weights). `min_agreement=0` turns both checks off (benchmarks on random
    weights).
    """
    min_agreement = MIN_AGREEMENT if min_agreement is None else min_agreement
    reason = probes.static_int8_unavailable()
    if reason:
        raise Unavailable(reason)
    weights = package_cache.weights_digest(model)
    key = package_key(model, batch, input_size, weights)
    prepare_pt2e, convert_pt2e, xiq = _torchao()
    batches = _padded(calibration, batch)
    model = copy.deepcopy(model).cpu().eval()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(reduce_range=seven_bit_activations()))
    try:
        with torch.no_grad(), probes.quiet_torchao():
            prepared = prepare_pt2e(torch.export.export(model, (batches[0],)).module(), quantizer)
            for x in batches:                                  # activation ranges, observed once
                prepared(x)
            program = torch.export.export(convert_pt2e(prepared), (batches[0],))
    except Exception as e:                               # torch's export and quantisation errors have no common base
        raise Unavailable(f"static int8 could not be prepared here ({type(e).__name__}: "
                          f"{first_line(e, 'no message')})") from e

    def write(tmp: Path) -> None:
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs={"freezing": True})
        except Exception as e:                           # inductor's (and its C++ compiler's) errors: no common base
            raise Unavailable(f"static int8 could not be compiled here ({type(e).__name__}: "
                              f"{first_line(e, 'no message')})") from e
    try:
        path = package_cache.store(key, weights, write)
    except package_cache.UntrustedCache as e:
        raise Unavailable(str(e)) from e
    compiled = StaticInt8(path, batch)
    with torch.inference_mode(), probes.quiet_torchao():
        ours = torch.cat([compiled(x).argmax(1) for x in batches]).numpy()
        fp32 = torch.cat([model(x).argmax(1) for x in batches]).numpy()
    agreement = float((ours == fp32).mean())
    dice = dice_per_class(ours, fp32, int(max(ours.max(), fp32.max())) + 1)          # classes 1.. against fp32's
    found = [c for c in range(1, len(dice) + 1) if (fp32 == c).sum() >= 1e-3 * fp32.size]
    worst = min(found, key=lambda c: dice[c - 1], default=None)
    if agreement < min_agreement or (worst is not None and dice[worst - 1] < MIN_CLASS_DICE and min_agreement > 0):
        lost = (f"kept only {agreement:.1%} of fp32's labels (needs {min_agreement:.1%})" if agreement < min_agreement
                else f"kept class {worst} at Dice {dice[worst - 1]:.3f} against fp32 (needs {MIN_CLASS_DICE})")
        reason = f"static int8 {lost} on the calibration slices; int8 dynamic is used for this model"
        package_cache.reject(key, reason)
        raise Unavailable(reason)
    return compiled, agreement
