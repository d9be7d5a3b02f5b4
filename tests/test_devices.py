"""`precision` to the engine's numeric path, and the CPU batch size."""

from __future__ import annotations

import pytest
import torch

from napari_daeformer.base.errors import InferenceError
from napari_daeformer.engine import probes
from napari_daeformer.engine.devices import resolve_path
from napari_daeformer.engine.inference import default_batch_size
from napari_daeformer.model import DAEFormer, named_config
from napari_daeformer.model.checkpoint import Checkpoint, ModelCard
from napari_daeformer.model.preprocessing import ct_preprocessing

CPU = torch.device("cpu")


@pytest.mark.parametrize(("bf16", "int8", "static", "path"), [
    (True, True, True, "bf16 autocast"), (False, True, True, "fp32"), (False, True, False, "fp32"),
    (False, False, True, "fp32")])
def test_auto_picks_the_measured_cpu_path(monkeypatch: pytest.MonkeyPatch, bf16: bool, int8: bool, static: bool,
                                          path: str) -> None:
    """bf16 where the CPU has it natively, else fp32: never int8, whatever this CPU's int8 kernels (a whole run with
    static int8 was slower than fp32 on both kinds of CPU measured)."""
    monkeypatch.setattr(probes, "cpu_has_native_bf16", lambda: bf16)
    monkeypatch.setattr(probes, "cpu_has_int8_kernels", lambda: int8)
    monkeypatch.setattr(probes, "static_int8_unavailable", lambda building=True: None if static else "no C++ compiler")
    assert resolve_path("auto", CPU) == path
    assert resolve_path("fp32", CPU) == "fp32"
    if int8:
        assert resolve_path("int8", CPU) == ("int8 static" if static else "int8 dynamic")


def test_explicit_paths_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_path("bf16", CPU) == "bf16 autocast"
    with pytest.raises(InferenceError, match="fp16 autocast is not supported on the CPU"):
        resolve_path("fp16", CPU)
    with pytest.raises(InferenceError, match="unknown precision 'int4'"):
        resolve_path("int4", CPU)
    with pytest.raises(InferenceError, match="int8 runs on the CPU only"):
        resolve_path("int8", torch.device("cuda"))
    monkeypatch.setattr(probes, "cpu_has_int8_kernels", lambda: False)
    with pytest.raises(InferenceError, match="no int8 kernels"):
        resolve_path("int8", CPU)


@pytest.mark.parametrize(("name", "batch"), [("paper", 1), ("small", 2)])
def test_cpu_batch_keeps_activations_near_the_caches(name: str, batch: int) -> None:
    model = DAEFormer(named_config(name, num_classes=9, in_channels=1))
    card = ModelCard(model.cfg, tuple(f"c{i}" for i in range(9)), preprocessing=ct_preprocessing())
    assert default_batch_size(Checkpoint(model, card), CPU) == batch


def test_cuda_batch_fills_half_the_free_memory_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked without a GPU: the free memory is the only thing read from the device."""
    from napari_daeformer.engine.inference import CUDA_MAX_BATCH
    model = DAEFormer(named_config("paper", num_classes=9, in_channels=1))
    ckpt = Checkpoint(model, ModelCard(model.cfg, tuple(f"c{i}" for i in range(9)), preprocessing=ct_preprocessing()))
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (75e9, 80e9))     # an idle H100
    at_224 = default_batch_size(ckpt, cuda)
    at_512 = default_batch_size(ckpt, cuda, (512, 512))
    assert 200 <= at_224 <= CUDA_MAX_BATCH and at_512 < at_224       # the source-size logits count too
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1e9, 80e9))      # a busy card
    assert default_batch_size(ckpt, cuda, (512, 512)) == 2         # 0.5 GB / (160 MB + 21 MB) per slice
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1e6, 80e9))
    assert default_batch_size(ckpt, cuda, (512, 512)) == 1
