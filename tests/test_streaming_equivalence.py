"""docs/METHODS.md's "how relfast computes it": rows of R_L = (I + Ā_L) ··· (I + Ā_1) computed in backward order
with row_relevance_update equal the rows of the forward-order product from relevance_update."""
import pytest
import torch

from relfast import ops
from testing import RTOL, attention, generator, gradient, seed_for


def layers(B, H, N, L, dtype, seed):
    gen = generator(seed)
    return [(gradient(B, H, N, N, gen).to(dtype), attention(B, H, N, N, gen).to(dtype)) for _ in range(L)]


def forward_order_product(maps, B, N, dtype, aggregate=True):
    R = torch.eye(N, dtype=dtype).repeat(B, 1, 1)
    for grad, attn in maps:
        R = ops.relevance_update(R, ops.head_mean_grad_attn(grad, attn), aggregate=aggregate)
    return R


def backward_order_rows(maps, rows, B, N, dtype, aggregate=True):
    v = torch.zeros(B, len(rows), N, dtype=dtype)
    v[:, torch.arange(len(rows)), torch.tensor(rows)] = 1
    for grad, attn in reversed(maps):
        v = ops.row_relevance_update(v, grad, attn, aggregate=aggregate)
    return v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,H,N,L", [(1, 12, 197, 12), (3, 4, 7, 5), (2, 1, 1, 3), (2, 12, 577, 3)])
def test_cls_row_equals_forward_product(dtype, B, H, N, L):
    maps = layers(B, H, N, L, dtype, seed_for("stream", B, H, N, L))
    full = forward_order_product(maps, B, N, dtype)
    row = backward_order_rows(maps, [0], B, N, dtype)
    scale = full[:, 0].abs().max().item()
    torch.testing.assert_close(row[:, 0], full[:, 0], rtol=RTOL[dtype] * 5, atol=RTOL[dtype] * 5 * scale)


@pytest.mark.parametrize("rows", [[0, 5], [3, 0, 9, 1], list(range(12))])
def test_several_rows_equal_forward_product(rows):
    B, H, N, L = 2, 3, 17, 4
    maps = layers(B, H, N, L, torch.float64, seed_for("rows", tuple(rows)))
    full = forward_order_product(maps, B, N, torch.float64)
    torch.testing.assert_close(backward_order_rows(maps, rows, B, N, torch.float64), full[:, rows])


def test_without_aggregation_equals_plain_product():
    B, H, N, L = 2, 3, 11, 4
    maps = layers(B, H, N, L, torch.float64, 7)
    full = forward_order_product(maps, B, N, torch.float64, aggregate=False)
    torch.testing.assert_close(backward_order_rows(maps, [0], B, N, torch.float64, aggregate=False), full[:, [0]])
