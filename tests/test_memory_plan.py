"""The memory budget: which window, slices per pass and kept tensors fit, and what happens when they don't."""

import logging

import numpy as np
import pytest
import torch
from scripts.infer.memory import (
    GIB,
    RUNTIME_BYTES,
    default_budget_bytes,
    estimate_live_bytes,
    plan_memory,
)
from scripts.infer.predict import SlicePredictor
from scripts.network.double_decoder import DoubleDecoderNet
from torch import nn

WEIGHTS = 600 << 20  # about the width-64 network and its fused copy


def test_a_large_budget_runs_the_whole_slice_and_keeps_tensors():
    plan = plan_memory((1324, 1284), 64, 32 * GIB, WEIGHTS, runtime_bytes=RUNTIME_BYTES)
    assert plan.window == (1324, 1284) and not plan.tiles and plan.kept_bytes > 0
    assert plan.estimate_bytes <= plan.budget_bytes


def test_a_small_budget_tiles_the_slice_within_the_budget():
    plan = plan_memory((1324, 1284), 64, 4 * GIB, WEIGHTS, runtime_bytes=RUNTIME_BYTES)
    assert plan.tiles and plan.window[0] * plan.window[1] < 1324 * 1284
    assert plan.estimate_bytes <= 4 * GIB
    live = estimate_live_bytes(64, plan.window)
    assert live + WEIGHTS + RUNTIME_BYTES <= 4 * GIB


def test_a_gpu_budget_batches_slices_and_amp_fits_more():
    full = plan_memory((1324, 1284), 64, 40 * GIB, WEIGHTS, max_slices=16, device_type="cuda")
    half = plan_memory((1324, 1284), 64, 40 * GIB, WEIGHTS, max_slices=16, half=True, device_type="cuda")
    assert 1 <= full.slices_per_pass < half.slices_per_pass <= 16
    assert not full.tiles and full.kept_bytes == 0  # nothing is kept off the CPU


def test_the_default_cpu_budget_is_at_most_4_gib():
    assert 0 < default_budget_bytes(torch.device("cpu")) <= 4 * GIB


class _Counting(nn.Module):
    """A width-4 network that counts its calls and the pixels it saw; optionally fails on big windows
    the way PyTorch's CPU allocator does."""

    def __init__(self, fail_above: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = DoubleDecoderNet(width=4, outputs="label").eval()
        self.width, self.outputs = 4, "label"
        self.fail_above = fail_above
        self.windows: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_above is not None and x.shape[-2] * x.shape[-1] > self.fail_above:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory")
        self.windows.append(tuple(x.shape[-2:]))
        return self.net(x)


def _budget_gb(predictor: SlicePredictor, window: tuple[int, int], share: float = 1.0) -> float:
    """A budget with room for ``share`` of one window's activations, as this process counts them
    (the C heap's fragmentation included once freed memory is kept: it is process-wide)."""
    live = estimate_live_bytes(4, window, heap=predictor.heap_kept)
    return (RUNTIME_BYTES + predictor._weights_bytes() + int(live * share)) / GIB


def test_predictor_runs_the_tiles_it_planned_and_they_agree_with_the_whole_slice(caplog):
    slices = np.random.default_rng(0).normal(size=(1, 160, 192)).astype(np.float32)
    whole = SlicePredictor(_Counting(), fuse=False).predict(slices).label
    predictor = SlicePredictor(_Counting(), fuse=False)
    predictor.memory_budget_gb = _budget_gb(predictor, (160, 192), share=0.5)
    with caplog.at_level(logging.INFO, logger="scripts.infer.predict"):
        tiled = predictor.predict(slices).label
    plan = predictor.memory_plan((160, 192))
    assert plan.tiles and "tiles" in caplog.text
    windows = predictor.model.windows  # the channels_last copy that ran
    assert set(windows) == {plan.window}
    assert 2 <= len(windows) <= 4  # as few tiles as fit, not MONAI's 0.25-overlap grid
    assert tiled.shape == whole.shape
    assert ((tiled > 0) == (whole > 0)).float().mean() > 0.95


def test_out_of_memory_retries_with_smaller_windows(caplog):
    slices = np.random.default_rng(1).normal(size=(1, 128, 128)).astype(np.float32)
    predictor = SlicePredictor(_Counting(fail_above=100 * 100), fuse=False)
    predictor.memory_budget_gb = _budget_gb(predictor, (128, 128))
    with caplog.at_level(logging.WARNING, logger="scripts.infer.predict"):
        label = predictor.predict(slices).label
    assert label.shape == (1, 128, 128)
    windows = predictor.model.windows
    assert "out of memory" in caplog.text and windows
    assert all(h * w <= 100 * 100 for h, w in windows)


def test_other_errors_are_not_taken_for_lack_of_memory():
    class Broken(_Counting):
        def forward(self, x):
            raise RuntimeError("shapes do not match")

    with pytest.raises(RuntimeError, match="shapes do not match"):
        SlicePredictor(Broken(), fuse=False).predict(np.zeros((1, 32, 32), np.float32))


@pytest.mark.parametrize("bad", ["lots", -1, 0])
def test_a_bad_budget_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="memory_budget_gb"):
        SlicePredictor(_Counting(), memory_budget_gb=bad)
