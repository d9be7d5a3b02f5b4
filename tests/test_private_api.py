"""The private library members `private_api` reads still exist and still mean what it takes them to mean: each
test fails loudly when torch, argparse, multiprocessing or napari changes one (issue 32)."""

from __future__ import annotations

import argparse
from multiprocessing import shared_memory

import numpy as np
import pytest
import torch

from napari_daeformer.base import private_api


def test_tensor_versions_count_in_place_writes() -> None:
    w = torch.zeros(3)
    before = private_api.tensor_versions([w])
    w.add_(1)
    assert private_api.tensor_versions([w])[0] > before[0]


@pytest.mark.parametrize("feature", ["avx512_bf16", "amx_tile", "vnni"])
def test_cpu_feature_probes_exist(feature: str) -> None:
    assert callable(getattr(torch.cpu, f"_is_{feature}_supported"))           # a rename would silently read False
    assert isinstance(private_api.cpu_supports(feature), bool)


def test_foreach_kernels_match_the_plain_arithmetic() -> None:
    a, b = [torch.randn(4, 5), torch.randn(7)], [torch.randn(4, 5), torch.randn(7)]
    diffs = private_api.foreach_sub(a, b)
    assert all(torch.equal(d, x - y) for d, x, y in zip(diffs, a, b))
    norms = private_api.foreach_norm(diffs)
    assert all(torch.allclose(n, d.norm()) for n, d in zip(norms, diffs))


def test_parser_actions_by_destination() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int)
    actions = private_api.parser_actions(parser)
    assert actions["batch_size"].type is int and "help" in actions


def test_shared_memory_name_is_what_the_tracker_registered() -> None:
    shm = shared_memory.SharedMemory(create=True, size=16)
    try:
        name = private_api.shared_memory_name(shm)
        assert name.lstrip("/") == shm.name
    finally:
        shm.close()
        shm.unlink()


def test_paint_slices_reads_both_atom_shapes() -> None:
    class Masked:                                  # napari's masked paint atom carries its bounding box
        slice_key = (slice(2, 4), slice(0, 8), slice(0, 8))
    assert private_api.paint_slices(Masked(), 0) == {2, 3}
    indices = (np.array([1, 1, 5]), np.array([0, 1, 2]), np.array([3, 3, 3]))
    assert private_api.paint_slices((indices, np.zeros(3), np.ones(3)), 0) == {1, 5}
    assert private_api.paint_slices((indices, np.zeros(3), np.ones(3)), 2) == {3}
