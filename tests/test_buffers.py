"""Kept tensors of the fused network: the pool hands out only dead tensors, pooling is exact."""

import torch
import torch.nn.functional as F
from scripts.network.buffers import BufferBudget, TensorPool
from scripts.network.double_decoder import DoubleDecoderNet
from scripts.network.fusion import _max_pool, fuse_for_inference


def _pool(limit: int = 1 << 20) -> TensorPool:
    return TensorPool(BufferBudget(limit))


def test_a_given_tensor_is_handed_out_again_for_the_same_shape_only():
    pool = _pool()
    like = torch.empty(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    first = pool.take((1, 4, 8, 8), torch.float32, like)
    pool.give(first)
    assert pool.take((1, 4, 8, 6), torch.float32, like) is not first  # another shape
    assert pool.take((1, 4, 8, 8), torch.float64, like) is not first  # another dtype
    again = pool.take((1, 4, 8, 8), torch.float32, like)
    assert again is first and again.is_contiguous(memory_format=torch.channels_last)
    assert pool.take((1, 4, 8, 8), torch.float32, like) is not first  # handed out once only


def test_views_foreign_tensors_double_gives_and_tensors_over_budget_are_not_kept():
    pool = _pool(limit=2 * 4 * 64 * 4)  # room for two (1, 4, 8, 8) float32 tensors
    like = torch.zeros(1, 4, 8, 8)
    a, b, c = (pool.take((1, 4, 8, 8), torch.float32, like) for _ in range(3))
    pool.give(a[:, :2])  # a view: its memory belongs to a
    pool.give(torch.zeros(1, 4, 8, 8))  # not made by the pool: keeping such tensors grew it without end
    pool.give(a)
    pool.give(a)  # twice: two takers would share it
    pool.give(b)
    pool.give(c)  # over the budget
    assert [len(w) for w in pool.free.values()] == [2]
    taken = [pool.take((1, 4, 8, 8), torch.float32, like) for _ in range(2)]
    assert {id(t) for t in taken} == {id(a), id(b)} and pool.budget.used == 0


def test_repeated_forward_passes_do_not_grow_the_pool():
    torch.manual_seed(0)
    fused = fuse_for_inference(DoubleDecoderNet(width=4, outputs="both").eval(), reuse_buffers=True)
    x = torch.randn(1, 1, 64, 48).contiguous(memory_format=torch.channels_last)
    waiting = []
    with torch.inference_mode():
        for _ in range(4):
            fused(x)
            waiting.append(sum(len(w) for w in fused.pool.free.values()))
    assert waiting[0] > 0 and waiting[1:] == waiting[:1] * 3, waiting


def test_pooled_max_pool_equals_max_pool2d_and_reuses_memory():
    pool = _pool(limit=1 << 24)
    x = torch.randn(2, 5, 12, 10).contiguous(memory_format=torch.channels_last)
    x[0, 1, 3, 4] = float("nan")  # propagated like max_pool2d does
    out = _max_pool(x, pool)
    torch.testing.assert_close(out, F.max_pool2d(x, 2), equal_nan=True, rtol=0, atol=0)
    pool.give(out)
    assert _max_pool(x, pool) is out
    odd = torch.randn(1, 3, 7, 6).contiguous(memory_format=torch.channels_last)  # falls back
    torch.testing.assert_close(_max_pool(odd, pool), F.max_pool2d(odd, 2), rtol=0, atol=0)
