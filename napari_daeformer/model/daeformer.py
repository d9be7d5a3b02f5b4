"""The DAE-Former network: three encoder stages, two SCCA decoder stages, a 4x expansion to logits."""

from __future__ import annotations

import torch
from torch import nn

from napari_daeformer.model.config import SIZE_MULTIPLE, DAEFormerConfig
from napari_daeformer.model.layers import HW, DualTransformerBlock, OverlapPatchEmbed, PatchExpand, SkipCrossAttention, tokens_to_image


class EncoderStage(nn.Module):
    """Overlapping patch embedding (or merging), dual blocks, LayerNorm."""

    def __init__(self, in_channels: int, dim: int, depth: int, kernel: int, stride: int, cfg: DAEFormerConfig) -> None:
        super().__init__()
        self.embed = OverlapPatchEmbed(in_channels, dim, kernel, stride)
        self.blocks = nn.ModuleList(DualTransformerBlock(dim, cfg.mlp_ratio, cfg.channel_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, HW]:
        x, hw = self.embed(x)                                  # (B, C, H, W) -> (B, N, dim)
        for block in self.blocks:
            x = block(x, hw)
        return self.norm(x), hw


class DecoderStage(nn.Module):
    """Project the upsampled feature to the skip width, fuse with SCCA, dual blocks, expand."""

    def __init__(self, in_dim: int, dim: int, depth: int, expand: PatchExpand, cfg: DAEFormerConfig) -> None:
        super().__init__()
        self.in_proj = nn.Linear(in_dim, dim)
        self.fuse = SkipCrossAttention(dim)
        self.out_proj = nn.Linear(2 * dim, dim)
        self.blocks = nn.ModuleList(DualTransformerBlock(dim, cfg.mlp_ratio, cfg.channel_heads) for _ in range(depth))
        self.expand = expand

    def decode(self, y: torch.Tensor, skip: torch.Tensor, hw: HW) -> torch.Tensor:
        """(B, N, in_dim) upsampled feature and (B, N, dim) skip -> (B, N, dim), before the expansion."""
        x = self.out_proj(self.fuse(self.in_proj(y), skip, hw))
        for block in self.blocks:
            x = block(x, hw)
        return x

    def forward(self, y: torch.Tensor, skip: torch.Tensor, hw: HW) -> tuple[torch.Tensor, HW]:
        return self.expand(self.decode(y, skip, hw), hw)


class DAEFormer(nn.Module):
    """DAE-Former (Azad et al., arXiv 2212.13504) for any input whose sides are multiples of 16.

    Input (B, in_channels, H, W), output raw logits (B, num_classes, H, W).
    """

    def __init__(self, cfg: DAEFormerConfig | None = None, **kwargs: int) -> None:
        super().__init__()
        cfg = cfg or DAEFormerConfig(**kwargs)
        self.cfg = cfg
        c1, c2, c3 = cfg.embed_dims
        self.encoder = nn.ModuleList([
            EncoderStage(cfg.in_channels, c1, cfg.depths[0], kernel=7, stride=4, cfg=cfg),  # 1/4
            EncoderStage(c1, c2, cfg.depths[1], kernel=3, stride=2, cfg=cfg),               # 1/8
            EncoderStage(c2, c3, cfg.depths[2], kernel=3, stride=2, cfg=cfg),               # 1/16
        ])
        self.bottleneck_expand = PatchExpand(c3, c3 // 2, scale=2)                          # 1/16 -> 1/8
        self.decoder = nn.ModuleList([
            DecoderStage(c3 // 2, c2, cfg.decoder_depths[0], PatchExpand(c2, c2 // 2, scale=2), cfg),  # -> 1/4
            DecoderStage(c2 // 2, c1, cfg.decoder_depths[1], PatchExpand(c1, c1, scale=4), cfg),       # -> 1/1
        ])
        self.head = nn.Linear(c1, cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Decoder and head: Xavier-uniform weights, zero biases, LayerNorm 1/0 (encoder: PyTorch defaults)."""
        for part in (self.bottleneck_expand, self.decoder, self.head):
            for m in part.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if C != self.cfg.in_channels:
            raise ValueError(f"expected {self.cfg.in_channels} input channel(s), got {C} (input shape {tuple(x.shape)})")
        if H % SIZE_MULTIPLE or W % SIZE_MULTIPLE:
            raise ValueError(f"input height and width must be multiples of {SIZE_MULTIPLE}, got {H}x{W}")
        skips: list[tuple[torch.Tensor, HW]] = []
        for stage in self.encoder:
            tokens, hw = stage(x)                              # (B, N_i, C_i)
            skips.append((tokens, hw))
            x = tokens_to_image(tokens, hw)
        y, _ = self.bottleneck_expand(*skips[2])               # (B, N_2, C3/2)
        y, _ = self.decoder[0](y, *skips[1])                   # (B, N_1, C2/2)
        y = self.decoder[1].decode(y, *skips[0])               # (B, N_0, C1)
        return self.decoder[1].expand.to_image(y, skips[0][1], self.head)     # (B, num_classes, H, W)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
