import pytest
import torch

from relfast import ops, reference
from testing import (assert_batch_equals_per_sample, assert_matches_reference, cases, exact, generator,
                     relevance_map, seed_for, to_case)


@pytest.mark.parametrize("device,dtype,shape,contiguous", cases())
def test_matches_float64_reference(device, dtype, shape, contiguous):
    B, _, N = shape
    R = to_case(relevance_map(B, N, N, generator(seed_for("normalize", shape))), dtype, device, contiguous)
    out = ops.normalize_residual(R)
    assert_matches_reference(out, reference.normalize_residual(*exact(R)), dtype)


def test_rows_of_the_residual_sum_to_one():
    R = relevance_map(3, 9, 9, generator(3))
    residual = ops.normalize_residual(R) - torch.eye(9)
    torch.testing.assert_close(residual.sum(-1), torch.ones(3, 9, dtype=torch.float64))


def test_zero_residual_rows_become_identity_rows_not_nan():
    # Row 1 of R - I is all zero (nothing attended to token 1 yet): the reference code divides by 0.
    R = relevance_map(1, 4, 4, generator(4))
    R[0, 1] = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    out = ops.normalize_residual(R)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 1], torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out, reference.normalize_residual(R))


def test_identity_input_is_identity():
    eye = torch.eye(5).expand(2, 5, 5)
    torch.testing.assert_close(ops.normalize_residual(eye), eye)


def test_batch_equals_per_sample():
    R = relevance_map(4, 23, 23, generator(5)).float()
    assert_batch_equals_per_sample(ops.normalize_residual, (R,), 4)


def test_opcheck():
    for B, N in [(2, 5), (0, 3), (1, 1)]:
        R = relevance_map(B, N, N, generator(6)).float()
        torch.library.opcheck(torch.ops.relfast.normalize_residual.default, (R,))
