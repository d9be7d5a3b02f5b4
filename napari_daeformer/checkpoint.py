"""Checkpoints: weights in safetensors, everything else as JSON in its metadata. Loading runs no pickle."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_write
from .errors import CheckpointError
from .model import DAEFormer, DAEFormerConfig
from .preprocessing import Preprocessing, ct_preprocessing

FORMAT_NAME = "napari-daeformer"
FORMAT_VERSION = 1
_META_KEY = "napari_daeformer"

# The Synapse label mapping (PAPER.md section 4); other projects have got it wrong.
SYNAPSE_CLASSES = ("background", "aorta", "gallbladder", "left kidney", "right kidney", "liver",
                   "pancreas", "spleen", "stomach")

# Distinct colours for up to 16 classes (index 0, background, is transparent in napari).
DEFAULT_COLORS = (
    "#000000", "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0",
    "#f032e6", "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#800000", "#aaffc3",
)


@dataclass(frozen=True)
class ModelCard:
    """What a checkpoint says about its model besides the weights.

    Args:
        config: the architecture.
        class_names: one name per output class, background first.
        class_colors: "#rrggbb" per class.
        input_size: (H, W) the network was trained at; slices are resized to it.
        preprocessing: intensity normalisation applied before the network.
        provenance: free-form JSON (training data, steps, parent checkpoint, scores).
    """

    config: DAEFormerConfig
    class_names: tuple[str, ...]
    class_colors: tuple[str, ...] = ()
    input_size: tuple[int, int] = (224, 224)
    preprocessing: Preprocessing = field(default_factory=ct_preprocessing)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.config.num_classes
        if len(self.class_names) != n:
            raise ValueError(f"{len(self.class_names)} class names for {n} classes")
        if not self.class_colors:
            colors = tuple(DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(n))
            object.__setattr__(self, "class_colors", colors)
        if len(self.class_colors) != n:
            raise ValueError(f"{len(self.class_colors)} class colours for {n} classes")
        if self.preprocessing.channels != self.config.in_channels:
            raise ValueError(f"{self.preprocessing.kind} preprocessing gives {self.preprocessing.channels} "
                             f"channel(s) but the model takes {self.config.in_channels}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "class_names": list(self.class_names),
            "class_colors": list(self.class_colors),
            "in_channels": self.config.in_channels,
            "input_size": list(self.input_size),
            "preprocessing": self.preprocessing.to_dict(),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        return cls(
            config=DAEFormerConfig.from_dict(data["config"]),
            class_names=tuple(data["class_names"]),
            class_colors=tuple(data["class_colors"]),
            input_size=(int(data["input_size"][0]), int(data["input_size"][1])),
            preprocessing=Preprocessing.from_dict(data["preprocessing"]),
            provenance=dict(data.get("provenance", {})),
        )

    def with_provenance(self, **items: Any) -> ModelCard:
        return replace(self, provenance={**self.provenance, **items})


@dataclass
class Checkpoint:
    """A model ready to run, with its card and where it came from."""

    model: DAEFormer
    card: ModelCard
    path: Path | None = None


def save_checkpoint(path: str | os.PathLike[str], model: DAEFormer, card: ModelCard, *,
                    dtype: torch.dtype = torch.float32, overwrite: bool = True) -> Path:
    """Write `model`'s weights and `card` to `path` atomically (temp file + rename).

    Args:
        dtype: storage precision of floating-point tensors (float16 halves the size of a bundled model).
        overwrite: refuse to replace an existing file when False.
    """
    if model.cfg != card.config:
        raise CheckpointError(f"model configuration {model.cfg} differs from the card's {card.config}")
    tensors = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
               for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT_NAME, _META_KEY: json.dumps(card.to_dict())}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read only the metadata of a checkpoint (fast: the weights are not loaded)."""
    return _open(Path(path))[0]


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint written by `save_checkpoint`, without unpickling anything.

    Raises:
        CheckpointError: the file is missing, empty, truncated, a pickle, a foreign safetensors file,
            from a newer format, or its tensors do not match its configuration.
    """
    path = Path(path)
    card, tensors = _open(path, with_tensors=True)
    model = DAEFormer(card.config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
        raise CheckpointError(f"{path.name}: weights do not match the configuration stored in the file ({detail})")
    model.load_state_dict(tensors)
    return Checkpoint(model.to(device).eval(), card, path)


def _open(path: Path, with_tensors: bool = False) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path.name}: file is empty or truncated ({path.stat().st_size} bytes)")
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        raise CheckpointError(f"{path.name}: this is a pickled PyTorch file, which is never loaded here; "
                              "if it holds official DAE-Former weights, convert it with `daeformer import-official`")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if _META_KEY not in metadata:
                raise CheckpointError(f"{path.name}: a safetensors file without napari-daeformer metadata "
                                      "(not a napari-daeformer checkpoint)")
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
    except SafetensorError as e:
        raise CheckpointError(f"{path.name}: not a readable safetensors checkpoint, truncated or corrupt ({e})") from e
    try:
        data = json.loads(metadata[_META_KEY])
        version = int(data["format_version"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path.name}: checkpoint metadata is unreadable ({e})") from e
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path.name}: format version {version} is newer than this napari-daeformer "
                              f"understands ({FORMAT_VERSION}); update the plugin")
    try:
        card = ModelCard.from_dict(data)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path.name}: checkpoint metadata is invalid ({e})") from e
    return card, tensors
