"""Each attention module against a slow reference written from the paper's equations (arXiv 2212.13504, section 3)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from napari_daeformer.model.layers import ChannelAttention, EfficientAttention, SkipCrossAttention

torch.manual_seed(0)


def ref_efficient(x: torch.Tensor, m: EfficientAttention) -> torch.Tensor:
    """EA(X) = (softmax_channels(Q) (softmax_tokens(K)^T V)) Wo, one sample at a time, explicit loops."""
    out = []
    for xb in x.double():
        q = xb @ m.query.weight.double().T + m.query.bias.double()
        k = xb @ m.key.weight.double().T + m.key.bias.double()
        v = xb @ m.value.weight.double().T + m.value.bias.double()
        q_s = torch.stack([torch.exp(r) / torch.exp(r).sum() for r in q])            # each token's row sums to 1
        k_s = torch.stack([torch.exp(c) / torch.exp(c).sum() for c in k.T]).T        # each channel's column sums to 1
        g = k_s.T @ v
        out.append((q_s @ g) @ m.proj.weight.double().T + m.proj.bias.double())
    return torch.stack(out)


def ref_channel(x: torch.Tensor, m: ChannelAttention) -> torch.Tensor:
    """CA: per head, Q^ K^ L2-normalised over tokens, A = softmax_row(tau Q^T K^), out = V A^T."""
    B, N, C = x.shape
    h, d = m.num_heads, C // m.num_heads
    out = torch.zeros(B, N, C, dtype=torch.float64)
    for b in range(B):
        qkv = x[b].double() @ m.qkv.weight.double().T
        q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
        for i in range(h):
            qi, ki, vi = (t[:, i * d:(i + 1) * d] for t in (q, k, v))             # N x d
            qi = qi / qi.norm(dim=0, keepdim=True)
            ki = ki / ki.norm(dim=0, keepdim=True)
            logits = m.temperature[i, 0, 0].double() * (qi.T @ ki)                  # d x d
            a = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
            out[b, :, i * d:(i + 1) * d] = vi @ a.T
    return out @ m.proj.weight.double().T + m.proj.bias.double()


def ref_scca(y: torch.Tensor, s: torch.Tensor, hw: tuple[int, int], m: SkipCrossAttention) -> torch.Tensor:
    """SCCA: G = softmax_tokens(S^)^T Y^, Z = softmax_channels(S^) G, T = [Y,S] + LN(W Z), T + FFN(LN(T))."""
    m = m.double()
    y, s = y.double(), s.double()
    y_n, s_n = m.norm(y), m.norm(s)
    g = torch.softmax(s_n, dim=1).transpose(1, 2) @ y_n
    z = torch.softmax(s_n, dim=2) @ g
    t = torch.cat([y, s], dim=2) + m.proj_norm(z @ m.proj.weight.T + m.proj.bias)
    ffn_in = m.ffn_norm(t)
    h = ffn_in @ m.ffn.fc1.weight.T + m.ffn.fc1.bias
    B, N, D = h.shape
    img = h.transpose(1, 2).reshape(B, D, *hw)
    conv = torch.nn.functional.conv2d(img, m.ffn.dwconv.weight, m.ffn.dwconv.bias, padding=1, groups=D)
    mixed = conv.flatten(2).transpose(1, 2) + h
    return t + m.ffn.fc2(torch.nn.functional.gelu(m.ffn.norm(mixed)))


@pytest.mark.parametrize("tokens", [20, 12], ids=["projections folded (N > C)", "unfolded (N <= C)"])
def test_efficient_attention_matches_reference(tokens: int) -> None:
    m = EfficientAttention(16)
    x = torch.randn(2, tokens, 16)
    torch.testing.assert_close(m(x).double(), ref_efficient(x, m), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens", [40, 30], ids=["projection folded (N > C)", "per head (N <= C)"])
def test_channel_attention_matches_reference(tokens: int) -> None:
    m = ChannelAttention(32, num_heads=8)
    with torch.no_grad():
        m.temperature.copy_(torch.rand(8, 1, 1) + 0.5)
    x = torch.randn(2, tokens, 32)
    torch.testing.assert_close(m(x).double(), ref_channel(x, m), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hw", [(4, 6), (3, 4)], ids=["projection folded (N > 2D)", "unfolded (N <= 2D)"])
def test_scca_matches_reference_and_doubles_width(hw: tuple[int, int]) -> None:
    m = SkipCrossAttention(8)
    n = hw[0] * hw[1]
    y, s = torch.randn(2, n, 8), torch.randn(2, n, 8)
    out = m(y, s, hw)
    assert out.shape == (2, n, 16)
    torch.testing.assert_close(out.double(), ref_scca(y, s, hw, m), rtol=1e-4, atol=1e-5)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _largest(module: torch.nn.Module, *inputs: torch.Tensor) -> tuple[int, list[tuple[int, ...]]]:
    with torch.no_grad(), ShapeRecorder() as rec:
        module(*inputs)
    return max(int(torch.Size(s).numel()) for s in rec.shapes), rec.shapes


@pytest.mark.parametrize("make", [lambda: EfficientAttention(16), lambda: ChannelAttention(16, 8)],
                         ids=["efficient", "channel"])
def test_attention_cost_is_linear_in_tokens(make) -> None:  # type: ignore[no-untyped-def]
    m = make()
    sizes = {}
    for n in (1024, 4096):
        largest, shapes = _largest(m, torch.randn(1, n, 16))
        assert not any(sum(d >= n for d in s) >= 2 for s in shapes), "an N x N tensor was created"
        sizes[n] = largest
    assert sizes[4096] <= 4 * sizes[1024] * 1.01          # 4x the tokens, at most 4x the largest tensor


def test_scca_cost_is_linear_in_tokens() -> None:
    m = SkipCrossAttention(8)
    sizes = {}
    for side in (32, 64):
        n = side * side
        largest, shapes = _largest(m, torch.randn(1, n, 8), torch.randn(1, n, 8), (side, side))
        assert not any(sum(d >= n for d in s) >= 2 for s in shapes)
        sizes[n] = largest
    assert sizes[4096] <= 4 * sizes[1024] * 1.01


def test_channel_attention_stays_finite_in_fp16_on_many_large_tokens() -> None:
    """The queries and keys are normalised before their product: unnormalised, its sums over 4096 tokens pass fp16's
    65504 and the map turns to inf/NaN (fp16 autocast is `precision auto` on CUDA GPUs without bf16)."""
    m = ChannelAttention(32, num_heads=8)
    x = torch.randn(1, 4096, 32) * 10
    with torch.no_grad():
        q, k, _ = (x[0] @ m.qkv.weight.T).split(32, dim=-1)                 # (N, C) each
        per_head = [q[:, i:i + 4].T @ k[:, i:i + 4] for i in range(0, 32, 4)]
    assert max(g.abs().max() for g in per_head) > 65504                      # the unnormalised product overflows
    out = m.half()(x.half())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), m.float()(x), rtol=0.05, atol=0.05)
