"""A learnt intensity scale and shift per input channel in front of the network (`InputCalibration`), or the
identity where a run does not calibrate (`NoCalibration`): both give the runner the same four calls."""

from __future__ import annotations

from dataclasses import replace

import torch

from napari_daeformer.base.errors import TrainingError
from napari_daeformer.model import DAEFormer
from napari_daeformer.model.preprocessing import Preprocessing


class NoCalibration(torch.nn.Module):
    """The network as it is: its input normalised with the parent's own preprocessing, nothing folded in."""

    def __init__(self, net: DAEFormer) -> None:
        super().__init__()
        self.net = net

    @property
    def encoder(self) -> torch.nn.ModuleList:
        return self.net.encoder

    def input_preprocessing(self, prep: Preprocessing) -> Preprocessing:
        return prep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def folded(self, prep: Preprocessing) -> Preprocessing:
        return prep


def calibrated(net: DAEFormer, prep: Preprocessing, calibrate: bool) -> InputCalibration | NoCalibration:
    """`net` behind a calibration where asked for and the input has a fixed scale (CT and RGB, not z-score)."""
    return InputCalibration(net, prep) if calibrate and prep.kind != "zscore" else NoCalibration(net)


class InputCalibration(torch.nn.Module):
    """The network behind a learnt intensity scale and shift per input channel, starting as the identity.

    A scanner's HU offset or contrast, or a camera's colour cast, is an affine change of the input: these few
    parameters undo it directly, at a higher learning rate than the network's and outside the pull to the parent,
    while the weights fix what no affine map can. CT is calibrated before the window's clip (an offset moves what the
    window cuts off): the wrapper takes HU in window units, unclipped (`input_preprocessing`), and clips after the
    calibration. `folded` writes the calibration into the preprocessing (CT: a moved and scaled window; RGB: the
    mean and std), so the saved network has the parent's keys and the engine needs nothing new.
    """

    SPAN = 3.0          # CT input: window widths beyond the window on either side (abdomen: -1325..1475 HU)

    def __init__(self, net: DAEFormer, prep: Preprocessing) -> None:
        super().__init__()
        if prep.kind == "zscore":
            raise TrainingError("per-image z-score normalisation has no fixed scale to calibrate")
        self.net, self.window = net, prep.kind == "ct"
        self.log_scale = torch.nn.Parameter(torch.zeros(prep.channels))
        self.shift = torch.nn.Parameter(torch.zeros(prep.channels))
        self.clip = (-prep.mean[0] / prep.std[0], (1 - prep.mean[0]) / prep.std[0])    # the window's ends, normalised

    @property
    def encoder(self) -> torch.nn.ModuleList:
        return self.net.encoder

    def input_preprocessing(self, prep: Preprocessing) -> Preprocessing:
        """What the wrapper's input is normalised with: CT as the network's own inside the window and, unclipped,
        SPAN widths beyond it; RGB as the network's own."""
        if not self.window:
            return prep
        (lo, hi), k, m, s = prep.window, self.SPAN, prep.mean[0], prep.std[0]  # type: ignore[misc]
        return replace(prep, window=(lo - k * (hi - lo), hi + k * (hi - lo)), mean=((k + m) / (2 * k + 1),),
                       std=(s / (2 * k + 1),))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) input as `input_preprocessing` gives it -> (B, classes, H, W) logits."""
        y = x * self.log_scale.exp()[:, None, None] + self.shift[:, None, None]
        return self.net(y.clamp(*self.clip) if self.window else y)

    def folded(self, prep: Preprocessing) -> Preprocessing:
        """`prep` followed by this calibration. RGB: `a (x - m) / s + b == (x - (m - b s / a)) / (s / a)`. CT, in
        window units `u = (x - lo) / w`: the calibration is `u' = a u + c` with `c = m (1 - a) + b s`, clipped to
        [0, 1]: the window `lo' = lo - c w / a`, `w' = w / a`."""
        a, b = self.log_scale.detach().exp().double().tolist(), self.shift.detach().double().tolist()
        if self.window:
            (lo, hi), m, s = prep.window, prep.mean[0], prep.std[0]  # type: ignore[misc]
            c = m * (1 - a[0]) + b[0] * s
            start = lo - c * (hi - lo) / a[0]
            return replace(prep, window=(start, start + (hi - lo) / a[0]))
        std = tuple(s / ai for s, ai in zip(prep.std, a))
        return replace(prep, mean=tuple(m - bi * si for m, bi, si in zip(prep.mean, b, std)), std=std)
