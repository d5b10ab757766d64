"""The NN worker's side of the device: pooled embeddings to the dense model's device, their
gradients back, and the per-slot split whose backward costs each slot only its own width.

:class:`DeviceTransfer` is used when the dense model runs on CUDA: a batch's arrays are copied
into pinned host buffers (pre-sized, reused: two sets, one per batch in flight) and then to the
GPU with non-blocking copies on a side stream; the DataLoader stages the next batch while the
current one computes (:meth:`DeviceTransfer.stage`), and the compute stream waits on the copy's
event before it uses the tensors (:meth:`Staged.tensors`). Gradients come back the same way
(:meth:`DeviceTransfer.to_host`): device-to-host into pinned buffers on the side stream, with
an event the embedding worker's applier thread waits on before it reads them.

On the CPU nothing needs copying (``torch.from_numpy`` shares the lookup's memory), so the
contexts do not use a transfer there; a :class:`DeviceTransfer` built for the CPU (tests) does
plain synchronous copies through the same bookkeeping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

__all__ = ["DeviceTransfer", "Staged", "HostPool", "split_slots"]


class _SplitSlots(torch.autograd.Function):
    """Column views of ``summed``, one per summed slot; the backward concatenates the slots'
    gradients into one ``(batch, width)`` gradient (zeros for a slot that got none), so that
    each slot's backward costs its own width, not the whole buffer's (a plain column view of a
    tensor that requires grad makes a full-width gradient per slot)."""

    @staticmethod
    def forward(ctx: Any, summed: torch.Tensor, cols: tuple[tuple[int, int], ...]) -> Any:
        ctx.cols = cols
        ctx.width = summed.shape[1]
        return tuple(summed[:, a : a + d] for a, d in cols)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        ref = next(g for g in grads if g is not None)
        n = ref.shape[0]
        cols = ctx.cols
        order = sorted(range(len(cols)), key=lambda i: cols[i][0])
        end = 0
        tiled = True
        for i in order:  # every column once, in order: one concatenation
            if cols[i][0] != end:
                tiled = False
                break
            end += cols[i][1]
        if tiled and end == ctx.width:
            parts: list[torch.Tensor] = []
            for i in order:
                g = grads[i]
                parts.append(g if g is not None else ref.new_zeros((n, cols[i][1])))
            return torch.cat(parts, dim=1), None
        out = ref.new_zeros((n, ctx.width))
        for (a, d), g in zip(cols, grads, strict=True):
            if g is not None:
                out[:, a : a + d] += g
        return out, None


def split_slots(summed: torch.Tensor, cols: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """One tensor per summed slot (``(first column, width)`` each) of ``summed``; when
    ``summed`` requires grad, its gradient is assembled once from the slots' gradients."""
    if not summed.requires_grad or not cols:
        return [summed[:, a : a + d] for a, d in cols]
    return list(_SplitSlots.apply(summed, tuple((int(a), int(d)) for a, d in cols)))


class HostPool:
    """Host buffers reused by shape and dtype (pinned when ``pin``): :meth:`acquire` one,
    :meth:`release` it when whoever read it is done (another thread may)."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.allocated = 0

    def acquire(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(int(s) for s in shape), dtype)
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
            self.allocated += 1
        return torch.empty(key[0], dtype=dtype, pin_memory=self.pin)

    def release(self, buffers: Sequence[torch.Tensor]) -> None:
        with self._lock:
            for b in buffers:
                self._free.setdefault((tuple(b.shape), b.dtype), []).append(b)


class Staged:
    """One batch's arrays on the device (or on their way there)."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        event: Any,
        device: torch.device,
        hosts: list[torch.Tensor],
    ) -> None:
        self._tensors = tensors
        self._event = event
        self._device = device
        self._hosts = hosts  # the pinned sources: alive until the copy is done

    def tensors(self) -> dict[str, torch.Tensor]:
        """The device tensors, once the current stream may use them: it waits on the copy's
        event, and the caching allocator learns that the current stream uses them."""
        if self._event is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(self._event)
            for t in self._tensors.values():
                t.record_stream(current)
            self._event = None
        self._hosts = []
        return self._tensors


class DeviceTransfer:
    """Host-to-device and device-to-host copies of one NN worker (see the module's docstring).

    Args:
        device: the dense model's device.
        slots: host buffer sets for batches in flight to the device (2: the one computing and
            the next one).
    """

    def __init__(self, device: torch.device, slots: int = 2) -> None:
        self.device = device
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.stream: Any = torch.cuda.Stream(device=device) if self.cuda else None
        self._slots: list[dict[str, torch.Tensor]] = [{} for _ in range(max(1, slots))]
        self._events: list[Any] = [None] * len(self._slots)
        self._next = 0
        self.grad_pool = HostPool(pin=self.cuda)
        self._lock = threading.Lock()  # one staging at a time (an InferCtx serves threads)
        #: batches staged, and host buffer (re)allocations, so far (tests, diagnostics)
        self.staged = 0
        self.allocations = 0

    def _host(self, slot: int, name: str, shape: tuple[int, ...], dtype: torch.dtype):
        bufs = self._slots[slot]
        numel = int(np.prod(shape, dtype=np.int64))
        buf = bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            # pre-sized to the largest batch seen so far; a smaller one uses its prefix
            buf = torch.empty(max(numel, 1), dtype=dtype, pin_memory=self.cuda)
            bufs[name] = buf
            self.allocations += 1
        return buf[:numel].view(shape)

    def stage(self, arrays: dict[str, np.ndarray]) -> Staged:
        """Starts copying ``arrays`` (name to array) to the device and returns at once on
        CUDA; on the CPU the copies are done when it returns."""
        with self._lock:
            return self._stage(arrays)

    def _stage(self, arrays: dict[str, np.ndarray]) -> Staged:
        slot = self._next
        self._next = (slot + 1) % len(self._slots)
        previous = self._events[slot]
        if previous is not None:
            previous.synchronize()  # this slot's last copy has left its buffers
        out: dict[str, torch.Tensor] = {}
        hosts = []
        for name, a in arrays.items():
            src = torch.from_numpy(np.ascontiguousarray(a))
            host = self._host(slot, name, tuple(src.shape), src.dtype)
            host.copy_(src)
            hosts.append(host)
        if self.cuda:
            with torch.cuda.stream(self.stream):
                for (name, _), host in zip(arrays.items(), hosts, strict=True):
                    out[name] = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
            self._events[slot] = event
        else:
            for (name, _), host in zip(arrays.items(), hosts, strict=True):
                out[name] = host.clone()
            event = None
        self.staged += 1
        return Staged(out, event, self.device, hosts)

    def to_host(
        self, grads: Sequence[torch.Tensor]
    ) -> tuple[list[np.ndarray], Callable[[], None] | None, Callable[[], None] | None]:
        """Copies ``grads`` to the host: returns their arrays, a callable that waits until the
        copies are done (None: they are) and one that returns the buffers to the pool once
        they have been read (None: nothing to return).

        On CUDA the copies run on the side stream after the current stream's work so far
        (which computed them), into pinned buffers; on the CPU the arrays share the
        tensors' memory."""
        if not self.cuda:
            return [g.detach().numpy() for g in grads], None, None
        current = torch.cuda.current_stream(self.device)
        hosts = [self.grad_pool.acquire(g.shape, g.dtype) for g in grads]
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            for g, h in zip(grads, hosts, strict=True):
                h.copy_(g.detach(), non_blocking=True)
                g.record_stream(self.stream)  # not freed before the copy is done
        event = torch.cuda.Event()
        event.record(self.stream)
        pool = self.grad_pool
        return [h.numpy() for h in hosts], event.synchronize, lambda: pool.release(hosts)
