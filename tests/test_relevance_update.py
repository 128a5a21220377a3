import pytest
import torch

from relfast import ops, reference
from testing import (SMALL_SHAPES, assert_batch_equals_per_sample, assert_matches_reference, cases, exact, generator,
                     relevance_map, seed_for, to_case)


def abar_like(B, N, gen):
    """A head-averaged map: non-negative, rows of order 1/N (as E_h[(grad*A)^+] is)."""
    return torch.rand(B, N, N, generator=gen, dtype=torch.float64) / max(N, 1)


def inputs(shape, M, dtype, device, contiguous, tag):
    B, _, N = shape
    gen = generator(seed_for(tag, shape, M))
    R = to_case(relevance_map(B, N, M, gen, identity=(M == N)), dtype, device, contiguous)
    abar = to_case(abar_like(B, N, gen), dtype, device, contiguous)
    return R, abar


@pytest.mark.parametrize("aggregate", [True, False])
@pytest.mark.parametrize("device,dtype,shape,contiguous", cases(dtypes=[torch.float64, torch.float32]) +
                         cases(shapes=SMALL_SHAPES, dtypes=[torch.float16, torch.bfloat16]))
def test_matches_float64_reference(device, dtype, shape, contiguous, aggregate):
    R, abar = inputs(shape, shape[2], dtype, device, contiguous, "relevance_update")
    out = ops.relevance_update(R, abar, aggregate=aggregate)
    assert_matches_reference(out, reference.relevance_update(*exact(R, abar), aggregate), dtype)


@pytest.mark.parametrize("aggregate", [True, False])
@pytest.mark.parametrize("device,dtype,shape,contiguous", cases(shapes=SMALL_SHAPES))
def test_inplace_matches_reference_and_writes_into_R(device, dtype, shape, contiguous, aggregate):
    R, abar = inputs(shape, shape[2], dtype, device, contiguous, "relevance_update_")
    expected = reference.relevance_update(*exact(R, abar), aggregate)
    storage = R.data_ptr()
    returned = ops.relevance_update_(R, abar, aggregate=aggregate)
    assert returned is R and R.data_ptr() == storage
    assert_matches_reference(R, expected, dtype)


@pytest.mark.parametrize("M", [1, 5, 36])
def test_rule7_rectangular_cross_map(M):
    # Rule 7 updates R^sq (S x Q) with the self-attention map of s (S x S).
    R, abar = inputs((2, 1, 13), M, torch.float32, "cpu", True, "rule7")
    assert_matches_reference(ops.relevance_update(R, abar), reference.relevance_update(*exact(R, abar)), torch.float32)


def test_identity_map_doubles_R():
    R = torch.rand(2, 6, 6)
    eye = torch.eye(6).expand(2, 6, 6)
    torch.testing.assert_close(ops.relevance_update(R, eye), 2 * R)
    torch.testing.assert_close(ops.relevance_update(R, eye, aggregate=False), R)


def test_batch_equals_per_sample():
    R, abar = inputs((4, 1, 31), 31, torch.float32, "cpu", True, "batch")
    assert_batch_equals_per_sample(ops.relevance_update, (R, abar), 4)


@pytest.mark.parametrize("aggregate", [True, False])
def test_opcheck(aggregate):
    for shape in [(2, 1, 5), (0, 1, 3), (1, 1, 1)]:
        R, abar = inputs(shape, shape[2], torch.float32, "cpu", True, "opcheck")
        kwargs = {"aggregate": aggregate}
        torch.library.opcheck(torch.ops.relfast.relevance_update.default, (R, abar), kwargs)
        torch.library.opcheck(torch.ops.relfast.relevance_update_.default, (R.clone(), abar), kwargs)
