"""The official code's arithmetic and data layout over our model's weights: the "official model" of the benchmarks.

Written from the project's notes on the released code (docs and shared notes; not copied from it): the same function
as `DAEFormer.forward`, computed the way the released forward pass computes it, so that it costs what the official
model costs while its labels can be compared with ours voxel for voxel:

- a 1-channel input is repeated to 3 channels, and the first convolution takes 3 (its weight divided by 3);
- efficient attention runs 1x1 convolutions on a (B, C, H, W) image, softmaxes on (B, C, N) and a loop over heads;
- every Mix-FFN evaluates its first Linear twice (the released code does), its LayerNorm reading a transposed view;
- encoder stages hand contiguous (B, C, H, W) copies to the next stage and permuted views to the decoder;
- channel attention copies its heads to (B, h, d, N), normalises them there and projects after the per-head product;
- SCCA reprojects with a 1x1 convolution on an image; patch expansion rearranges and clones before its LayerNorm;
- the head is a 1x1 convolution on a (B, C, H, W) view of the last tokens.

`paper` at 224x224 counts 55.3 GFLOPs here against 43.0 for our model (the official model's own count, fvcore:
27.89 G multiply-adds, 55.8 GFLOPs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from napari_daeformer.model import DAEFormer
from napari_daeformer.model.layers import (
    HW,
    ChannelAttention,
    DualTransformerBlock,
    EfficientAttention,
    MixFFN,
    PatchExpand,
    SkipCrossAttention,
)


def _conv1x1(image: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    return F.conv2d(image, linear.weight[:, :, None, None], linear.bias)


def _mixffn(m: MixFFN, x: torch.Tensor, hw: HW) -> torch.Tensor:
    B, N, _ = x.shape
    conv = m.dwconv(m.fc1(x).transpose(1, 2).view(B, -1, *hw)).flatten(2).transpose(1, 2)
    return m.fc2(m.act(m.norm(conv + m.fc1(x))))                 # fc1 a second time, as released


def _efficient_attention(a: EfficientAttention, x: torch.Tensor, hw: HW) -> torch.Tensor:
    B, N, C = x.shape
    image = x.reshape(B, *hw, C).permute(0, 3, 1, 2)              # 'b (h w) d -> b d h w'
    keys = _conv1x1(image, a.key).reshape(B, C, N)
    queries = _conv1x1(image, a.query).reshape(B, C, N)
    values = _conv1x1(image, a.value).reshape(B, C, N)
    heads = []
    for _ in range(1):                                            # one head, still looped and concatenated
        context = keys.softmax(dim=2) @ values.transpose(1, 2)    # (B, C, C)
        heads.append((context.transpose(1, 2) @ queries.softmax(dim=1)).reshape(B, C, *hw))
    out = _conv1x1(torch.cat(heads, dim=1), a.proj)
    return out.permute(0, 2, 3, 1).reshape(B, N, C)               # 'b d h w -> b (h w) d'


def _channel_attention(a: ChannelAttention, x: torch.Tensor) -> torch.Tensor:
    B, N, C = x.shape
    qkv = a.qkv(x).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 4, 1)   # (3, B, h, d, N)
    q, k, v = F.normalize(qkv[0], dim=-1), F.normalize(qkv[1], dim=-1), qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * a.temperature).softmax(dim=-1)                     # (B, h, d, d)
    return a.proj((attn @ v).permute(0, 3, 1, 2).reshape(B, N, C))


def _block(blk: DualTransformerBlock, x: torch.Tensor, hw: HW) -> torch.Tensor:
    x = x + _efficient_attention(blk.spatial_attn, blk.norm1(x), hw)
    x = x + _mixffn(blk.ffn1, blk.norm2(x), hw)
    x = x + _channel_attention(blk.channel_attn, blk.norm3(x))
    return x + _mixffn(blk.ffn2, blk.norm4(x), hw)


def _expand(e: PatchExpand, x: torch.Tensor, hw: HW) -> tuple[torch.Tensor, HW]:
    (H, W), s = hw, e.scale
    x = e.expand(x)
    B, _, C = x.shape
    x = x.view(B, H, W, s, s, C // s**2).permute(0, 1, 3, 2, 4, 5).reshape(B, H * s, W * s, -1)
    return e.norm(x.view(B, H * s * W * s, -1).clone()), (H * s, W * s)


def _scca(f: SkipCrossAttention, y: torch.Tensor, skip: torch.Tensor, hw: HW) -> torch.Tensor:
    B, N, D = y.shape
    keys = f.norm(skip).transpose(1, 2)                           # (B, D, N): keys and queries from the skip
    values = f.norm(y).transpose(1, 2)
    heads = []
    for _ in range(1):
        context = keys.softmax(dim=2) @ values.transpose(1, 2)
        heads.append(context.transpose(1, 2) @ keys.softmax(dim=1))
    z = torch.cat(heads, dim=1).reshape(B, D, *hw)
    z = f.proj_norm(_conv1x1(z, f.proj).reshape(B, 2 * D, N).permute(0, 2, 1))
    t = torch.cat([y, skip], dim=2) + z
    return t + _mixffn(f.ffn, f.ffn_norm(t), hw)


def official_forward(model: DAEFormer) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, in_channels, H, W) -> (B, num_classes, H, W) logits of `model`, computed as the released code computes them."""
    first = model.encoder[0].embed.proj
    w3 = first.weight.repeat(1, 3, 1, 1) / 3 if model.cfg.in_channels == 1 else first.weight

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        skips = []
        for i, stage in enumerate(model.encoder):
            weight = w3 if i == 0 else stage.embed.proj.weight
            image = F.conv2d(x, weight, stage.embed.proj.bias, stage.embed.proj.stride, stage.embed.proj.padding)
            B, C, H, W = image.shape
            t = stage.embed.norm(image.flatten(2).transpose(1, 2))
            for blk in stage.blocks:
                t = _block(blk, t, (H, W))
            x = stage.norm(t).reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()   # (B, C, H, W) copy
            skips.append((x, (H, W)))
        image, hw = skips[2]
        b, c = image.shape[:2]
        y, hw = _expand(model.bottleneck_expand, image.permute(0, 2, 3, 1).view(b, -1, c), hw)
        for stage, (skip, hw) in zip(model.decoder, (skips[1], skips[0])):
            b, c = skip.shape[:2]
            s = skip.permute(0, 2, 3, 1).view(b, -1, c)
            t = stage.out_proj(_scca(stage.fuse, stage.in_proj(y), s, hw))
            for blk in stage.blocks:
                t = _block(blk, t, hw)
            y, hw = _expand(stage.expand, t, hw)
        b = y.shape[0]
        image = y.view(b, *hw, -1).permute(0, 3, 1, 2)
        return _conv1x1(image, model.head)

    return forward
