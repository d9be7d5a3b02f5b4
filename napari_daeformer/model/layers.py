"""DAE-Former building blocks. Tokens are (B, N, C) with N = H * W laid out row-major."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HW = tuple[int, int]


def tokens_to_image(x: torch.Tensor, hw: HW) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) feature map."""
    B, N, C = x.shape
    return x.transpose(1, 2).reshape(B, C, *hw)


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature map -> (B, H*W, C) tokens."""
    return x.flatten(2).transpose(1, 2)


class EfficientAttention(nn.Module):
    """Spatial attention of linear cost (Shen et al.), one head, no 1/sqrt(d) scaling.

    Queries are softmaxed over channels and keys over tokens, so the global context
    `softmax_N(K)^T V` is only (C, C): the cost is O(N C^2), never O(N^2). Where there are more tokens than
    channels, the value and output projections are folded into that context (exact: each row of softmax_N(K)
    sums to 1), which saves two of the six (N, C) x (C, C) products.
    """

    folded_linears = ("value", "proj")                         # Linears whose weights forward() reads itself

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query(x).softmax(dim=-1)                     # (B, N, C): each token sums to 1
        k = self.key(x).transpose(-2, -1).softmax(dim=-1)     # (B, C, N): each channel sums to 1 over tokens
        N, C = x.shape[-2:]
        if N <= C:
            return self.proj(q @ (k @ self.value(x)))         # (B, C, C) context, (B, N, C) out
        context = F.linear(k @ x, self.value.weight, self.value.bias)   # (B, C, C) = k @ value(x)
        return torch.baddbmm(self.proj.bias, q, context @ self.proj.weight.t())      # (B, N, C) = proj(q @ context)


class ChannelAttention(nn.Module):
    """Transposed (cross-covariance, XCiT-style) attention: a (d, d) map per head, O(N d^2).

    Computed on the (B, N, C) tokens as they come, the heads being views of them. Where there are more tokens than
    channels, each head's map is folded into the output projection, so that the values meet one (C, C) matrix in a
    single product (exact: `proj(concat_h(V_h A_h^T)) = V P + b` with `P = blockdiag_h(A_h^T) W^T`).
    """

    folded_linears = ("proj",)

    def __init__(self, dim: int, num_heads: int = 8) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h, d = self.num_heads, C // self.num_heads
        q, k, v = self.qkv(x).split(C, dim=-1)                # (B, N, C) views each
        q = F.normalize(q, dim=1)                             # L2 over tokens, per channel (before the product, so
        k = F.normalize(k, dim=1)                             # that it cannot overflow in fp16)
        gram = q.unflatten(2, (h, d)).permute(0, 2, 3, 1) @ k.unflatten(2, (h, d)).transpose(1, 2)   # (B, h, d, d)
        attn = (gram * self.temperature).softmax(dim=-1)
        if N <= C:                                            # few tokens: the per-head product is the cheaper
            out = attn @ v.unflatten(2, (h, d)).permute(0, 2, 3, 1)                # (B, h, d, N)
            return self.proj(out.permute(0, 3, 1, 2).reshape(B, N, C))
        weight = self.proj.weight.t().unflatten(0, (h, d))    # (h, d, C): rows of W^T by head
        fold = (attn.transpose(-2, -1) @ weight).reshape(B, C, C)                  # (B, C, C) = blockdiag(A^T) W^T
        return torch.baddbmm(self.proj.bias, v, fold)         # (B, N, C)


class MixFFN(nn.Module):
    """Mix-FFN with skip: `fc2(GELU(LN(dwconv3x3(h) + h)))` with `h = fc1(x)`; the conv supplies position."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.norm = nn.LayerNorm(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, hw: HW) -> torch.Tensor:
        h = self.fc1(x)                                        # (B, N, hidden)
        B, N, C = h.shape
        image = h.reshape(B, *hw, C).permute(0, 3, 1, 2)       # (B, hidden, H, W), a channels-last view: no copy
        conv, weight = self.dwconv, self.dwconv.weight.clone()     # (hidden, 1, 3, 3)
        weight[:, :, 1, 1] += 1                                # dwconv(h) + h as one convolution (exact)
        mixed = F.conv2d(image, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return self.fc2(self.act(self.norm(mixed.permute(0, 2, 3, 1).reshape(B, N, C))))   # the conv keeps channels-last


class DualTransformerBlock(nn.Module):
    """Four pre-norm residual sub-layers: efficient attention, FFN, channel attention, FFN."""

    def __init__(self, dim: int, mlp_ratio: int = 4, channel_heads: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.spatial_attn = EfficientAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn1 = MixFFN(dim, dim * mlp_ratio)
        self.norm3 = nn.LayerNorm(dim)
        self.channel_attn = ChannelAttention(dim, channel_heads)
        self.norm4 = nn.LayerNorm(dim)
        self.ffn2 = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, hw: HW) -> torch.Tensor:
        x = x + self.spatial_attn(self.norm1(x))
        x = x + self.ffn1(self.norm2(x), hw)
        x = x + self.channel_attn(self.norm3(x))
        return x + self.ffn2(self.norm4(x), hw)


class OverlapPatchEmbed(nn.Module):
    """Strided, overlapping conv + LayerNorm: the patch embedding and the patch merging of DAE-Former."""

    def __init__(self, in_channels: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, HW]:
        x = self.proj(x)                                       # (B, dim, H/stride, W/stride)
        hw = (x.shape[2], x.shape[3])
        return self.norm(image_to_tokens(x)), hw


class PatchExpand(nn.Module):
    """Bias-free Linear, depth-to-space by `scale`, LayerNorm: (B, H*W, dim) -> (B, sH*sW, out_dim)."""

    def __init__(self, dim: int, out_dim: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def _expanded(self, x: torch.Tensor, hw: HW) -> torch.Tensor:
        """(B, H, W, s, s, out_dim): the new tokens, normalised, before the depth-to-space move (the LayerNorm is
        per token, so it commutes with the move and reads the Linear's output in place)."""
        (H, W), s = hw, self.scale
        return self.norm(self.expand(x).reshape(x.shape[0], H, W, s, s, -1))   # channels ordered (p1, p2, c)

    def forward(self, x: torch.Tensor, hw: HW) -> tuple[torch.Tensor, HW]:
        B, H, W, s, _, c = (y := self._expanded(x, hw)).shape
        return y.permute(0, 1, 3, 2, 4, 5).reshape(B, H * s * W * s, c), (H * s, W * s)   # (B, (H p1)(W p2), c)

    def to_image(self, x: torch.Tensor, hw: HW, head: nn.Module) -> torch.Tensor:
        """`head` over `forward`'s tokens as a (B, n, sH, sW) image. The per-token head runs before the move, which
        then moves its n channels instead of out_dim (for the final 4x expansion: 9 classes instead of 128)."""
        B, H, W, s, _, n = (y := head(self._expanded(x, hw))).shape
        return y.permute(0, 5, 1, 3, 2, 4).reshape(B, n, H * s, W * s)


class SkipCrossAttention(nn.Module):
    """Skip Connection Cross Attention (SCCA) as in the released code: no Q/K/V projections.

    Queries and keys are the (normalised) encoder skip S, values the decoder feature Y:
    `Z = softmax_C(S) (softmax_N(S)^T Y)`, then `T = [Y, S] + LN(W Z)` and `T + MixFFN(LN(T))`.
    Input width D each; output width 2D. Where N > 2D the projection W is folded into the (D, D) context.
    """

    folded_linears = ("proj",)

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)                          # shared by Y and S
        self.proj = nn.Linear(dim, 2 * dim)
        self.proj_norm = nn.LayerNorm(2 * dim)
        self.ffn_norm = nn.LayerNorm(2 * dim)
        self.ffn = MixFFN(2 * dim, 4 * dim)

    def forward(self, y: torch.Tensor, skip: torch.Tensor, hw: HW) -> torch.Tensor:
        y_n, s_n = self.norm(y), self.norm(skip)              # (B, N, D) each
        context = s_n.transpose(-2, -1).softmax(dim=-1) @ y_n  # (B, D, D): keys = skip (softmax over tokens)
        queries = s_n.softmax(dim=-1)                          # (B, N, D)
        N, D = y.shape[-2:]
        if N > 2 * D:                                          # the projection folded into the context: cheaper
            z = torch.baddbmm(self.proj.bias, queries, context @ self.proj.weight.t())    # (B, N, 2D)
        else:
            z = self.proj(queries @ context)
        t = torch.cat([y, skip], dim=-1) + self.proj_norm(z)   # (B, N, 2D)
        return t + self.ffn(self.ffn_norm(t), hw)
