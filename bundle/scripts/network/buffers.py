"""Reusable output tensors for the fused inference network on the CPU.

Fresh large CPU tensors are paid for in page faults: glibc serves every allocation above 32 MB with
a new memory map, whose pages the kernel maps and zeroes at first touch. At full resolution that was
about half of a thin convolution's time and a fifth of the fused network's. PyTorch keeps no cache
of CPU memory, so the network keeps its own:

- :class:`OutputBuffer`: one module's output (a concatenation buffer), kept for its next call;
- :class:`TensorPool`: dead intermediate tensors (conv outputs, pooled maps), handed out again to
  the next module that asks for the same shape.

Both are for one call at a time (not thread safe) and stay empty on other devices, under
``torch.compile`` and while tracing.
"""

from __future__ import annotations

import weakref
from collections import defaultdict

import torch

__all__ = ["BufferBudget", "OutputBuffer", "TensorPool", "give_back", "memory_format_of"]


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    cl = x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


def _keeps(like: torch.Tensor) -> bool:
    return like.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.jit.is_tracing()


class BufferBudget:
    """Bytes that the kept tensors of one fused network may hold together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def free(self, size: int) -> None:
        self.used -= size


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class OutputBuffer:
    """The output tensor of one module, kept for its next call with the same shape.

    Only safe while each module's previous output is dead when it runs again, true inside the fused
    network (1.35 GiB kept at width 8 on 1328 x 1296 slices, 2.7 at width 16: ``budget`` caps it).
    """

    def __init__(self, budget: BufferBudget | None = None) -> None:
        self.budget = budget
        self.tensor: torch.Tensor | None = None

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
        fmt = memory_format_of(like)
        t = self.tensor
        if t is not None and t.shape == shape and t.dtype == dtype and t.device == like.device:
            # An inference-mode tensor cannot be written outside inference mode.
            if t.is_contiguous(memory_format=fmt) and t.is_inference() == torch.is_inference_mode_enabled():
                return t
        self._release()
        t = torch.empty(shape, dtype=dtype, device=like.device, memory_format=fmt)
        if self.budget is not None and _keeps(like) and self.budget.reserve(_nbytes(t)):
            self.tensor = t
        return t

    def _release(self) -> None:
        if self.tensor is not None and self.budget is not None:
            self.budget.free(_nbytes(self.tensor))
        self.tensor = None


class TensorPool:
    """Free tensors by shape, dtype and layout: ``take`` one (or a new one), ``give`` back dead ones.

    The caller must only give tensors it will not read again. Only tensors that ``take`` made are
    kept (others are dropped), so the pool never holds more tensors of a shape than were in use at
    once; at most ``budget`` bytes wait in it.
    """

    def __init__(self, budget: BufferBudget) -> None:
        self.budget = budget
        self.free: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        self.made: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()

    @staticmethod
    def _key(shape: tuple[int, ...], dtype: torch.dtype, fmt: torch.memory_format) -> tuple:
        return tuple(shape), dtype, fmt, torch.is_inference_mode_enabled()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
        fmt = memory_format_of(like)
        waiting = self.free.get(self._key(shape, dtype, fmt)) if _keeps(like) else None
        if waiting:
            t = waiting.pop()
            self.budget.free(_nbytes(t))
            return t
        t = torch.empty(shape, dtype=dtype, device=like.device, memory_format=fmt)
        if _keeps(like):
            self.made[id(t)] = t
        return t

    def give(self, t: torch.Tensor) -> None:
        if self.made.get(id(t)) is not t or t.is_inference() != torch.is_inference_mode_enabled():
            return  # not ours (a fresh result of some op, or a view): keeping it would only grow the pool
        fmt = memory_format_of(t)
        waiting = self.free[self._key(t.shape, t.dtype, fmt)]
        if any(w is t for w in waiting) or not t.is_contiguous(memory_format=fmt):
            return  # given twice, or a view: handing it out would share memory between two users
        if self.budget.reserve(_nbytes(t)):
            waiting.append(t)


def give_back(pool: TensorPool | None, *tensors: torch.Tensor) -> None:
    """Return dead tensors to ``pool`` (a no-op without one)."""
    if pool is not None:
        for t in tensors:
            pool.give(t)
