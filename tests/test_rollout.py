import pytest
import torch

from relfast import ops, reference
from testing import (SMALL_SHAPES, assert_batch_equals_per_sample, assert_matches_reference, attention, cases, exact,
                     generator, seed_for, to_case)


def layers(shape, L, dtype, device, contiguous):
    B, H, N = shape
    gen = generator(seed_for("rollout", shape, L))
    return [to_case(attention(B, H, N, N, gen), dtype, device, contiguous) for _ in range(L)]


@pytest.mark.parametrize("start_layer", [0, 1, -1])
@pytest.mark.parametrize("device,dtype,shape,contiguous", cases(dtypes=[torch.float64, torch.float32]) +
                         cases(shapes=SMALL_SHAPES, dtypes=[torch.float16, torch.bfloat16]))
def test_matches_float64_reference(device, dtype, shape, contiguous, start_layer):
    attentions = layers(shape, 3, dtype, device, contiguous)
    out = ops.rollout(attentions, start_layer)
    assert_matches_reference(out, reference.rollout(exact(*attentions), start_layer), dtype)


def test_rows_are_stochastic():
    # Each factor is row-stochastic, so the product is too.
    out = ops.rollout(layers((2, 12, 50), 6, torch.float64, "cpu", True))
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 50, dtype=torch.float64))


def test_single_layer_is_half_attention_half_identity():
    attn = layers((1, 4, 9), 1, torch.float64, "cpu", True)[0]
    expected = 0.5 * (attn.mean(1) + torch.eye(9, dtype=torch.float64))
    torch.testing.assert_close(ops.rollout([attn]), expected)


def test_start_layer_skips_the_first_layers():
    attentions = layers((2, 3, 8), 4, torch.float64, "cpu", True)
    torch.testing.assert_close(ops.rollout(attentions, 2), ops.rollout(attentions[2:]))
    torch.testing.assert_close(ops.rollout(attentions, -1), ops.rollout(attentions[-1:]))


def test_batch_equals_per_sample():
    attentions = layers((4, 12, 21), 3, torch.float32, "cpu", True)
    whole = ops.rollout(attentions)
    for b in range(4):
        torch.testing.assert_close(whole[b:b + 1], ops.rollout([a[b:b + 1] for a in attentions]), rtol=1e-6, atol=1e-7)


def test_opcheck():
    for shape, L, start in [((2, 3, 5), 3, 0), ((0, 2, 4), 2, 1), ((1, 1, 1), 1, -1)]:
        attentions = layers(shape, L, torch.float32, "cpu", True)
        torch.library.opcheck(torch.ops.relfast.rollout.default, (attentions, start))
