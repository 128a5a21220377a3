"""relfast.ops.sdpa_row_relevance_update: the streamed rule from q, k, v, ∇O and the log-sum-exp,
against the float64 reference (which forms A and ∇A), at tile edges, with every mask kind."""
import itertools
import math

import pytest
import torch

from relfast import ops, reference
from testing import DEVICES, assert_batch_equals_per_sample, assert_matches_reference, generator, seed_for, to_case

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# The bound for float32 (tighter than the shared 2e-5); the others as for every op.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_to(out, expected, dtype):
    assert_matches_reference(out, expected, dtype, rtol=RTOL[dtype])
# (B, H, H_kv, N, D): N at the CPU kernel's 64-key strips and around them, the papers' 197 / 577,
# a single token, an empty batch; grouped heads (H_kv < H); D not a power of two.
SHAPES = [(2, 4, 4, 63, 16), (1, 4, 2, 64, 16), (2, 3, 3, 65, 8), (1, 2, 1, 127, 32), (2, 2, 2, 129, 24),
          (1, 12, 12, 197, 64), (1, 2, 2, 577, 16), (3, 2, 2, 1, 8), (0, 4, 4, 7, 8)]
MASKS = ["none", "causal", "padding", "additive"]


def scores_bias(kind, B, H, N, gen):
    """(attn_mask, is_causal) of one mask kind, float64; None where there is no mask."""
    if kind == "padding":  # HF's (B, 1, 1, N) key mask: the last samples lose their tail
        keep = torch.ones(B, 1, 1, N, dtype=torch.bool)
        for b in range(1, B):
            keep[b, ..., max(1, N - 5 * b):] = False
        return keep, False
    if kind == "additive":  # per head and query, with -inf entries (never a whole row)
        bias = torch.randn(B, H, N, N, generator=gen, dtype=torch.float64)
        bias[..., 1:][torch.rand(B, H, N, N - 1, generator=gen) < 0.2] = float("-inf")
        return bias, False
    return None, kind == "causal"


def log_sum_exp(q, k, mask, is_causal, scale=None):
    """The row log-sum-exp a fused forward returns, from the same inputs (float64)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.matmul(q, k.transpose(-2, -1)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.logsumexp(s, dim=-1)


def make_inputs(shape, K, dtype, device, contiguous, mask_kind="none", tag="sdpa_rows", Nk=None):
    B, H, Hkv, N, D = shape
    Nk = N if Nk is None else Nk
    gen = generator(seed_for(tag, shape, K, mask_kind, Nk))
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v, dout = 1.5 * rand(B, H, N, D), 1.5 * rand(B, Hkv, Nk, D), rand(B, Hkv, Nk, D), rand(B, H, N, D)
    rows = torch.rand(B, K, N, generator=gen, dtype=torch.float64)
    mask, is_causal = scores_bias(mask_kind, B, H, N, gen) if Nk == N else (None, False)
    # what the kernel gets: everything rounded to `dtype` (the mask too, if additive)
    case = [to_case(t, dtype, device, contiguous) for t in (rows, q, k, v, dout)]
    if mask is not None:
        mask = mask.to(device) if mask.dtype == torch.bool else to_case(mask, dtype, device, contiguous)
    exact = [t.detach().to("cpu", torch.float64) for t in case]
    exact_mask = None if mask is None else (mask.cpu() if mask.dtype == torch.bool else mask.cpu().double())
    lse = log_sum_exp(exact[1], exact[2], exact_mask, is_causal)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # as the fused forwards return it
    lse_case = lse.to(device=device, dtype=lse_dtype)
    return case, lse_case, mask, is_causal, (exact, lse_case.cpu().double(), exact_mask)


def run_both(case, lse, mask, is_causal, expected_inputs, **options):
    out = ops.sdpa_row_relevance_update(*case, lse, mask, is_causal=is_causal, **options)
    exact, exact_lse, exact_mask = expected_inputs
    expected = reference.sdpa_row_relevance_update(*exact, exact_lse, exact_mask, is_causal, **options)
    return out, expected


def params():
    for device, dtype, shape, K, mask in itertools.product(DEVICES, DTYPES, SHAPES, (1, 8, 9), MASKS):
        dev = device.values[0] if hasattr(device, "values") else device
        if dtype in (torch.float16, torch.bfloat16) and shape[3] > 200:
            continue  # the half types at the smaller shapes
        marks = device.marks if hasattr(device, "marks") else ()
        B, H, Hkv, N, D = shape
        yield pytest.param(dev, dtype, shape, K, mask, id=f"{dev}-{str(dtype)[6:]}-B{B}H{H}kv{Hkv}N{N}D{D}-K{K}-{mask}",
                           marks=marks)


@pytest.mark.parametrize("device,dtype,shape,K,mask_kind", params())
def test_matches_float64_reference(device, dtype, shape, K, mask_kind):
    case, lse, mask, is_causal, expected_inputs = make_inputs(shape, K, dtype, device, True, mask_kind)
    out, expected = run_both(case, lse, mask, is_causal, expected_inputs)
    assert_close_to(out, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_non_contiguous_inputs(device, dtype, mask_kind):
    case, lse, mask, is_causal, expected_inputs = make_inputs((2, 4, 2, 65, 16), 3, dtype, device, False, mask_kind)
    assert not case[1].is_contiguous()
    lse = lse.transpose(1, 2).contiguous().transpose(1, 2)  # the (B, N, H) layout CPU flash attention returns
    out, expected = run_both(case, lse, mask, is_causal, expected_inputs)
    assert_close_to(out, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_without_aggregation(device, mask_kind):
    case, lse, mask, is_causal, expected_inputs = make_inputs((2, 4, 4, 70, 16), 2, torch.float32, device, True,
                                                              mask_kind)
    out, expected = run_both(case, lse, mask, is_causal, expected_inputs, aggregate=False)
    assert_close_to(out, expected, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_cross_attention_shapes_without_aggregation(device):
    """Nq != Nk: rows over the queries in, rows over the keys out."""
    case, lse, mask, is_causal, expected_inputs = make_inputs((2, 4, 2, 33, 16), 3, torch.float32, device, True,
                                                              Nk=70)
    out, expected = run_both(case, lse, mask, is_causal, expected_inputs, aggregate=False)
    assert out.shape == (2, 3, 70)
    assert_close_to(out, expected, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_explicit_scale(device):
    case, _, _, _, (exact, _, _) = make_inputs((2, 4, 4, 40, 16), 1, torch.float32, device, True)
    lse = log_sum_exp(exact[1], exact[2], None, False, scale=0.3)
    out = ops.sdpa_row_relevance_update(*case, lse.float().to(device), scale=0.3)
    expected = reference.sdpa_row_relevance_update(*exact, lse.float().double(), scale=0.3)
    assert_close_to(out, expected, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_equals_the_materialised_rule(device):
    """The same numbers as row_relevance_update on the A and ∇A an eager model would hold."""
    case, lse, mask, is_causal, (exact, exact_lse, _) = make_inputs((2, 4, 2, 97, 16), 2, torch.float64, device, True,
                                                                    "causal")
    rows, q, k, v, dout = exact
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-2, -1) / 4).masked_fill(torch.ones(97, 97, dtype=torch.bool).triu(1), float("-inf"))
    A = scores.softmax(-1)  # what SDPA multiplies V by (checked against SDPA itself)
    torch.testing.assert_close(A @ v, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    expected = ops.row_relevance_update(rows, dout @ v.transpose(-2, -1), A)
    out = ops.sdpa_row_relevance_update(*case, lse, is_causal=True)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows_get_no_attention(device):
    """A query row whose every key is masked has log-sum-exp -inf: A = 0 there, not NaN."""
    case, _, _, _, (exact, _, _) = make_inputs((2, 2, 2, 9, 8), 2, torch.float32, device, True)
    keep = torch.ones(2, 2, 9, 9, dtype=torch.bool)
    keep[0, :, 4] = False
    lse = log_sum_exp(exact[1], exact[2], keep, False)
    assert torch.isneginf(lse[0, :, 4]).all()
    out = ops.sdpa_row_relevance_update(*case, lse.float().to(device), keep.to(device))
    expected = reference.sdpa_row_relevance_update(*exact, lse.float().double(), keep)
    assert torch.isfinite(out).all()
    assert_close_to(out, expected, torch.float32)


def test_batch_equals_per_sample():
    case, lse, mask, is_causal, _ = make_inputs((5, 4, 2, 37, 16), 2, torch.float32, "cpu", True, "padding")
    fn = lambda rows, q, k, v, dout, lse, mask: ops.sdpa_row_relevance_update(rows, q, k, v, dout, lse, mask)  # noqa
    assert_batch_equals_per_sample(fn, (*case, lse, mask), 5)


def test_results_do_not_depend_on_the_thread_count():
    case, lse, mask, is_causal, _ = make_inputs((2, 4, 4, 300, 16), 3, torch.float32, "cpu", True, "causal")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.sdpa_row_relevance_update(*case, lse, is_causal=True)
        torch.set_num_threads(max(2, before))
        many = ops.sdpa_row_relevance_update(*case, lse, is_causal=True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@pytest.mark.parametrize("mask_kind", MASKS)
def test_opcheck(mask_kind):
    for shape in [(2, 4, 2, 6, 8), (0, 2, 2, 4, 8), (1, 1, 1, 1, 4)]:
        case, lse, mask, is_causal, _ = make_inputs(shape, 2, torch.float32, "cpu", True, mask_kind)
        torch.library.opcheck(torch.ops.relfast.sdpa_row_relevance_update.default, (*case, lse, mask),
                              {"is_causal": is_causal, "scale": None, "aggregate": True})


def test_scripted_and_compiled():
    case, lse, mask, is_causal, _ = make_inputs((2, 4, 2, 20, 8), 2, torch.float32, "cpu", True, "padding")
    eager = ops.sdpa_row_relevance_update(*case, lse, mask)
    scripted = torch.jit.script(ops.sdpa_row_relevance_update)
    torch.testing.assert_close(scripted(*case, lse, mask), eager, rtol=0, atol=0)
    compiled = torch.compile(lambda *a: ops.sdpa_row_relevance_update(*a), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*case, lse, mask), eager, rtol=0, atol=0)
