"""The inference engine: accuracy of the bundled model, batch invariance, cancellation, bounded memory."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_daeformer.app.cli import main
from napari_daeformer.base.errors import InferenceError
from napari_daeformer.base.jobs import drain
from napari_daeformer.base.metrics import dice_per_class
from napari_daeformer.engine.inference import Cancelled, Progress, SliceInferer
from napari_daeformer.engine.probes import cpu_has_int8_kernels
from napari_daeformer.engine.stages import Accumulator, Predictor, SliceSource, int8_copy, low_precision_copy
from napari_daeformer.io import read_image
from napari_daeformer.io.nifti import write_nifti
from napari_daeformer.io.orientation import radiological_affine
from napari_daeformer.io.sample_data import synthetic_ct, synthetic_skin
from napari_daeformer.model import DAEFormer
from napari_daeformer.model.bundled import bundled_model
from napari_daeformer.model.checkpoint import Checkpoint, ModelCard, load_checkpoint

from .conftest import TINY
from .model.test_attention import ShapeRecorder

HELD_OUT = 0          # the bundled CT model was trained on seeds 1-12 and validated on 13-14


@pytest.fixture(scope="module")
def ct_model() -> Checkpoint:
    return load_checkpoint(bundled_model("ct"))


@pytest.fixture(scope="module")
def held_out() -> object:
    return synthetic_ct(seed=HELD_OUT)


def test_bundled_ct_model_reaches_dice_080(ct_model: Checkpoint, held_out) -> None:  # type: ignore[no-untyped-def]
    result = SliceInferer(ct_model, precision="fp32", device="cpu").segment(held_out.image)
    dice = dice_per_class(result.labels, held_out.labels, 6)
    assert result.labels.dtype == np.uint8 and result.labels.shape == held_out.image.shape
    assert np.nanmean(dice) >= 0.80, dice


def test_a_run_left_at_a_yield_leaves_its_thread_able_to_train(ct_model: Checkpoint, held_out) -> None:  # type: ignore[no-untyped-def]
    """A cancelled worker drops its job at a yield; the thread then runs other jobs (a fine-tune that must train).
    Inference mode held across the yield made the Teach dock's trainer fail "does not require grad"."""
    job = SliceInferer(ct_model, precision="fp32", device="cpu", batch_size=2).run(held_out.image[:8])
    next(job)
    next(job)
    try:
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    finally:
        job.close()


def test_bf16_agrees_with_fp32(ct_model: Checkpoint, held_out) -> None:  # type: ignore[no-untyped-def]
    fp32 = SliceInferer(ct_model, precision="fp32", device="cpu").segment(held_out.image).labels
    bf16 = SliceInferer(ct_model, precision="bf16", device="cpu").segment(held_out.image).labels
    assert (fp32 == bf16).mean() >= 0.995


@pytest.mark.parametrize("path", ["bf16 autocast", "bf16 weights", "int8 dynamic"])
def test_each_fast_path_agrees_with_fp32(ct_model: Checkpoint, held_out, path: str) -> None:  # type: ignore[no-untyped-def]
    """The engine's stages with one numeric path swapped: labels agree with fp32 on 99.5% of the voxels and the
    Dice against the truth moves by less than 0.002 (the GPU uses bf16 weights; checked here on the CPU)."""
    if path == "int8 dynamic" and not cpu_has_int8_kernels():
        pytest.skip("no x86 int8 kernels in this torch build (ARM CPU): the engine never picks int8 here")
    image, truth = held_out.image[8:40], held_out.labels[8:40]
    prep = ct_model.card.preprocessing.for_image(image)

    def labels(predict: Predictor) -> np.ndarray:
        source = SliceSource(image, np.arange(len(image)), False, prep, 255.0, ct_model.card.input_size,
                             torch.device("cpu"))
        out = Accumulator(len(image), source.size, 6)
        with torch.inference_mode():
            for start in range(0, len(image), 8):
                idx, x = source.batch(start, start + 8)
                out.store(idx, [t.numpy() for t in out.outputs(predict(x))])
        return out.labels

    fp32 = labels(Predictor(ct_model.model, torch.device("cpu"), "fp32"))
    fast = Predictor(ct_model.model, torch.device("cpu"), path)
    assert fast.model is not ct_model.model or path.endswith("autocast")
    other = labels(fast)
    assert (other == fp32).mean() >= 0.995
    assert abs(np.nanmean(dice_per_class(other, truth, 6)) - np.nanmean(dice_per_class(fp32, truth, 6))) < 0.002
    assert next(ct_model.model.parameters()).dtype == torch.float32          # the checkpoint's model is untouched


def test_int8_copy_quantises_the_linears_the_attention_does_not_read(tiny_model: DAEFormer) -> None:
    if not cpu_has_int8_kernels():
        pytest.skip("no x86 int8 kernels in this torch build")
    q = int8_copy(tiny_model)
    kinds = {name: type(m).__module__ for name, m in q.named_modules()}
    block = "encoder.0.blocks.0."
    assert "quantized" in kinds[block + "ffn1.fc1"] and "quantized" in kinds[block + "channel_attn.qkv"]
    assert "quantized" not in kinds[block + "spatial_attn.value"]          # the folds read these weights
    assert "quantized" not in kinds["decoder.0.fuse.proj"]
    assert int8_copy(tiny_model) is q                                      # made once per model
    assert isinstance(tiny_model.encoder[0].blocks[0].ffn1.fc1, torch.nn.Linear)   # the model itself untouched


def test_low_precision_copy_is_made_once_and_follows_the_weights(tiny_model: DAEFormer) -> None:
    first = low_precision_copy(tiny_model, torch.bfloat16)
    assert low_precision_copy(tiny_model, torch.bfloat16) is first
    with torch.no_grad():
        next(tiny_model.parameters()).add_(1.0)                             # weights changed in place
    again = low_precision_copy(tiny_model, torch.bfloat16)
    assert again is not first
    assert torch.equal(next(again.parameters()), next(tiny_model.parameters()).bfloat16())


def test_cli_segment_keeps_geometry(tmp_path: Path, held_out) -> None:  # type: ignore[no-untyped-def]
    affine = radiological_affine(held_out.spacing)                  # the phantom as drawn (the liver on the left)
    affine[:3, 3] = [-120.0, 80.0, 15.0]
    src = write_nifti(tmp_path / "ct.nii.gz", held_out.image, affine)
    assert main(["segment", str(src), str(tmp_path / "seg.nii.gz"), "--device", "cpu"]) == 0
    seg = read_image(tmp_path / "seg.nii.gz")
    assert np.array_equal(seg.affine, read_image(src).affine)
    assert np.nanmean(dice_per_class(seg.data, held_out.labels, 6)) >= 0.80
    assert main(["segment", str(src), str(tmp_path / "seg.nii.gz")]) == 2          # exists: refused


def test_cli_segment_wrong_kind_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from skimage import io as skio
    skio.imsave(str(tmp_path / "photo.png"), synthetic_skin(seed=2, size=(64, 64)).image, check_contrast=False)
    assert main(["segment", str(tmp_path / "photo.png"), str(tmp_path / "m.png"), "--model", "ct"]) == 2
    err = capsys.readouterr().err
    assert "RGB" in err and err.count("\n") == 1


def test_batch_size_and_cancel_rerun_give_identical_labels(ct_model: Checkpoint) -> None:
    image = synthetic_ct(seed=21, shape=(12, 128, 128)).image
    one = SliceInferer(ct_model, batch_size=1, precision="fp32", device="cpu").segment(image).labels
    eight = SliceInferer(ct_model, batch_size=8, precision="fp32", device="cpu").segment(image).labels
    assert np.array_equal(one, eight)
    cancel = threading.Event()
    gen = SliceInferer(ct_model, batch_size=2, precision="fp32", device="cpu").run(image, cancel=cancel)
    next(gen)
    cancel.set()
    with pytest.raises(Cancelled):
        next(gen)                                      # nothing partial is returned
    again = SliceInferer(ct_model, batch_size=4, precision="fp32", device="cpu").segment(image).labels
    assert np.array_equal(again, one)


def test_axes_2d_and_outputs(ct_model: Checkpoint) -> None:
    image = synthetic_ct(seed=22, shape=(8, 96, 112)).image
    res = SliceInferer(ct_model, batch_size=16, device="cpu").segment(image, axis=2, probabilities=True, entropy=True,
                                                                 slice_uncertainty=True)
    assert res.labels.shape == image.shape and res.entropy.shape == image.shape
    assert res.probabilities.shape == (6, *image.shape) and res.slice_uncertainty.shape == (112,)
    np.testing.assert_allclose(res.probabilities.astype(np.float32).sum(0), 1.0, atol=1e-2)
    assert np.array_equal(res.probabilities.argmax(0)[res.entropy < 0.5], res.labels[res.entropy < 0.5])
    one = SliceInferer(ct_model, device="cpu").segment(image[4])
    assert one.labels.shape == (96, 112)


def test_bad_requests(ct_model: Checkpoint) -> None:
    with pytest.raises(InferenceError, match="RGB"):
        SliceInferer(ct_model).segment(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(InferenceError, match="shape"):
        SliceInferer(ct_model).segment(np.zeros((2, 2, 32, 32)))
    with pytest.raises(InferenceError, match="axis"):
        SliceInferer(ct_model).segment(np.zeros((4, 32, 32)), axis=3)
    if not torch.cuda.is_available():                     # asking for a GPU that is not there: one clear error
        with pytest.raises(InferenceError, match="no CUDA"):
            SliceInferer(ct_model, device="cuda").segment(np.zeros((4, 32, 32)))


def test_memory_is_bounded_for_512x512x200(tiny_model: DAEFormer) -> None:
    """The largest tensor is one batch at source resolution, never the whole volume's logits.

    Bound: batch * max(num_classes, in_channels) * 512 * 512 * 4 bytes (resized logits of one batch), or the
    widest activation of a batch at network size, whichever is larger; with batch 8 and 3 classes that is
    25 MB, against 629 MB for the float logits of all 200 slices.
    """
    ckpt = Checkpoint(tiny_model, ModelCard(TINY, ("bg", "a", "b"), input_size=(64, 64)))
    volume = np.zeros((200, 512, 512), np.int16)
    batch = 8
    bound = max(batch * max(TINY.num_classes, 1) * 512 * 512,
                batch * 16 * TINY.embed_dims[0] * (64 // 4) ** 2) * 4
    with ShapeRecorder() as rec:
        result = SliceInferer(ckpt, batch_size=batch, precision="fp32", device="cpu").segment(volume)
    largest = max(int(np.prod(s)) for s in rec.shapes) * 4
    assert result.labels.shape == volume.shape
    assert largest <= bound < 200 * TINY.num_classes * 512 * 512 * 4 / 20


@pytest.mark.parametrize("dtype", ["<i2", ">i2", "<u2", "<f4", ">f8", "<i4"])
def test_any_source_dtype(ct_model: Checkpoint, dtype: str) -> None:
    """Big-endian NIfTI, uint16 DICOM-like data, floats: all give the same labels as int16."""
    image = synthetic_ct(seed=23, shape=(4, 64, 64)).image
    ref = SliceInferer(ct_model, precision="fp32", device="cpu").segment(image).labels
    data = (image.astype(np.int32) + 2000).astype(dtype) if dtype.endswith("u2") else image.astype(dtype)
    window = (-125 + 2000, 275 + 2000) if dtype.endswith("u2") else None
    out = SliceInferer(ct_model, precision="fp32", device="cpu", window=window).segment(data).labels
    assert (out == ref).mean() > 0.999


def test_numpy_and_torch_preprocessing_agree() -> None:
    """Training normalises with numpy, the engine with torch on the device: the same numbers."""
    from napari_daeformer.model.preprocessing import ct_preprocessing, rgb_preprocessing
    ct = np.random.default_rng(0).integers(-1200, 2000, (3, 16, 16)).astype(np.int16)
    rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    for prep, x in ((ct_preprocessing("liver"), ct), (rgb_preprocessing(), rgb)):
        np.testing.assert_allclose(prep.apply_tensor(torch.from_numpy(x)).numpy(), prep.apply(x), rtol=1e-6, atol=1e-6)


def test_cuda_out_of_memory_halves_the_batch(tiny_model: DAEFormer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated on the CPU: a forward pass over more than 2 slices raises torch's CUDA OOM error."""
    ckpt = Checkpoint(tiny_model, ModelCard(TINY, ("bg", "a", "b"), input_size=(64, 64)))
    forward = tiny_model.forward

    def small_batches_only(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(x)

    volume = np.random.default_rng(0).normal(0, 200, (7, 64, 64))
    expected = SliceInferer(ckpt, batch_size=1, precision="fp32", device="cpu").segment(volume).labels
    monkeypatch.setattr(tiny_model, "forward", small_batches_only)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    result = SliceInferer(ckpt, batch_size=8, precision="fp32", device="cpu").segment(volume)
    assert result.batch_size == 2
    assert np.array_equal(result.labels, expected)
    monkeypatch.setattr(tiny_model, "forward", lambda x: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("OOM")))
    with pytest.raises(InferenceError, match="even at batch size 1"):
        SliceInferer(ckpt, batch_size=4, precision="fp32", device="cpu").segment(volume)


def test_the_next_batch_is_queued_before_a_batch_is_collected(tiny_model: DAEFormer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The overlap a GPU needs: when batch k's progress arrives, batch k+1 has already gone through the model (on a
    GPU its copies and compute overlap k's return); every slice is still counted once, in order, with the same
    labels as batch 1."""
    ckpt = Checkpoint(tiny_model, ModelCard(TINY, ("bg", "a", "b"), input_size=(64, 64)))
    volume = np.random.default_rng(1).normal(0, 200, (7, 64, 64))
    expected = SliceInferer(ckpt, batch_size=1, precision="fp32", device="cpu").segment(volume).labels
    calls: list[int] = []
    forward = tiny_model.forward
    monkeypatch.setattr(tiny_model, "forward", lambda x: calls.append(len(x)) or forward(x))
    gen = SliceInferer(ckpt, batch_size=3, precision="fp32", device="cpu").run(volume)
    seen = []
    with pytest.raises(StopIteration) as stop:
        while True:
            p = next(gen)
            seen.append((p.done, len(calls), p.slices.tolist()))
            assert np.array_equal(p.labels, expected[p.slices])                              # live display: final
    assert seen == [(3, 2, [0, 1, 2]), (6, 3, [3, 4, 5]), (7, 3, [6])]
    inferer = SliceInferer(ckpt, batch_size=2, precision="fp32", device="cpu")
    outwards = [p.slices.tolist() for p in _progress(inferer.run(volume, first=4))]
    assert outwards == [[3, 4], [2, 5], [1, 6], [0]]                   # the slice on screen first, then outwards
    assert np.array_equal(stop.value.value.labels, expected)


def _progress(gen: object) -> list[Progress]:
    seen: list[Progress] = []
    drain(gen, seen.append)  # type: ignore[arg-type]
    return seen


def test_cli_segment_checks_the_output_before_any_work(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import napari_daeformer.app.commands as commands
    monkeypatch.setattr(commands, "read_image", lambda path: pytest.fail("the scan was read before the output was checked"))
    (tmp_path / "taken.nii.gz").write_bytes(b"x")
    for output, words in (("out.jpg", "JPEG is lossy"), ("out.bmp", "cannot write labels as .bmp"),
                          ("taken.nii.gz", "already exists")):
        assert main(["segment", str(tmp_path / "scan.nii.gz"), str(tmp_path / output)]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1


def test_cli_demo_never_replaces_an_earlier_demo_silently(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "synthetic_ct_labels.nii.gz").write_bytes(b"my edits")
    assert main(["demo", "--headless", "--out", str(tmp_path / "demo")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "demo" / "synthetic_ct_labels.nii.gz").read_bytes() == b"my edits"
    previous = os.umask(0o027)
    try:
        assert main(["demo", "--headless", "--out", str(tmp_path / "demo"), "--overwrite"]) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "demo" / "synthetic_ct_labels.nii.gz").stat().st_mode & 0o777 == 0o640    # the umask rules


def test_accumulator_labels_equal_a_plain_resize_and_argmax() -> None:
    """The CPU's channels-last resize and argmax give the labels of the plain (b, n, Y, X) computation."""
    logits = torch.randn(3, 5, 40, 56, generator=torch.Generator().manual_seed(0))
    labels = Accumulator(3, (97, 131), 5).outputs(logits)[0]
    plain = F.interpolate(logits, size=(97, 131), mode="bilinear", align_corners=False).argmax(1)
    assert labels.dtype == torch.uint8 and torch.equal(labels, plain.to(torch.uint8))
