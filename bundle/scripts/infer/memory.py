"""How much memory slice prediction may use, and the window, slices per pass and kept buffers that fit.

The double-decoder network's activations grow with width x pixels: at width 64 a whole 1324 x 1284
slice needs about 6 GB in float32 besides the weights (docs/performance.md), more than a laptop or a
small GPU has free. :func:`plan_memory` turns a budget into settings, in this order of preference:

1. the whole slice in one window (no seams), as many slices per forward pass as fit (GPU);
2. on the CPU, freed memory kept in the process for the next slice (``scripts.io.pages``), or where
   that is not available the rest of the budget for the fused network's kept tensors;
3. otherwise the fewest Gaussian-blended tiles whose window fits, with a fixed overlap in pixels.

The estimate is a model fitted to measured peaks (``bench/bench_inference.py --only budget`` prints
estimate against measurement), not an exact count: the budget is a target, not a hard cap.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "RUNTIME_BYTES",
    "MemoryPlan",
    "available_bytes",
    "default_budget_bytes",
    "estimate_live_bytes",
    "plan_memory",
    "window_size",
]

logger = logging.getLogger(__name__)

GIB = 1 << 30

# Peak bytes of live activations per (width x padded pixel) of one window in the fused network. CPU,
# float32: measured 56-65 B at widths 16 and 64 on 1328 x 1296 (the larger, for a margin). CUDA on an
# H200, 8 slices per pass: float32 95-100 B (cuDNN's workspaces), float16/bfloat16 AMP 27-28 B.
LIVE_BYTES_PER_WIDTH_PIXEL = {("cpu", False): 65.0, ("cpu", True): 65.0, ("cuda", False): 100.0,
                              ("cuda", True): 35.0}  # fmt: skip
# The process itself on the CPU (Python, PyTorch, MONAI, the slices in flight), counted in the budget.
RUNTIME_BYTES = 640 << 20
# The CPU with freed memory kept in the C heap (scripts.io.pages.keep_freed_memory): the process holds
# about this many times the live activations of one window (fragmentation), measured at width 64 on
# 1324 x 1284 slices (whole: 1.46x, three tiles: 1.45x).
HEAP_FACTOR = 1.5
# What the fused network keeps between slices when nothing caps it (concatenation buffers and pool), per
# (width x padded pixel) of one float32 window.
KEPT_BYTES_PER_WIDTH_PIXEL = 160.0
# A cap on kept tensors (reuse_buffers) below this is not worth keeping (unless all fit).
MIN_KEPT_BYTES = 256 << 20
# Overlap of neighbouring tiles in pixels: what each window sees beyond its part of the slice.
TILE_HALO = 64
# The default CPU budget: half of the free memory, at most this much (a 16 GB laptop with a browser open).
DEFAULT_CPU_CAP = 4 * GIB
# Of the free device memory, the share planned for (the caching allocator fragments the rest).
DEVICE_SHARE = 0.8


@dataclass(frozen=True)
class MemoryPlan:
    """What fits: window (pixels per axis), overlap per axis (fraction, for MONAI's inferer; None: the
    user's own tiles with the inferer's overlap), slices per forward pass, bytes the CPU path may keep
    between layers (0: none) and the estimate it rests on."""

    window: tuple[int, int]
    overlap: tuple[float, float] | None
    slices_per_pass: int
    kept_bytes: int
    estimate_bytes: int
    budget_bytes: int

    @property
    def tiles(self) -> bool:
        return self.overlap is None or self.overlap != (0.0, 0.0)

    def describe(self, slice_shape: tuple[int, int]) -> str:
        window = "whole slice" if not self.tiles else "x".join(map(str, self.window)) + " tiles"
        return (
            f"{slice_shape[0]}x{slice_shape[1]} slices: {window}, {self.slices_per_pass} slice(s) per pass, "
            f"{self.kept_bytes / GIB:.1f} GiB kept tensors; estimated peak {self.estimate_bytes / GIB:.1f} "
            f"of a {self.budget_bytes / GIB:.1f} GiB budget"
        )


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_bytes(device: torch.device) -> int:
    """Free memory where the network runs: free device memory (plus what PyTorch caches but does not
    use) on a GPU, the kernel's MemAvailable on the CPU (total memory where that is unknown)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    free = _meminfo_available()
    if free is None:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(free)


def default_budget_bytes(device: torch.device) -> int:
    """The budget when the user sets none: 80 % of the free GPU memory, or on the CPU half the free
    memory and at most 4 GiB (raise ``memory_budget_gb`` for speed on a machine with more)."""
    free = available_bytes(device)
    if device.type == "cuda":
        return int(DEVICE_SHARE * free)
    return int(min(free / 2, DEFAULT_CPU_CAP))


def window_size(slice_shape: Sequence[int], max_window: Sequence[int] | int) -> tuple[int, int]:
    """Sliding-window size: the whole slice when it fits in ``max_window`` (one window, no seams).

    ``max_window`` entries <= 0 mean "no limit" along that axis.
    """
    limits = (max_window, max_window) if isinstance(max_window, int) else tuple(max_window)
    return tuple(int(s) if lim <= 0 else int(min(s, lim)) for s, lim in zip(slice_shape, limits, strict=True))


def _padded(side: int) -> int:
    return side + (-side) % 16


def estimate_live_bytes(
    width: int,
    window: tuple[int, int],
    slices: int = 1,
    half: bool = False,
    device_type: str = "cpu",
    heap: bool = False,
) -> int:
    """Peak bytes of activations for ``slices`` windows of ``window`` pixels at network ``width``
    (``half``: 16-bit AMP; ``heap``: freed memory kept in the C heap, which fragments)."""
    pixels = _padded(window[0]) * _padded(window[1])
    per = LIVE_BYTES_PER_WIDTH_PIXEL[("cuda" if device_type == "cuda" else "cpu", bool(half))]
    return int(per * width * pixels * slices * (HEAP_FACTOR if heap else 1.0))


def _tile_window(side: int, tiles: int) -> int:
    """Window side that covers ``side`` with ``tiles`` windows overlapping by TILE_HALO (multiple of 16)."""
    if tiles == 1:
        return side
    window = math.ceil((side + (tiles - 1) * TILE_HALO) / tiles)
    return min(side, window + (-window) % 16)


def _overlap(side: int, window: int, tiles: int) -> float:
    """MONAI's overlap fraction that places exactly ``tiles`` windows of ``window`` over ``side``."""
    if tiles == 1 or window >= side:
        return 0.0
    interval = math.ceil((side - window) / (tiles - 1))
    # MONAI steps by int(window * (1 - overlap)): half a pixel of margin keeps float error from
    # rounding the step down (one more window).
    return max(0.0, 1.0 - (interval + 0.5) / window)


def plan_memory(
    slice_shape: tuple[int, int],
    width: int,
    budget_bytes: int,
    weights_bytes: int,
    max_slices: int = 1,
    half: bool = False,
    keep_tensors: bool = True,
    max_window: Sequence[int] | int = 0,
    runtime_bytes: int = 0,
    device_type: str = "cpu",
    heap: bool = False,
) -> MemoryPlan:
    """Settings for slices of ``slice_shape`` that fit ``budget_bytes``.

    Args:
        slice_shape: (height, width) of the slices as the network sees them.
        width: the network's width (``m_f``).
        budget_bytes: what prediction may use in all, weights included.
        weights_bytes: the weights held (the network and its fused copy).
        max_slices: slices available per pass (the batch); more than 1 pays on a GPU only.
        half: 16-bit activations (AMP).
        keep_tensors: the CPU path may keep tensors between layers with what is left of the budget.
        max_window: the user's largest window per axis (<= 0: no limit).
        runtime_bytes: what the process holds besides (the CPU budget counts it: RUNTIME_BYTES).
        device_type: "cpu" or "cuda" (their activations differ in size).
        heap: freed memory stays in the C heap (CPU): activations count HEAP_FACTOR times, nothing
            else is kept.
    """
    room = budget_bytes - weights_bytes - runtime_bytes
    height, side = slice_shape
    limits = window_size(slice_shape, max_window)
    if limits != (height, side):  # the user's own tiles, with the inferer's overlap
        window, overlap = limits, None
        one = estimate_live_bytes(width, window, 1, half, device_type, heap)
    else:
        window, overlap, one = _fewest_tiles(slice_shape, width, room, half, device_type, heap)
    slices = max(1, min(max_slices, room // max(one, 1)))
    live = one * slices
    kept = 0
    if keep_tensors and device_type == "cpu" and not heap:  # the fused network's own, CPU only
        wanted = int(KEPT_BYTES_PER_WIDTH_PIXEL * width * _padded(window[0]) * _padded(window[1]))
        kept = max(0, min(wanted, room - live))
        kept = kept if kept == wanted or kept >= MIN_KEPT_BYTES else 0
    estimate = runtime_bytes + weights_bytes + live + kept
    return MemoryPlan(window, overlap, int(slices), kept, int(estimate), int(budget_bytes))


def _fewest_tiles(
    slice_shape: tuple[int, int], width: int, room: int, half: bool, device_type: str, heap: bool
) -> tuple[tuple[int, int], tuple[float, float], int]:
    """(window, overlap, bytes of one window) of the fewest tiles that fit ``room`` (16 x 16 at most)."""
    height, side = slice_shape
    # Fewest tiles first; for a tie, the split that keeps windows closest to square.
    counts = sorted(
        ((ny, nx) for ny in range(1, 17) for nx in range(1, 17)),
        key=lambda n: (n[0] * n[1], abs(math.log((height / n[0]) / (side / n[1])))),
    )
    for ny, nx in counts:
        window = (_tile_window(height, ny), _tile_window(side, nx))
        one = estimate_live_bytes(width, window, 1, half, device_type, heap)
        if one <= room:
            break
    return window, (_overlap(height, window[0], ny), _overlap(side, window[1], nx)), one
