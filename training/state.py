"""Resumable training state in one safetensors file: model weights, optimizer tensors, and JSON metadata.

Written atomically at the end of each epoch; loading unpickles nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from napari_daeformer.base.atomic import atomic_write
from napari_daeformer.base.errors import TrainingError, first_line


def save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> Path:
    """`path` <- model weights (`model.*`), optimizer state tensors (`optim.<param>.<name>`), `meta` as JSON."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in opt["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
    payload = {**meta, "optimizer": {"param_groups": groups, "scalars": scalars}}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"training_state": json.dumps(payload)}))


def load_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore `model` and `optimizer` from `save_state`'s file; returns its metadata."""
    if not path.is_file():
        raise TrainingError(f"{path}: nothing to resume from (no training state in this folder)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["training_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, KeyError, ValueError, OSError) as e:
        raise TrainingError(f"{path.name}: unreadable training state ({e})") from e
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise TrainingError(f"{path.name}: saved weights do not fit this model ({first_line(e)})") from e
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["optimizer"]["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    return meta
