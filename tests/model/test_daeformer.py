"""The whole network: shapes, sizes, gradients, determinism, parameter count of the paper configuration."""

from __future__ import annotations

import pytest
import torch

from napari_daeformer.model import DAEFormer, DAEFormerConfig, count_parameters, named_config

from ..conftest import TINY


@pytest.mark.parametrize("size", [224, 512])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_shape(size: int, in_channels: int) -> None:
    model = DAEFormer(named_config("small", num_classes=4, in_channels=in_channels)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 4, size, size)


def test_paper_configuration_forward_and_parameter_count() -> None:
    model = DAEFormer(named_config("paper", num_classes=9, in_channels=3)).eval()
    # 29.69 M: the parameters the released model's forward pass uses (its checkpoint stores a few unused keys).
    assert abs(count_parameters(model) - 29.69e6) / 29.69e6 < 0.005
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 9, 224, 224)


def test_non_square_and_wrong_sizes() -> None:
    model = DAEFormer(TINY).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 96, 160)).shape == (1, 3, 96, 160)
        with pytest.raises(ValueError, match="multiples of 16"):
            model(torch.randn(1, 1, 100, 96))
        with pytest.raises(ValueError, match="input channel"):
            model(torch.randn(1, 3, 64, 64))


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = DAEFormer(TINY).train()
    with torch.no_grad():                       # break the symmetry of the init temperatures/norm weights
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    logits = model(torch.randn(2, 1, 64, 64))
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 3, (2, 64, 64))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_no_layer_depends_on_the_mode() -> None:
    """The network has no dropout, drop-path or batch statistics (the released model has none): training and
    inference compute the same function, so a fine-tuned state scores in eval as it trained. A dropout or BatchNorm
    added to a block makes the two modes differ and fails this."""
    model = DAEFormer(TINY)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        trained_mode = model.train()(x)
        evaluated = model.eval()(x)
    torch.testing.assert_close(trained_mode, evaluated, rtol=0, atol=0)


def test_batch_independence() -> None:
    """No batch statistics: each sample's output is the same alone or in a batch."""
    model = DAEFormer(TINY).eval()
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1:2], model(x[1:2]), rtol=1e-4, atol=1e-5)


def test_config_round_trip_and_validation() -> None:
    cfg = named_config("small", num_classes=2, in_channels=3)
    assert DAEFormerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown configuration"):
        named_config("huge")
    with pytest.raises(ValueError, match="divisible"):
        DAEFormerConfig(embed_dims=(12, 32, 64))
    with pytest.raises(ValueError, match="unknown DAE-Former config keys"):
        DAEFormerConfig.from_dict({**cfg.to_dict(), "dropout": 0.1})


def test_patch_expand_orders_pixels_row_major_and_to_image_matches_its_tokens() -> None:
    """Depth-to-space by hand on a (2, 3) grid at scale 2, and the head-before-move image equal to the tokens."""
    from napari_daeformer.model.layers import PatchExpand, tokens_to_image
    torch.manual_seed(0)
    expand = PatchExpand(4, 3, scale=2).eval()
    x = torch.randn(2, 6, 4)                                          # (B, H*W, dim) on a 2x3 grid
    tokens, hw = expand(x, (2, 3))
    assert hw == (4, 6) and tokens.shape == (2, 24, 3)
    new = expand.norm(expand.expand(x).reshape(2, 2, 3, 2, 2, 3))    # (B, H, W, p1, p2, c)
    for h, w, p1, p2 in ((0, 0, 0, 0), (1, 2, 1, 1), (0, 2, 1, 0), (1, 1, 0, 1)):
        torch.testing.assert_close(tokens[:, (2 * h + p1) * 6 + (2 * w + p2)], new[:, h, w, p1, p2])
    head = torch.nn.Linear(3, 5)
    torch.testing.assert_close(expand.to_image(x, (2, 3), head), tokens_to_image(head(tokens), hw))
