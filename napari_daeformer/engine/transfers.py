"""Host <-> device copies that overlap the compute stream, so that the GPU never waits for the host.

The engine queues batch k+1 before it collects batch k: the source slices of k+1 travel to the device on one side
stream while k computes, and the results of k (uint8 labels, a finite flag, any per-voxel outputs) come back on
another side stream; the host waits only for k's results, while k+1 runs. Each direction has two host buffers used in
turn, each reused only once the copy that last used it has finished (its CUDA event), so at most two batches are in
flight. On CUDA the buffers are pinned (page-locked), which is what makes the copies asynchronous; on other devices
the same bookkeeping runs in program order with plain buffers and no streams (that is how the CPU tests check it).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np
import torch


class _Buffers:
    """Two sets of flat host buffers used in turn; each set is guarded by the event of its last copy."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.sets: list[list[torch.Tensor]] = [[], []]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def take(self, specs: list[tuple[torch.Size, torch.dtype]]) -> tuple[int, list[torch.Tensor]]:
        """The next set, once its last copy is done, as views of the given (shape, dtype)s (grown as needed)."""
        slot, self.turn = self.turn, self.turn ^ 1
        event = self.events[slot]
        if event is not None:
            event.synchronize()
        flat = self.sets[slot]
        views = []
        for i, (shape, dtype) in enumerate(specs):
            n = prod(shape)
            if i == len(flat):
                flat.append(torch.empty(0, dtype=dtype))
            if flat[i].numel() < n or flat[i].dtype != dtype:
                with torch.inference_mode(False):            # a plain tensor: writable in and out of inference mode
                    flat[i] = torch.empty(n, dtype=dtype, pin_memory=self.pin)
            views.append(flat[i][:n].view(shape))
        return slot, views

    def record(self, slot: int, stream: torch.cuda.Stream) -> torch.cuda.Event:
        """Mark set `slot` busy until the work queued so far on `stream` is done."""
        event = torch.cuda.Event()
        event.record(stream)
        self.events[slot] = event
        return event


@dataclass
class Pending:
    """One batch's results on their way to the host."""

    arrays: list[torch.Tensor]
    event: torch.cuda.Event | None

    def wait(self) -> list[np.ndarray]:
        """The results as numpy views of host buffers, valid until the next-but-one `download`."""
        if self.event is not None:
            self.event.synchronize()
        return [a.numpy() for a in self.arrays]


class Transfers:
    """The copies of one run on `device`: `upload` a batch's input, `download` its results."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        cuda = device.type == "cuda"
        self._up_stream = torch.cuda.Stream(device) if cuda else None
        self._down_stream = torch.cuda.Stream(device) if cuda else None
        self._up, self._down = _Buffers(pin=cuda), _Buffers(pin=cuda)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the device, ready for the current stream; the copy overlaps the work queued before it."""
        slot, (staged,) = self._up.take([(host.shape, host.dtype)])
        staged.copy_(host)
        if self._up_stream is None:
            return staged.to(self.device)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._up_stream):
            on_device = staged.to(self.device, non_blocking=True)
        self._up.record(slot, self._up_stream)
        compute.wait_stream(self._up_stream)
        on_device.record_stream(compute)            # allocated on the side stream, used and freed on the compute one
        return on_device

    def download(self, *tensors: torch.Tensor) -> Pending:
        """Start copying device `tensors` (queued on the current stream) to host buffers."""
        slot, staged = self._down.take([(t.shape, t.dtype) for t in tensors])
        if self._down_stream is None:
            for host, t in zip(staged, tensors):
                host.copy_(t)
            return Pending(staged, None)
        self._down_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._down_stream):
            for host, t in zip(staged, tensors):
                host.copy_(t, non_blocking=True)
                t.record_stream(self._down_stream)
        return Pending(staged, self._down.record(slot, self._down_stream))
