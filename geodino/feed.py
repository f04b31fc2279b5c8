"""Reused host buffers for model calls: pinned on CUDA, so copies to and from the GPU overlap.

A batch slot holds one batch's input (capacity, C, H, W) and each output's float32 result,
allocated once and reused by the next batch that fits. On CUDA they are page-locked
(pinned): host-to-device and device-to-host copies are then asynchronous DMA, so a thread
that has queued its batch on the GPU can release the inference lock and let the next thread
queue its own while the copies run. A plain ``.cpu()`` lands in fresh pageable memory
through a synchronous, staged copy; a fresh ``pin_memory()`` per batch grows torch's pinned
host cache with every batch in flight. Slots keep the pinned footprint bounded and known
(``max_slots`` x slot size). CPU runs never pin (nothing to copy to).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch


class BatchSlot:
    """One batch's reusable host buffers: ``inputs`` and lazily made ``output(name, shape)``."""

    def __init__(self, shape: tuple[int, ...], pin: bool) -> None:
        self.shape = tuple(shape)
        self.pin = pin
        # zeros, not empty: padded rows of a first batch then hold finite values
        self.inputs = torch.zeros(self.shape, dtype=torch.float32, pin_memory=pin)
        self._outputs: dict[str, torch.Tensor] = {}

    @property
    def capacity(self) -> int:
        return self.shape[0]

    def output(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The float32 buffer for output ``name`` of ``shape`` (made on first use, then reused)."""
        buf = self._outputs.get(name)
        if buf is None or tuple(buf.shape) != tuple(shape):
            buf = torch.empty(shape, dtype=torch.float32, pin_memory=self.pin)
            self._outputs[name] = buf
        return buf


class SlotPool:
    """At most ``max_slots`` batch slots; a lease reuses a free slot of the same input shape.

    Four slots cover one batch running on the GPU, one queued behind it, one being filled
    and one being drained; more threads than that wait for a slot (their windows are
    already read and normalised, so waiting costs no overlap).
    """

    def __init__(self, pin: bool, max_slots: int = 4) -> None:
        if max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        self.pin = pin
        self.max_slots = max_slots
        self.created = 0  # slots ever made (tests: reuse means this stays small)
        self._free: list[BatchSlot] = []
        self._leased = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def lease(self, shape: tuple[int, ...]) -> Iterator[BatchSlot]:
        shape = tuple(shape)
        slot = None
        with self._cond:
            while True:
                match = next((s for s in self._free if s.shape == shape), None)
                if match is not None:
                    self._free.remove(match)
                    slot = match
                    break
                if self._leased + len(self._free) < self.max_slots:
                    break
                if self._free:  # a free slot of another shape (another window size): drop it
                    self._free.pop(0)
                    break
                self._cond.wait()
            self._leased += 1
        try:
            if slot is None:  # allocate outside the lock: pinning is slow
                slot = BatchSlot(shape, self.pin)
                with self._cond:
                    self.created += 1
            yield slot
        finally:
            with self._cond:
                self._leased -= 1
                if slot is not None:
                    self._free.append(slot)
                self._cond.notify()


_POOLS: dict[str, SlotPool] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(device: torch.device) -> SlotPool:
    """This process's slot pool for ``device`` (pinned for CUDA devices)."""
    key = str(device)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = SlotPool(pin=device.type == "cuda")
        return _POOLS[key]
