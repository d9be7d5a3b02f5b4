"""Convert a state dict of the official DAE-Former code (github.com/xmindflow/DAEFormer) to our model.

Every key the official forward pass uses maps to exactly one of our parameters; the keys it never
uses (the dead `decoder_2` branch and the spare LayerNorms of each Mix-FFN) are dropped and counted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from napari_daeformer.base.errors import CheckpointError, first_line
from napari_daeformer.model import DAEFormer, DAEFormerConfig

# Official keys that the released forward pass never reads.
_UNUSED = (
    re.compile(r"^decoder_2\.(?!layer_up\.)"),        # the bottleneck decoder branch: only its expansion runs
    re.compile(r"\.mlp\d?\.norm[23]\.(weight|bias)$"),  # Mix-FFN norm2/norm3 are built, never called
)

_FFN = [(r"fc1\.", "fc1."), (r"fc2\.", "fc2."), (r"dwconv\.dwconv\.", "dwconv."), (r"norm1\.", "norm.")]
_BLOCK = [
    (r"norm([1-4])\.", r"norm\1."),
    (r"attn\.queries\.", "spatial_attn.query."),
    (r"attn\.keys\.", "spatial_attn.key."),
    (r"attn\.values\.", "spatial_attn.value."),
    (r"attn\.reprojection\.", "spatial_attn.proj."),
    (r"channel_attn\.", "channel_attn."),
    *[(rf"mlp1\.{a}", f"ffn1.{b}") for a, b in _FFN],
    *[(rf"mlp2\.{a}", f"ffn2.{b}") for a, b in _FFN],
]
_SCCA = [
    (r"norm1\.", "norm."),
    (r"attn\.reprojection\.", "proj."),
    (r"attn\.norm\.", "proj_norm."),
    (r"norm2\.", "ffn_norm."),
    *[(rf"mlp\.{a}", f"ffn.{b}") for a, b in _FFN],
]


def _sub(table: list[tuple[str, str]], rest: str) -> str | None:
    for pattern, repl in table:
        new, n = re.subn(rf"^{pattern}", repl, rest)
        if n:
            return new
    return None


def map_official_key(key: str) -> str | None:
    """Our parameter name for an official key the forward pass uses; None if it has no counterpart."""
    if m := re.match(r"^backbone\.patch_embed([123])\.(proj|norm)\.(weight|bias)$", key):
        return f"encoder.{int(m[1]) - 1}.embed.{m[2]}.{m[3]}"
    if m := re.match(r"^backbone\.norm([123])\.(weight|bias)$", key):
        return f"encoder.{int(m[1]) - 1}.norm.{m[2]}"
    if m := re.match(r"^backbone\.block([123])\.(\d+)\.(.+)$", key):
        rest = _sub(_BLOCK, m[3])
        return None if rest is None else f"encoder.{int(m[1]) - 1}.blocks.{m[2]}.{rest}"
    if m := re.match(r"^decoder_2\.layer_up\.(expand|norm)\.(weight|bias)$", key):
        return f"bottleneck_expand.{m[1]}.{m[2]}"
    if m := re.match(r"^decoder_0\.last_layer\.(weight|bias)$", key):
        return f"head.{m[1]}"
    if m := re.match(r"^decoder_([01])\.(.+)$", key):
        stage, rest = f"decoder.{1 - int(m[1])}", m[2]          # official decoder_1 runs first
        for pattern, repl in [(r"x1_linear\.", "in_proj."), (r"concat_linear\.", "out_proj."),
                              (r"layer_up\.", "expand.")]:
            if re.match(pattern, rest):
                return f"{stage}.{re.sub(pattern, repl, rest, count=1)}"
        if sub := re.match(r"^layer_former_([12])\.(.+)$", rest):
            block = _sub(_BLOCK, sub[2])
            return None if block is None else f"{stage}.blocks.{int(sub[1]) - 1}.{block}"
        if sub := re.match(r"^cross_attn\.(.+)$", rest):
            fuse = _sub(_SCCA, sub[1])
            return None if fuse is None else f"{stage}.fuse.{fuse}"
    return None


def is_unused_official_key(key: str) -> bool:
    return any(p.search(key) for p in _UNUSED)


@dataclass(frozen=True)
class ImportReport:
    """What `convert_official_state_dict` did."""

    mapped: int
    dropped_unused: int
    folded_rgb_to_gray: bool


def infer_config(state: dict[str, torch.Tensor], in_channels: int) -> DAEFormerConfig:
    """The architecture of an official state dict, read off its shapes."""
    try:
        dims = tuple(int(state[f"backbone.patch_embed{i}.proj.weight"].shape[0]) for i in (1, 2, 3))
        depths = tuple(len({k.split(".")[2] for k in state if k.startswith(f"backbone.block{i}.")}) for i in (1, 2, 3))
        dec = tuple(len({k.split(".")[1] for k in state if k.startswith(f"decoder_{i}.layer_former_")}) for i in (1, 0))
        num_classes = int(state["decoder_0.last_layer.weight"].shape[0])
        mlp_ratio = int(state["backbone.block1.0.mlp1.fc1.weight"].shape[0]) // dims[0]
        heads = int(state["backbone.block1.0.channel_attn.temperature"].shape[0])
        return DAEFormerConfig(num_classes=num_classes, in_channels=in_channels, embed_dims=dims,  # type: ignore[arg-type]
                               depths=depths, decoder_depths=dec, mlp_ratio=mlp_ratio, channel_heads=heads)  # type: ignore[arg-type]
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"not an official DAE-Former state dict: cannot read its architecture ({e})") from e


def convert_official_state_dict(state: dict[str, torch.Tensor], in_channels: int = 1) -> tuple[DAEFormer, ImportReport]:
    """Build our DAEFormer from an official state dict.

    Args:
        state: official keys -> tensors (a `module.` prefix from DataParallel is removed).
        in_channels: 1 folds the official 1-to-3 channel repeat into the first convolution (sum over
            its input channels), 3 keeps RGB input.
    Raises:
        CheckpointError: a key is missing, unknown, or has a shape our model does not have.
    """
    if in_channels not in (1, 3):
        raise CheckpointError(f"in_channels must be 1 (CT) or 3 (RGB), got {in_channels}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = DAEFormer(infer_config(state, in_channels))
    ours = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    dropped, unknown, wrong = 0, [], []
    for key, value in state.items():
        if is_unused_official_key(key):
            dropped += 1
            continue
        target = map_official_key(key)
        if target is None or target not in ours:
            unknown.append(key)
            continue
        if target in converted:
            raise CheckpointError(f"two official keys map to {target}: the state dict is malformed")
        if target == "encoder.0.embed.proj.weight" and in_channels == 1:
            value = value.sum(dim=1, keepdim=True)              # x.repeat(1, 3, 1, 1) folded into the conv
        if value.dim() == 4 and value.shape[2:] == (1, 1) and ours[target].dim() == 2:
            value = value.flatten(1)                           # 1x1 conv -> Linear
        if value.shape != ours[target].shape:
            wrong.append(f"{key} {tuple(value.shape)} (expected {tuple(ours[target].shape)})")
            continue
        converted[target] = value
    missing = sorted(set(ours) - set(converted))
    if unknown or wrong or missing:
        parts = [f"{what} ({len(items)}): {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                 for what, items in (("unknown keys", unknown), ("wrong shapes", wrong), ("missing", missing))
                 if items]
        raise CheckpointError("not a DAE-Former state dict of a supported shape: " + "; ".join(parts))
    model.load_state_dict(converted)
    return model, ImportReport(len(converted), dropped, in_channels == 1)


def load_official_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read an official `.pth` with `torch.load(weights_only=True)`: tensors only, no arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(f"{path.name}: cannot be read as a tensors-only PyTorch state dict "
                              f"({type(e).__name__}: {first_line(e, '')})") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path.name}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return obj
