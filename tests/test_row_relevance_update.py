import pytest
import torch

from relfast import ops, reference
from testing import (assert_batch_equals_per_sample, assert_matches_reference, attention, cases, exact, generator,
                     gradient, seed_for, to_case)


def inputs(shape, K, dtype, device, contiguous, tag="row_update"):
    B, H, N = shape
    gen = generator(seed_for(tag, shape, K))
    v = to_case(torch.rand(B, K, N, generator=gen, dtype=torch.float64), dtype, device, contiguous)
    grad = to_case(gradient(B, H, N, N, gen), dtype, device, contiguous)
    attn = to_case(attention(B, H, N, N, gen), dtype, device, contiguous)
    return v, grad, attn


# K = 1 (the CLS row), 3 (a few rows, fused), 20 (more rows than the fused path takes: GEMM route).
@pytest.mark.parametrize("K", [1, 3, 20])
@pytest.mark.parametrize("device,dtype,shape,contiguous", cases())
def test_matches_float64_reference(device, dtype, shape, contiguous, K):
    v, grad, attn = inputs(shape, K, dtype, device, contiguous)
    out = ops.row_relevance_update(v, grad, attn)
    assert_matches_reference(out, reference.row_relevance_update(*exact(v, grad, attn)), dtype)


@pytest.mark.parametrize("K", [1, 20])
def test_without_aggregation(K):
    v, grad, attn = inputs((2, 12, 41), K, torch.float32, "cpu", True)
    out = ops.row_relevance_update(v, grad, attn, aggregate=False)
    assert_matches_reference(out, reference.row_relevance_update(*exact(v, grad, attn), False), torch.float32)


def test_batch_equals_per_sample():
    v, grad, attn = inputs((5, 12, 37), 2, torch.float32, "cpu", True)
    assert_batch_equals_per_sample(ops.row_relevance_update, (v, grad, attn), 5)


@pytest.mark.parametrize("K", [1, 20])
def test_opcheck(K):
    for shape in [(2, 3, 6), (0, 2, 4), (1, 1, 1)]:
        v, grad, attn = inputs(shape, K, torch.float32, "cpu", True)
        torch.library.opcheck(torch.ops.relfast.row_relevance_update.default, (v, grad, attn), {"aggregate": True})
