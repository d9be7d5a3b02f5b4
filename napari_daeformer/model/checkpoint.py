"""Checkpoints: weights in safetensors, everything else as JSON in its metadata. Loading runs no pickle."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from napari_daeformer.base.atomic import atomic_write
from napari_daeformer.base.errors import CheckpointError, InvalidValue, short_repr
from napari_daeformer.base.memory import check_allocation
from napari_daeformer.model import SIZE_MULTIPLE, DAEFormer, DAEFormerConfig
from napari_daeformer.model.config import check_int
from napari_daeformer.model.preprocessing import Preprocessing, ct_preprocessing

FORMAT_NAME = "napari-daeformer"
FORMAT_VERSION = 1
_META_KEY = "napari_daeformer"
MAX_METADATA_CHARS = 4_000_000            # a card with long provenance is a few kB
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_COLOR = re.compile(r"#[0-9a-fA-F]{6}")
MAX_INPUT_SIDE = 1024    # 4.6x the paper's 224; a crafted 4096 took 20 s and 3.2 GB for one 64x64 slice

# The Synapse label mapping (TransUNet's preprocessed Synapse data, which DAE-Former uses); other projects have got it wrong.
SYNAPSE_CLASSES = ("background", "aorta", "gallbladder", "left kidney", "right kidney", "liver",
                   "pancreas", "spleen", "stomach")

# Distinct colours for up to 16 classes (index 0, background, is transparent in napari).
DEFAULT_COLORS = (
    "#000000", "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0",
    "#f032e6", "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#800000", "#aaffc3",
)



MAX_WEIGHT = 0.45          # each neighbour's share below a half: the slice itself always counts


def check_weight(value: object) -> float:
    """`value` as a neighbour weight in [0, MAX_WEIGHT] (InvalidValue, a ValueError, otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= MAX_WEIGHT:
        raise InvalidValue(f"the neighbour weight must be a number from 0 to {MAX_WEIGHT}, got {value!r}")
    return float(value)

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
        neighbour_weight: each neighbouring slice's share of a slice's softmax at inference (0: none;
            `neighbours`); a new model taught on a volume sets it (`training.recipes.TEACH`).
    """

    config: DAEFormerConfig
    class_names: tuple[str, ...]
    class_colors: tuple[str, ...] = ()
    input_size: tuple[int, int] = (224, 224)
    preprocessing: Preprocessing = field(default_factory=ct_preprocessing)
    provenance: dict[str, Any] = field(default_factory=dict)
    neighbour_weight: float = 0.0

    def __post_init__(self) -> None:
        n = self.config.num_classes
        check_class_names(self.class_names)
        if len(self.class_names) != n:
            raise InvalidValue(f"{len(self.class_names)} class names for {n} classes")
        if not self.class_colors:
            colors = tuple(DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(n))
            object.__setattr__(self, "class_colors", colors)
        if len(self.class_colors) != n:
            raise InvalidValue(f"{len(self.class_colors)} class colours for {n} classes")
        check_weight(self.neighbour_weight)
        if self.preprocessing.channels != self.config.in_channels:
            raise InvalidValue(f"{self.preprocessing.kind} preprocessing gives {self.preprocessing.channels} "
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
            "neighbour_weight": self.neighbour_weight,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """Inverse of `to_dict`; every field's type and bounds checked (ValueError), nothing built before."""
        names, colors, size = data.get("class_names"), data.get("class_colors", []), data.get("input_size")
        if not isinstance(names, list):
            raise InvalidValue(f"class_names must be a list of short printable names, got {short_repr(names)}")
        if not isinstance(colors, list) or not all(isinstance(c, str) and _COLOR.fullmatch(c) for c in colors):
            raise InvalidValue(f"class_colors must be a list of '#rrggbb', got {short_repr(colors)}")
        if not isinstance(size, list) or len(size) != 2:
            raise InvalidValue(f"input_size must be [height, width], got {short_repr(size)}")
        for side in size:
            if check_int("input_size", side, SIZE_MULTIPLE, MAX_INPUT_SIDE) % SIZE_MULTIPLE:
                raise InvalidValue(f"input_size {size} must be multiples of {SIZE_MULTIPLE}")
        provenance = data.get("provenance", {})
        if not isinstance(provenance, dict):
            raise InvalidValue(f"provenance must be a mapping, got {short_repr(provenance)}")
        return cls(
            config=DAEFormerConfig.from_dict(data.get("config")),  # type: ignore[arg-type]
            class_names=tuple(names),
            class_colors=tuple(colors),
            input_size=(size[0], size[1]),
            preprocessing=Preprocessing.from_dict(data.get("preprocessing")),  # type: ignore[arg-type]
            provenance=provenance,
            neighbour_weight=check_weight(data.get("neighbour_weight", 0.0)),
        )

    def with_provenance(self, **items: Any) -> ModelCard:
        return replace(self, provenance={**self.provenance, **items})


def check_class_names(names: Sequence[object]) -> None:
    """Refuse (ValueError) class names a checkpoint cannot carry: empty, over 80 characters, unprintable."""
    bad = [n for n in names if not (isinstance(n, str) and 0 < len(n) <= 80 and n.isprintable())]
    if bad:
        raise InvalidValue(f"class names must be short printable names, got {short_repr(bad[0])} "
                         f"in {short_repr(list(names))}")


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
    damaged = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if damaged:
        raise CheckpointError(f"{Path(path).name}: not written: weight {damaged[0]} holds NaN or infinite values "
                              f"({len(damaged)} tensor(s)), so no run could use it")
    metadata = {"format": FORMAT_NAME, _META_KEY: json.dumps(card.to_dict())}
    try:
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=overwrite)
    except (SafetensorError, OSError) as e:                  # disk full, quota, read-only: nothing was replaced
        reason = getattr(e, "strerror", None) or _io_reason(str(e))
        raise CheckpointError(f"{Path(path).name}: not written ({reason}); an earlier file of that name, if any, "
                              "is unchanged") from e


def _io_reason(text: str) -> str:
    """The OS's words inside safetensors' "IoError(Os { code: 28, ..., message: \"No space left on device\" })"."""
    found = re.search(r'message: "([^"]*)"', text)
    return found.group(1) if found else text.strip().splitlines()[0][:120] if text.strip() else "an I/O error"


def save_or_rescue(path: str | os.PathLike[str], model: DAEFormer, card: ModelCard, *, overwrite: bool = True
                   ) -> Path:
    """`save_checkpoint`, and where that fails after the training (a full disk), the model is written to the
    temporary folder instead so that the minutes of training are not lost; the error then names where it is.

    Raises:
        CheckpointError: `path` could not be written (naming the rescued copy, when there is one).
    """
    try:
        return save_checkpoint(path, model, card, overwrite=overwrite)
    except CheckpointError as e:
        if not isinstance(e.__cause__, (SafetensorError, OSError)):
            raise
        rescue = Path(tempfile.gettempdir()) / f"daeformer-rescued-{os.getpid()}-{Path(path).name}"
        try:
            save_checkpoint(rescue, model, card, overwrite=False)
        except CheckpointError:
            raise CheckpointError(f"{e}; the trained model could not be kept anywhere: free some space and run "
                                  "again") from e
        raise CheckpointError(f"{e}; the trained model was saved to {rescue} instead: move it where you want "
                              "it") from e


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes: names a checkpoint version in outputs and provenance."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read only the metadata of a checkpoint (fast: the weights are not loaded). Raises CheckpointError only."""
    path = Path(path)
    with _as_checkpoint_error(path, "read"), _open(path) as (card, _):
        return card


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint written by `save_checkpoint`, without unpickling anything.

    Every metadata field is checked (types, bounds) and the tensors' names, shapes and dtypes are compared with the
    configuration before any weight is read; the model is built on the meta device and takes the file's tensors,
    so memory is the file's size, whatever its configuration claims.

    Raises:
        CheckpointError: the file is missing, not a regular file, empty, truncated, a pickle, a foreign safetensors
            file, from a newer format, its metadata is invalid, or its tensors do not match its configuration,
            are not floating point, or are not finite. Nothing else escapes, whatever the bytes.
    """
    path = Path(path)
    with _as_checkpoint_error(path, "loaded"), _open(path) as (card, f):
        with torch.device("meta"):
            model = DAEFormer(card.config)                   # shapes only: nothing allocated yet
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        slices = {k: f.get_slice(k) for k in f.keys()}
        declared = {k: (tuple(t.get_shape()), t.get_dtype()) for k, t in slices.items()}
        missing = sorted(set(expected) - set(declared))
        unexpected = sorted(set(declared) - set(expected))
        wrong = [k for k in expected if k in declared and declared[k][0] != expected[k]]
        if missing or unexpected or wrong:
            detail = "; ".join(
                f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
            raise CheckpointError(f"{path.name}: weights do not match the configuration stored in the file ({detail})")
        odd = sorted({dtype for _, dtype in declared.values()} - _FLOAT_DTYPES)
        if odd:
            raise CheckpointError(f"{path.name}: weights must be floating point, found {', '.join(odd)} tensors")
        numel = sum(math.prod(shape) for shape, _ in declared.values())
        check_allocation(path.name, numel * 4 * 2, "loading the weights", CheckpointError)
        tensors = {}
        for k in expected:
            t = f.get_tensor(k).to(torch.float32)
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{path.name}: weight {k} holds NaN or infinite values; the file is damaged "
                                      "(or training diverged): use an earlier checkpoint")
            tensors[k] = t
        model.load_state_dict(tensors, assign=True)
        return Checkpoint(model.to(device).eval(), card, path)


def _sniff(path: Path) -> None:
    """Refuse anything that is not a safetensors file by what its first bytes are (never by one byte alone:
    a safetensors file starts with its header length, whose low byte can be anything, 0x80 included)."""
    try:
        info = path.stat()
    except OSError as e:
        raise CheckpointError(f"{path}: no such checkpoint file") from e
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (a device, pipe or socket)"
        raise CheckpointError(f"{path}: {kind}; give a .safetensors checkpoint file")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise CheckpointError(f"{path.name}: file is empty or truncated ({info.st_size} bytes)")
    header_len = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and 8 + header_len <= info.st_size:
        return
    if head.startswith(b"PK\x03\x04") or (head[0] == 0x80 and 2 <= head[1] <= 5):   # zip (torch.save) or pickle
        raise CheckpointError(f"{path.name}: this is a pickled PyTorch file, which is never loaded here; "
                              "if it holds official DAE-Former weights, convert it with `daeformer import-official`")
    if head[8:9] == b"{":
        raise CheckpointError(f"{path.name}: file is truncated (the header alone claims {header_len:,} bytes, the file "
                              f"has {info.st_size:,})")
    raise CheckpointError(f"{path.name}: not a readable safetensors checkpoint, truncated or corrupt")


@contextlib.contextmanager
def _as_checkpoint_error(path: Path, verb: str) -> Iterator[None]:
    """Whatever the bytes made a library raise, the caller sees one CheckpointError line."""
    try:
        yield
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, MemoryError, RecursionError) as e:
        raise CheckpointError(f"{path.name}: cannot be {verb} ({short_repr(str(e), 120)})") from e


@contextlib.contextmanager
def _open(path: Path) -> Iterator[tuple[ModelCard, Any]]:
    """The checked card and the open safetensors file (tensors not read), closed on leaving."""
    _sniff(path)
    try:
        f = safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise CheckpointError(f"{path.name}: not a readable safetensors checkpoint, truncated or corrupt "
                              f"({short_repr(str(e), 120)})") from e
    with f:
        yield _card_from_metadata(path, f.metadata() or {}), f


def _card_from_metadata(path: Path, metadata: dict[str, str]) -> ModelCard:
    if _META_KEY not in metadata:
        raise CheckpointError(f"{path.name}: a safetensors file without napari-daeformer metadata "
                              "(not a napari-daeformer checkpoint)")
    text = metadata[_META_KEY]
    if len(text) > MAX_METADATA_CHARS:
        raise CheckpointError(f"{path.name}: checkpoint metadata is {len(text):,} characters, more than a "
                              f"checkpoint ever needs ({MAX_METADATA_CHARS:,}); refusing to parse it")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path.name}: checkpoint metadata is not valid JSON ({short_repr(str(e), 80)})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name}: checkpoint metadata must be a JSON object, got {type(data).__name__}")
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path.name}: checkpoint metadata is invalid (format_version "
                              f"{short_repr(version)} is not a positive integer)")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path.name}: format version {short_repr(version)} is newer than this napari-daeformer "
                              f"understands ({FORMAT_VERSION}); update the plugin")
    try:
        return ModelCard.from_dict(data)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{path.name}: checkpoint metadata is invalid ({short_repr(str(e), 120)})") from e
