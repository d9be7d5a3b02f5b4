"""Intensity preprocessing as data: stored in checkpoints and applied identically in training and inference."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch

from napari_daeformer.base.errors import InvalidValue, short_repr

# CT windows as (lower, upper) HU. "abdomen" is the paper's (TransUNet's) [-125, 275].
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (-125.0, 275.0),
    "soft tissue": (-160.0, 240.0),   # level 40, width 400
    "liver": (-15.0, 135.0),          # level 60, width 150
    "lung": (-1350.0, 150.0),         # level -600, width 1500
    "bone": (-500.0, 1300.0),         # level 400, width 1800
    "brain": (0.0, 80.0),             # level 40, width 80
}


KINDS = ("ct", "rgb", "zscore")
ZSCORE_PERCENTILES = (0.5, 99.5)          # nnU-Net's clip for intensities without units


@dataclass(frozen=True)
class Preprocessing:
    """How raw intensities become network input.

    `kind="ct"`: clip HU to `window`, scale to [0, 1], then `(x - mean) / std` (paper: 0.5 / 0.5).
    `kind="rgb"`: scale by `1 / max_value` to [0, 1], then `(x - mean) / std` per channel.
    `kind="zscore"` (MR and other images without calibrated units, nnU-Net's scheme): per image, clip to the
    `percentiles` of its foreground, then subtract the clipped foreground's mean and divide by its std. The card
    stores only the percentiles; `for_image` measures an image and returns the concrete normalisation (window =
    the clip range, mean, std) that `apply` uses.
    """

    kind: Literal["ct", "rgb", "zscore"] = "ct"
    window: tuple[float, float] | None = CT_WINDOWS["abdomen"]
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    percentiles: tuple[float, float] = ZSCORE_PERCENTILES

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidValue(f"unknown preprocessing kind {short_repr(self.kind)}; expected one of {', '.join(KINDS)}")
        lo, hi = self.percentiles if len(self.percentiles) == 2 else (math.nan, math.nan)
        if not (_finite(self.percentiles) and 0 <= lo < hi <= 100):
            raise InvalidValue(f"z-score percentiles need 0 <= lower < upper <= 100, got {short_repr(self.percentiles)}")
        if self.kind == "zscore" and self.window is not None and not _is_range(self.window):
            raise InvalidValue(f"a fitted z-score clip range needs finite (lower, upper), got {short_repr(self.window)}")
        if self.kind == "ct" and (self.window is None or not _is_range(self.window)):
            raise InvalidValue(f"CT window needs finite (lower, upper) HU with upper > lower, got {short_repr(self.window)}")
        if (len(self.mean) != self.channels or len(self.std) != self.channels or not _finite(self.mean + self.std)
                or not all(s > 1e-6 for s in self.std)):
            raise InvalidValue(f"mean {short_repr(self.mean)} and std {short_repr(self.std)} need {self.channels} finite "
                             "value(s) each and std > 0")

    @property
    def channels(self) -> int:
        return 3 if self.kind == "rgb" else 1

    def describe(self) -> str:
        """One line for the user: which normalisation this is."""
        if self.kind == "ct":
            return f"CT window {self.window[0]:.0f}..{self.window[1]:.0f} HU"  # type: ignore[index]
        if self.kind == "rgb":
            if self.mean == (0.5,) * 3 and self.std == (0.5,) * 3:
                return "RGB, scaled to [-1, 1]"
            return ("RGB, per channel (x - mean) / std, mean " + "/".join(f"{v:.3f}" for v in self.mean)
                    + ", std " + "/".join(f"{v:.3f}" for v in self.std))
        return f"per-image z-score after clipping to the {self.percentiles[0]:g}-{self.percentiles[1]:g}th percentiles"

    def for_image(self, image: np.ndarray) -> Preprocessing:
        """The normalisation to apply to `image` (the whole volume or photo): itself for CT and RGB; for z-score,
        the clip range and statistics of this image's foreground (voxels above its minimum; all voxels if under
        1 % are), measured on at most about 2 million voxels."""
        if self.kind != "zscore":
            return self
        flat = np.asarray(image).ravel()
        flat = flat[:: max(1, flat.size // 2_000_000)].astype(np.float64)
        foreground = flat[flat > flat.min()] if flat.size else flat
        if foreground.size < 0.01 * flat.size or foreground.size == 0:
            foreground = flat
        lo, hi = (float(v) for v in np.percentile(foreground, self.percentiles))
        hi = hi if hi > lo else lo + 1.0
        clipped = np.clip(foreground, lo, hi)
        std = float(clipped.std())
        return replace(self, window=(lo, hi), mean=(float(clipped.mean()),), std=(std if std > 1e-6 else 1.0,))

    def with_window(self, window: tuple[float, float]) -> Preprocessing:
        """The same preprocessing with another CT window (user override)."""
        if self.kind != "ct":
            raise InvalidValue("a CT window applies to CT preprocessing only")
        return Preprocessing(self.kind, (float(window[0]), float(window[1])), self.mean, self.std)

    def apply(self, image: np.ndarray, max_value: float = 255.0) -> np.ndarray:
        """Normalise intensities.

        Args:
            image: CT (..., Y, X) in HU, or RGB (..., Y, X, 3).
            max_value: the white level of an RGB image (255 for uint8, 65535 for uint16).
        Returns:
            float32 array of the same shape.
        """
        x = np.asarray(image, dtype=np.float32)
        if self.kind == "zscore":
            lo, hi = self._clip_range()
            x = np.clip(x, lo, hi)
        elif self.kind == "ct" and self.window is not None:
            lo, hi = self.window
            x = (np.clip(x, lo, hi) - lo) / (hi - lo)
        else:
            x = x / np.float32(max_value)
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return (x - mean) / std

    def apply_tensor(self, image: torch.Tensor, max_value: float = 255.0) -> torch.Tensor:
        """`apply` on a tensor, on its device (the engine normalises on the GPU); same arithmetic in float32."""
        x = image.float()
        if self.kind == "zscore":
            lo, hi = self._clip_range()
            x = x.clamp(lo, hi)
        elif self.kind == "ct" and self.window is not None:
            lo, hi = self.window
            x = (x.clamp(lo, hi) - lo) / (hi - lo)
        else:
            x = x / max_value
        # Built on the host and sent without waiting: a tensor made on a GPU from a list would make the host wait for
        # the whole stream, which stops the next batch from overlapping the current one.
        mean = torch.tensor(self.mean, dtype=torch.float32).to(x.device, non_blocking=True)
        std = torch.tensor(self.std, dtype=torch.float32).to(x.device, non_blocking=True)
        return (x - mean) / std

    def _clip_range(self) -> tuple[float, float]:
        if self.window is None:
            raise ValueError("z-score normalisation is measured per image: call for_image(image) first")
        return self.window

    def to_dict(self) -> dict[str, Any]:
        window = None if self.window is None else list(self.window)
        data = {"kind": self.kind, "window": window, "mean": list(self.mean), "std": list(self.std)}
        return {**data, "percentiles": list(self.percentiles)} if self.kind == "zscore" else data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of `to_dict`; ValueError for a malformed mapping."""
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("mean", "std")):
            raise InvalidValue(f"preprocessing must be a mapping with mean and std lists, got {short_repr(data)}")
        window = data.get("window")
        if window is not None and not isinstance(window, list):
            raise InvalidValue(f"preprocessing window must be a list, got {short_repr(window)}")
        percentiles = data.get("percentiles", list(ZSCORE_PERCENTILES))
        if not isinstance(percentiles, list):
            raise InvalidValue(f"preprocessing percentiles must be a list, got {short_repr(percentiles)}")
        return cls(data.get("kind"), None if window is None else tuple(window), tuple(data["mean"]),  # type: ignore[arg-type]
                   tuple(data["std"]), tuple(percentiles))  # type: ignore[arg-type]


def _is_range(window: tuple[float, ...]) -> bool:
    """Two finite numbers, the second larger."""
    return len(window) == 2 and _finite(window) and window[1] > window[0]


def _finite(values: tuple[object, ...]) -> bool:
    """Every value a real finite number (bools and strings are not)."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def ct_preprocessing(window: str | tuple[float, float] = "abdomen") -> Preprocessing:
    """CT preprocessing with a named window (see CT_WINDOWS) or explicit (lower, upper) HU."""
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise InvalidValue(f"unknown CT window {window!r}; choose one of {sorted(CT_WINDOWS)}")
        window = CT_WINDOWS[window]
    return Preprocessing("ct", (float(window[0]), float(window[1])), (0.5,), (0.5,))


def zscore_preprocessing(percentiles: tuple[float, float] = ZSCORE_PERCENTILES) -> Preprocessing:
    """Per-image z-score (MR, microscopy, any uncalibrated intensities): see `Preprocessing`."""
    return Preprocessing("zscore", None, (0.0,), (1.0,), percentiles)


def rgb_preprocessing() -> Preprocessing:
    """RGB preprocessing: [0, 1] then (x - 0.5) / 0.5 per channel, as the paper scales its input."""
    return Preprocessing("rgb", None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
