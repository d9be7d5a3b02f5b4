"""DAE-Former hyper-parameters as a frozen dataclass, stored verbatim in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from napari_daeformer.base.errors import InvalidValue, short_repr

# Token-grid reductions: stride 4 (stage 1), then 2 and 2 (stages 2 and 3).
SIZE_MULTIPLE = 16

# Bounds on every field (the paper uses 9 classes, widths up to 512, 2 blocks a stage): a configuration read from
# a file is checked against them before any module is built, so no file can ask for gigabytes or hours.
BOUNDS: dict[str, tuple[int, int]] = {
    "num_classes": (1, 1024), "in_channels": (1, 16), "embed_dims": (1, 2048), "depths": (1, 32),
    "decoder_depths": (1, 32), "mlp_ratio": (1, 16), "channel_heads": (1, 64),
}
_LENGTHS = {"embed_dims": 3, "depths": 3, "decoder_depths": 2}


def check_int(name: str, value: object, lo: int, hi: int) -> int:
    """`value` if it is an integer (not a bool) in lo..hi, else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(f"{name} must be an integer, got {short_repr(value)}")
    if not lo <= value <= hi:
        raise InvalidValue(f"{name}={short_repr(value)} is outside {lo}..{hi}")
    return value


@dataclass(frozen=True)
class DAEFormerConfig:
    """Architecture of one DAE-Former.

    Args:
        num_classes: output channels (Synapse: 9 = background + 8 organs).
        in_channels: 1 for CT, 3 for RGB photos.
        embed_dims: token widths of encoder stages 1-3 (paper: 128, 320, 512).
        depths: dual transformer blocks per encoder stage (paper: 2, 2, 2).
        decoder_depths: dual blocks in the decoder stages at 1/8 and 1/4 resolution (paper: 2, 2).
        mlp_ratio: hidden width of the Mix-FFN in dual blocks, as a multiple of the token width.
        channel_heads: heads of the transposed (channel) attention; efficient attention always has 1.
    """

    num_classes: int = 9
    in_channels: int = 1
    embed_dims: tuple[int, int, int] = (128, 320, 512)
    depths: tuple[int, int, int] = (2, 2, 2)
    decoder_depths: tuple[int, int] = (2, 2)
    mlp_ratio: int = 4
    channel_heads: int = 8

    def __post_init__(self) -> None:
        for name, (lo, hi) in BOUNDS.items():
            value = getattr(self, name)
            if name in _LENGTHS:
                if not isinstance(value, tuple) or len(value) != _LENGTHS[name]:
                    raise InvalidValue(f"{name} needs {_LENGTHS[name]} integers, got {short_repr(value)}")
                for v in value:
                    check_int(name, v, lo, hi)
            else:
                check_int(name, value, lo, hi)
        for dim in self.embed_dims:
            if dim % self.channel_heads:
                raise InvalidValue(f"embed dim {dim} is not divisible by channel_heads={self.channel_heads}")
        c1, c2, c3 = self.embed_dims
        if c3 % 2 or c2 % 2:
            raise InvalidValue(f"embed_dims {self.embed_dims}: stages 2 and 3 need even widths for patch expanding")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DAEFormerConfig:
        """Inverse of `to_dict`; unknown keys are an error, not silently dropped."""
        if not isinstance(data, dict):
            raise InvalidValue(f"a DAE-Former config must be a mapping, got {short_repr(data)}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidValue(f"unknown DAE-Former config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


PRESETS: dict[str, dict[str, Any]] = {
    # What the released official model computes (29.69 M parameters at 9 classes).
    "paper": {"embed_dims": (128, 320, 512), "depths": (2, 2, 2), "decoder_depths": (2, 2)},
    # CPU demos and tests: same topology, about 1/20 of the parameters.
    "small": {"embed_dims": (32, 64, 128), "depths": (2, 2, 2), "decoder_depths": (1, 1)},
}


def named_config(name: str, **overrides: Any) -> DAEFormerConfig:
    """`named_config("paper", num_classes=9, in_channels=1)`; raises ValueError for an unknown name."""
    if name not in PRESETS:
        raise InvalidValue(f"unknown configuration {name!r}; choose one of {sorted(PRESETS)}")
    return DAEFormerConfig(**{**PRESETS[name], **overrides})
