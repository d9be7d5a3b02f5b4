"""The benchmarks' "official model" computes our model's function: its speed is a fair baseline for ours."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from napari_daeformer.model import DAEFormer

from .conftest import TINY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _official_layout import official_forward  # noqa: E402


def test_official_layout_computes_our_logits() -> None:
    torch.manual_seed(0)
    model = DAEFormer(TINY).eval()
    x = torch.randn(2, TINY.in_channels, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(official_forward(model)(x), model(x), rtol=1e-4, atol=1e-4)
