"""Every use of a library's private API, in one place: where no public API does the job, it is read here and
nowhere else, and `tests/test_private_api.py` fails loudly when the library changes it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from multiprocessing import shared_memory

import numpy as np
import torch


def tensor_versions(tensors: Iterable[torch.Tensor]) -> tuple[int, ...]:
    """torch's in-place version counters (`Tensor._version`): they change whenever a tensor is written, which is
    how a cached copy of a model knows its weights moved (torch has no public counter)."""
    return tuple(t._version for t in tensors)


def cpu_supports(feature: str) -> bool:
    """torch's CPU feature probe `torch.cpu._is_<feature>_supported` (avx512_bf16, amx_tile, vnni); False where the
    probe does not exist in this torch."""
    probe = getattr(torch.cpu, f"_is_{feature}_supported", None)
    return bool(probe()) if probe is not None else False


def foreach_sub(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`a_i - b_i` as one multi-tensor kernel (`torch._foreach_sub`, which torch's own optimisers use)."""
    return list(torch._foreach_sub(a, b))


def foreach_norm(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The L2 norm of each tensor as one multi-tensor kernel (`torch._foreach_norm`)."""
    return list(torch._foreach_norm(tensors))


def parser_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """An argparse parser's options by destination (`ArgumentParser._actions`: argparse lists them nowhere else)."""
    return {action.dest: action for action in parser._actions}


def shared_memory_name(shm: shared_memory.SharedMemory) -> str:
    """The name the resource tracker registered a block under (`SharedMemory._name`, with the leading slash that
    the public `name` drops)."""
    return shm._name  # type: ignore[attr-defined]


def paint_slices(atom: object, axis: int) -> set[int]:
    """Slices along `axis` that one napari Labels history atom changed. napari documents neither shape: a masked
    paint edit has a `slice_key` bounding box; `data_setitem` records `(indices, old_values, new_values)`."""
    key = getattr(atom, "slice_key", None)
    if key is not None:
        s = key[axis]
        return set(range(s.start or 0, s.stop)) if isinstance(s, slice) else {int(s)}
    indices = atom[0]  # type: ignore[index]
    return {int(i) for i in np.unique(np.asarray(indices[axis]))}
