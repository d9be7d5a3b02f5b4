"""Batch augmentation on the training device: the official family (flips, rotation, scale, shear,
translation, local warps, contrast, blur, noise), with noise on the right scale for [-1, 1] inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges. Flips are off for classes with a side (left/right kidney)."""

    p_flip: float = 0.5
    p_affine: float = 0.5
    rotation_deg: float = 40.0
    scale: tuple[float, float] = (0.7, 1.4)
    shear_deg: float = 16.0
    translate: float = 0.2
    p_warp: float = 0.2              # local warp: the official piecewise-affine augmenter, piecewise bilinear here
    warp_magnitude: float = 0.03     # control-point displacement as a fraction of the image side
    warp_grid: int = 4               # control points per side
    p_contrast: float = 0.3
    contrast: tuple[float, float] = (0.5, 1.5)
    p_blur: float = 0.2
    p_noise: float = 0.3
    noise_std: float = 0.05          # in units of the normalised input (range 2): 2.5% of the range


def augment_batch(image: torch.Tensor, labels: torch.Tensor, cfg: AugmentConfig,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment (B, C, H, W) images and (B, H, W) labels together (geometry) or the image alone (intensity)."""
    B = image.shape[0]
    dev = image.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(dev)

    if cfg.p_flip > 0:
        for dim in (2, 3):
            flip = rand(B) < cfg.p_flip / 2
            image = torch.where(flip[:, None, None, None], image.flip(dim), image)
            labels = torch.where(flip[:, None, None], labels.flip(dim - 1), labels)
    if cfg.p_affine > 0:
        use = rand(B) < cfg.p_affine
        angle = (rand(B) * 2 - 1) * math.radians(cfg.rotation_deg) * use
        lo, hi = math.log(cfg.scale[0]), math.log(cfg.scale[1])
        scale = torch.where(use, torch.exp(lo + rand(B) * (hi - lo)), torch.ones(B, device=dev))
        shear = (rand(B) * 2 - 1) * math.radians(cfg.shear_deg) * use
        shift = (rand(B, 2) * 2 - 1) * 2 * cfg.translate * use[:, None]
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos, -sin + torch.tan(shear), shift[:, 0]], 1),
                             torch.stack([sin, cos, shift[:, 1]], 1)], 1) / scale[:, None, None]
        theta[:, :, 2] *= scale[:, None]                                   # translation is not scaled
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
        labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                               align_corners=False)[:, 0].long()
    if cfg.p_warp > 0:
        use = (rand(B) < cfg.p_warp)[:, None, None, None]
        g = cfg.warp_grid
        control = (rand(B * 2 * g * g).view(B, 2, g, g) * 2 - 1) * 2 * cfg.warp_magnitude * use
        flow = F.interpolate(control, size=image.shape[2:], mode="bilinear", align_corners=True)  # (B, 2, H, W)
        identity = torch.eye(2, 3, device=dev).expand(B, 2, 3)
        grid = F.affine_grid(identity, list(image.shape), align_corners=False) + flow.permute(0, 2, 3, 1)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
        labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                               align_corners=False)[:, 0].long()
    if cfg.p_contrast > 0:
        use = rand(B) < cfg.p_contrast
        factor = torch.where(use, cfg.contrast[0] + rand(B) * (cfg.contrast[1] - cfg.contrast[0]),
                             torch.ones(B, device=dev))[:, None, None, None]
        mean = image.mean((1, 2, 3), keepdim=True)
        image = (image - mean) * factor + mean
    if cfg.p_blur > 0:
        use = (rand(B) < cfg.p_blur)[:, None, None, None]
        k = torch.tensor([0.0545, 0.2442, 0.4026, 0.2442, 0.0545], device=dev)   # Gaussian, sigma = 1
        C = image.shape[1]
        blurred = F.conv2d(F.pad(image, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).repeat(C, 1, 1, 1), groups=C)
        blurred = F.conv2d(F.pad(blurred, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).repeat(C, 1, 1, 1), groups=C)
        image = torch.where(use, blurred, image)
    if cfg.p_noise > 0:
        use = (rand(B) < cfg.p_noise)[:, None, None, None]
        noise = torch.randn(image.shape, generator=generator).to(dev) * cfg.noise_std
        image = image + noise * use
    return image, labels
