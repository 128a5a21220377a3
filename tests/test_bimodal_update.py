import pytest
import torch

from relfast import ops, reference
from testing import (SMALL_SHAPES, assert_batch_equals_per_sample, assert_matches_reference, cases, exact, generator,
                     relevance_map, seed_for, to_case)


def inputs(B, S, Q, dtype, device, contiguous, tag="bimodal"):
    gen = generator(seed_for(tag, B, S, Q))
    R_sq = relevance_map(B, S, Q, gen, identity=False)
    R_ss = relevance_map(B, S, S, gen)
    abar = torch.rand(B, S, Q, generator=gen, dtype=torch.float64) / max(Q, 1)
    R_qq = relevance_map(B, Q, Q, gen)
    return [to_case(t, dtype, device, contiguous) for t in (R_sq, R_ss, abar, R_qq)]


# S (the text/query side) takes the shape's N; Q (image regions) a fixed odd size.
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("device,dtype,shape,contiguous", cases(dtypes=[torch.float64, torch.float32]) +
                         cases(shapes=SMALL_SHAPES, dtypes=[torch.float16, torch.bfloat16]))
def test_matches_float64_reference(device, dtype, shape, contiguous, normalize):
    B, _, S = shape
    args = inputs(B, S, 37, dtype, device, contiguous)
    out = ops.bimodal_update(*args, normalize=normalize)
    assert_matches_reference(out, reference.bimodal_update(*exact(*args), normalize), dtype)


@pytest.mark.parametrize("S,Q", [(1, 1), (7, 100), (100, 7)])
def test_sides_of_different_lengths(S, Q):
    args = inputs(2, S, Q, torch.float32, "cpu", True)
    assert_matches_reference(ops.bimodal_update(*args), reference.bimodal_update(*exact(*args)), torch.float32)


def test_with_identity_self_maps_adds_abar():
    # At initialisation R_ss = I, R_qq = I, R_sq = 0: rule 10 gives exactly abar.
    abar = torch.rand(2, 5, 8)
    out = ops.bimodal_update(torch.zeros(2, 5, 8), torch.eye(5).expand(2, 5, 5), abar, torch.eye(8).expand(2, 8, 8))
    torch.testing.assert_close(out, abar)


def test_batch_equals_per_sample():
    args = inputs(4, 13, 9, torch.float32, "cpu", True)
    assert_batch_equals_per_sample(ops.bimodal_update, args, 4)


@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck(normalize):
    for B, S, Q in [(2, 5, 3), (0, 2, 2), (1, 1, 1)]:
        args = inputs(B, S, Q, torch.float32, "cpu", True)
        torch.library.opcheck(torch.ops.relfast.bimodal_update.default, tuple(args), {"normalize": normalize})
