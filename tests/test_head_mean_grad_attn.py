import pytest
import torch

from relfast import ops, reference
from testing import (assert_batch_equals_per_sample, assert_matches_reference, attention, cases, exact, generator,
                     gradient, seed_for, to_case)


@pytest.mark.parametrize("device,dtype,shape,contiguous", cases())
def test_matches_float64_reference(device, dtype, shape, contiguous):
    B, H, N = shape
    gen = generator(seed_for("head_mean", shape))
    grad = to_case(gradient(B, H, N, N, gen), dtype, device, contiguous)
    attn = to_case(attention(B, H, N, N, gen), dtype, device, contiguous)
    out = ops.head_mean_grad_attn(grad, attn)
    assert_matches_reference(out, reference.head_mean_grad_attn(*exact(grad, attn)), dtype)


@pytest.mark.parametrize("Nq,Nk", [(5, 9), (1, 577), (197, 1)])
def test_rectangular_maps(Nq, Nk):
    gen = generator(seed_for("head_mean_rect", Nq, Nk))
    grad, attn = gradient(2, 3, Nq, Nk, gen).float(), attention(2, 3, Nq, Nk, gen).float()
    assert_matches_reference(ops.head_mean_grad_attn(grad, attn),
                             reference.head_mean_grad_attn(*exact(grad, attn)), torch.float32)


def test_clamps_each_head_before_the_mean():
    # Two heads whose products are +1 and -1: clamp-then-mean gives 0.5, mean-then-clamp 0.
    grad = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
    attn = torch.ones(1, 2, 1, 1)
    assert ops.head_mean_grad_attn(grad, attn).item() == 0.5


def test_batch_equals_per_sample():
    gen = generator(1)
    grad, attn = gradient(5, 12, 23, 23, gen).float(), attention(5, 12, 23, 23, gen).float()
    assert_batch_equals_per_sample(ops.head_mean_grad_attn, (grad, attn), 5)


@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (0, 2, 4, 4), (1, 1, 7, 3)])
def test_opcheck(shape):
    gen = generator(2)
    grad, attn = gradient(*shape, gen).float(), attention(*shape, gen).float()
    torch.library.opcheck(torch.ops.relfast.head_mean_grad_attn.default, (grad, attn))
