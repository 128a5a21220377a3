"""Bad input gets a ValueError that names the op and the argument, before any kernel runs."""
import math

import pytest
import torch

from relfast import ops

NAN, INF = float("nan"), float("inf")


def attn(B=2, H=3, N=5, dtype=torch.float32):
    return torch.rand(B, H, N, N, dtype=dtype).softmax(-1)


def grad(B=2, H=3, N=5, dtype=torch.float32):
    return torch.randn(B, H, N, N, dtype=dtype)


def rel(B=2, N=5, M=None):
    return torch.eye(N, M or N).repeat(B, 1, 1) + 0.01


def full(*shape, value, dtype=torch.float16):
    return torch.full(shape, value, dtype=dtype)


def nearly_cancelling_rows(dtype, tiny):
    """R with row 0 of R - I equal to (0, 1, -1, tiny, 0): its sum is `tiny`, so the normalised
    row holds 1 / tiny, beyond the dtype's range although every input is finite."""
    R = torch.eye(5, dtype=dtype).repeat(2, 1, 1)
    R[:, 0, 1:4] = torch.tensor([1.0, -1.0, tiny], dtype=dtype)
    assert R[0, 0, 3] > 0  # the tiny value is representable (subnormal), not flushed to 0
    return R


def poisoned(t, value, index=(0, 1, 2)):
    t = t.clone()
    t[index] = value
    return t


def sdpa(**changed):
    """ops.sdpa_row_relevance_update on valid (B=2, H=4, H_kv=2, N=5, D=3) inputs, with `changed`
    arguments replaced."""
    args = dict(v=torch.rand(2, 1, 5), query=torch.randn(2, 4, 5, 3), key=torch.randn(2, 2, 5, 3),
                value=torch.randn(2, 2, 5, 3), grad_out=torch.randn(2, 4, 5, 3), logsumexp=torch.randn(2, 4, 5))
    args.update(changed)
    return ops.sdpa_row_relevance_update(**args)


# (call, words the message must contain)
BAD_CALLS = {
    "sdpa:rank-v": (lambda: sdpa(v=torch.rand(2, 5)), ["relfast.sdpa_row_relevance_update:", "'v'", "3-D"]),
    "sdpa:rank-query": (lambda: sdpa(query=torch.randn(4, 5, 3)), ["'query'", "4-D", "(B, H, Nq, D)"]),
    "sdpa:tokens": (lambda: sdpa(v=torch.rand(2, 1, 6)), ["'query'", "token count"]),
    "sdpa:batch": (lambda: sdpa(key=torch.randn(3, 2, 5, 3)), ["'key'", "batch size"]),
    "sdpa:head-dim": (lambda: sdpa(key=torch.randn(2, 2, 5, 4)), ["'key'", "head dimension"]),
    "sdpa:groups": (lambda: sdpa(key=torch.randn(2, 3, 5, 3), value=torch.randn(2, 3, 5, 3)),
                    ["'key'", "multiple", "grouped-query"]),
    "sdpa:value-keys": (lambda: sdpa(value=torch.randn(2, 2, 6, 3)), ["'value'", "key count"]),
    "sdpa:grad-out-heads": (lambda: sdpa(grad_out=torch.randn(2, 2, 5, 3)), ["'grad_out'", "head count"]),
    "sdpa:lse-shape": (lambda: sdpa(logsumexp=torch.randn(2, 4, 6)), ["'logsumexp'", "token count"]),
    "sdpa:cross-aggregate": (lambda: sdpa(key=torch.randn(2, 2, 7, 3), value=torch.randn(2, 2, 7, 3)),
                             ["aggregate=True", "self-attention", "Nk = 7"]),
    "sdpa:mask-shape": (lambda: sdpa(attn_mask=torch.ones(2, 1, 1, 4, dtype=torch.bool)), ["'attn_mask'", "broadcast"]),
    "sdpa:mask-dtype": (lambda: sdpa(attn_mask=torch.ones(2, 1, 1, 5, dtype=torch.long)), ["'attn_mask'", "bool"]),
    "sdpa:mask-nan": (lambda: sdpa(attn_mask=poisoned(torch.zeros(2, 1, 5, 5), NAN, (1, 0, 2, 3))), ["'attn_mask'", "NaN"]),
    "sdpa:mixed-dtype": (lambda: sdpa(value=torch.randn(2, 2, 5, 3, dtype=torch.float64)), ["'value'", "dtype"]),
    "sdpa:integer": (lambda: sdpa(query=torch.ones(2, 4, 5, 3, dtype=torch.long)), ["'query'", "float16"]),
    "sdpa:nan-query": (lambda: sdpa(query=poisoned(torch.randn(2, 4, 5, 3), NAN)), ["'query'", "finite"]),
    "sdpa:inf-grad-out": (lambda: sdpa(grad_out=poisoned(torch.randn(2, 4, 5, 3), INF)), ["'grad_out'", "finite"]),
    "sdpa:nan-lse": (lambda: sdpa(logsumexp=poisoned(torch.randn(2, 4, 5), NAN, (1, 2, 3))), ["'logsumexp'", "NaN"]),
    "sdpa:inf-scale": (lambda: sdpa(scale=INF), ["'scale'", "finite"]),
    "sdpa:head-dim-0": (lambda: sdpa(query=torch.randn(2, 4, 5, 0), key=torch.randn(2, 2, 5, 0)),
                        ["'query'", "head dimension 0"]),
    "sdpa:device": (lambda: sdpa(grad_out=torch.randn(2, 4, 5, 3, device="meta")), ["'grad_out'", "device"]),
    "sdpa:overflow-fp16": (lambda: sdpa(v=full(2, 1, 5, value=3e4), query=full(2, 4, 5, 3, value=0),
                                        key=full(2, 2, 5, 3, value=0), value=full(2, 2, 5, 3, value=100),
                                        grad_out=full(2, 4, 5, 3, value=100),
                                        logsumexp=torch.full((2, 4, 5), math.log(5))),
                            ["relfast.sdpa_row_relevance_update:", "result overflowed"]),
    # wrong rank
    "head:rank": (lambda: ops.head_mean_grad_attn(grad()[0], attn()), ["head_mean_grad_attn", "'grad'", "4-D"]),
    "rel:rank": (lambda: ops.relevance_update(rel()[0], rel()), ["relevance_update", "'R'", "3-D"]),
    "row:rank-v": (lambda: ops.row_relevance_update(torch.rand(2, 5), grad(), attn()), ["'v'", "3-D"]),
    "norm:rank": (lambda: ops.normalize_residual(rel()[0]), ["normalize_residual", "'R'", "3-D"]),
    "bimodal:rank": (lambda: ops.bimodal_update(rel(), rel(), rel(), rel()[0]), ["bimodal_update", "'R_qq'"]),
    "rollout:rank": (lambda: ops.rollout([attn(), attn()[0]]), ["rollout", "'attentions[1]'", "4-D"]),
    # mismatched shapes
    "head:shape": (lambda: ops.head_mean_grad_attn(grad(N=5), attn(N=6)), ["'grad'", "'attn'", "same shape"]),
    "rel:abar-rows": (lambda: ops.relevance_update(rel(N=5), rel(N=6)), ["'abar'", "dimension 1"]),
    "rel:batch": (lambda: ops.relevance_update(rel(B=2), rel(B=3)), ["'abar'", "batch size"]),
    "row:tokens": (lambda: ops.row_relevance_update(torch.rand(2, 1, 6), grad(), attn()), ["'grad'", "token count"]),
    "row:batch": (lambda: ops.row_relevance_update(torch.rand(3, 1, 5), grad(), attn()), ["'grad'", "batch size"]),
    "row:not-square": (lambda: ops.row_relevance_update(torch.rand(2, 1, 5), grad()[..., :4], attn()[..., :4]),
                       ["'grad'", "square"]),
    "norm:not-square": (lambda: ops.normalize_residual(rel(N=5, M=4)), ["'R'", "square"]),
    "bimodal:abar": (lambda: ops.bimodal_update(rel(N=4, M=3), rel(N=4), rel(N=4, M=4), rel(N=3)), ["'abar'", "Q"]),
    "rollout:layers": (lambda: ops.rollout([attn(N=5), attn(N=6)]), ["'attentions[1]'", "shape of attentions[0]"]),
    "rollout:empty": (lambda: ops.rollout([]), ["'attentions'", "empty"]),
    "rollout:start": (lambda: ops.rollout([attn(), attn()], 2), ["'start_layer'", "[-2, 2)"]),
    "head:no-heads": (lambda: ops.head_mean_grad_attn(grad(H=0), attn(H=0)), ["'grad'", "at least one head"]),
    # dtypes
    "head:int": (lambda: ops.head_mean_grad_attn(grad().int(), attn().int()), ["'grad'", "float16, bfloat16"]),
    "rel:int": (lambda: ops.relevance_update(rel().long(), rel().long()), ["'R'", "float32"]),
    "row:mixed": (lambda: ops.row_relevance_update(torch.rand(2, 1, 5), grad().double(), attn()),
                  ["'grad'", "dtype of 'v'"]),
    "bimodal:mixed": (lambda: ops.bimodal_update(rel(), rel().half(), rel(), rel()), ["'R_ss'", "dtype"]),
    "rollout:mixed": (lambda: ops.rollout([attn(), attn(dtype=torch.float64)]), ["'attentions[1]'", "dtype"]),
    "head:complex": (lambda: ops.head_mean_grad_attn(grad().cfloat(), attn().cfloat()), ["'grad'", "float32"]),
    # NaN / inf
    "head:nan": (lambda: ops.head_mean_grad_attn(poisoned(grad(), NAN, (1, 2, 3, 4)), attn()), ["NaN or infinite"]),
    "head:-inf": (lambda: ops.head_mean_grad_attn(poisoned(grad(), -INF, (0, 0, 0, 0)), attn()), ["NaN or infinite"]),
    "head:inf-attn": (lambda: ops.head_mean_grad_attn(grad(), poisoned(attn(), INF, (1, 0, 4, 4))), ["'attn'"]),
    "rel:nan-R": (lambda: ops.relevance_update(poisoned(rel(), NAN), rel()), ["argument 'R'", "NaN"]),
    "rel:inf-abar": (lambda: ops.relevance_update(rel(), poisoned(rel(), INF)), ["argument 'abar'", "infinite"]),
    "row:nan-v": (lambda: ops.row_relevance_update(poisoned(torch.rand(2, 1, 5), NAN, (1, 0, 3)), grad(), attn()),
                  ["argument 'v'"]),
    "row:inf-grad": (lambda: ops.row_relevance_update(torch.rand(2, 1, 5), poisoned(grad(), -INF, (1, 2, 4, 0)), attn()),
                     ["'grad' and 'attn'", "NaN or infinite"]),
    "row:nan-many-rows": (lambda: ops.row_relevance_update(torch.rand(2, 20, 5), grad(), poisoned(attn(), NAN, (0, 2, 0, 1))),
                          ["relfast.row_relevance_update:", "'grad' and 'attn'"]),
    "norm:nan": (lambda: ops.normalize_residual(poisoned(rel(), NAN, (1, 4, 4))), ["argument 'R'"]),
    "bimodal:inf-R_qq": (lambda: ops.bimodal_update(rel(), rel(), rel(), poisoned(rel(), INF)), ["argument 'R_qq'"]),
    "bimodal:nan-R_ss-raw": (lambda: ops.bimodal_update(rel(), poisoned(rel(), NAN), rel(), rel(), normalize=False),
                             ["argument 'R_ss'"]),
    "rollout:nan": (lambda: ops.rollout([attn(), poisoned(attn(), NAN, (1, 1, 1, 1))]), ["'attentions'"]),
    # finite inputs whose result overflows its dtype: an error, never an inf result
    "head:overflow-fp16": (lambda: ops.head_mean_grad_attn(full(2, 3, 5, 5, value=200), full(2, 3, 5, 5, value=400)),
                           ["relfast.head_mean_grad_attn:", "result overflowed", "Half", "65504"]),
    "rel:overflow-fp16": (lambda: ops.relevance_update(full(2, 5, 5, value=300), full(2, 5, 5, value=300)),
                          ["relfast.relevance_update:", "result overflowed"]),
    "rel:overflow-fp32": (lambda: ops.relevance_update(full(2, 5, 5, value=1e20, dtype=torch.float32),
                                                       full(2, 5, 5, value=1e20, dtype=torch.float32)),
                          ["relfast.relevance_update:", "result overflowed", "Float"]),
    "row:overflow-fp16": (lambda: ops.row_relevance_update(full(2, 1, 5, value=300), full(2, 3, 5, 5, value=200),
                                                           full(2, 3, 5, 5, value=300)),
                          ["relfast.row_relevance_update:", "result overflowed"]),
    "row:overflow-fp16-many-rows": (lambda: ops.row_relevance_update(full(2, 20, 5, value=300), full(2, 3, 5, 5, value=200),
                                                                     full(2, 3, 5, 5, value=300)),
                                    ["relfast.row_relevance_update:", "result overflowed"]),
    "norm:overflow-fp16": (lambda: ops.normalize_residual(nearly_cancelling_rows(torch.float16, tiny=6e-8)),
                           ["relfast.normalize_residual:", "result overflowed"]),
    "norm:overflow-fp32": (lambda: ops.normalize_residual(nearly_cancelling_rows(torch.float32, tiny=1e-45)),
                           ["relfast.normalize_residual:", "result overflowed"]),
    "bimodal:overflow-fp16": (lambda: ops.bimodal_update(*[full(2, 5, 5, value=300)] * 4, normalize=False),
                              ["relfast.bimodal_update:", "result overflowed"]),
    # devices (a meta tensor stands in for a second device on a machine without a GPU)
    "head:device": (lambda: ops.head_mean_grad_attn(grad(), attn().to("meta")), ["'attn'", "device"]),
    "rel:device": (lambda: ops.relevance_update(rel(), rel().to("meta")), ["'abar'", "device"]),
    "row:device": (lambda: ops.row_relevance_update(torch.rand(2, 1, 5), grad().to("meta"), attn()), ["'grad'", "device"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_value_error_naming_the_argument(case):
    call, words = BAD_CALLS[case]
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert message.startswith("relfast.") or "relfast." in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


NOT_TENSORS = {
    "head:numpy": (lambda: ops.head_mean_grad_attn(grad().numpy(), attn()), ["relfast.head_mean_grad_attn:", "'grad'",
                                                                           "numpy.ndarray", "torch.from_numpy"]),
    "rel:numpy-abar": (lambda: ops.relevance_update(rel(), rel().numpy()), ["relfast.relevance_update:", "'abar'"]),
    "rel_:list": (lambda: ops.relevance_update_(rel(), rel().tolist()), ["relfast.relevance_update_:", "'abar'", "list"]),
    "row:numpy-attn": (lambda: ops.row_relevance_update(torch.rand(2, 1, 5), grad(), attn().numpy()), ["'attn'"]),
    "norm:numpy": (lambda: ops.normalize_residual(rel().numpy()), ["relfast.normalize_residual:", "'R'"]),
    "bimodal:numpy": (lambda: ops.bimodal_update(rel(), rel(), rel(), rel().numpy()), ["'R_qq'"]),
    "rollout:numpy-layer": (lambda: ops.rollout([attn(), attn().numpy()]), ["relfast.rollout:", "'attentions[1]'"]),
    "rollout:tensor-not-list": (lambda: ops.rollout(attn()), ["relfast.rollout:", "'attentions'", "list"]),
    "sdpa:numpy-lse": (lambda: sdpa(logsumexp=torch.randn(2, 4, 5).numpy()), ["relfast.sdpa_row_relevance_update:",
                                                                          "'logsumexp'", "torch.from_numpy"]),
    "sdpa:list-mask": (lambda: sdpa(attn_mask=[[True] * 5] * 5), ["'attn_mask'", "list"]),
}


@pytest.mark.parametrize("case", sorted(NOT_TENSORS))
def test_arguments_that_are_not_tensors_raise_type_error_naming_them(case):
    call, words = NOT_TENSORS[case]
    with pytest.raises(TypeError) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"


def test_a_result_within_range_is_not_refused():
    # Just below float16's largest value: the result check must not misfire.
    out = ops.head_mean_grad_attn(full(1, 2, 3, 3, value=200), full(1, 2, 3, 3, value=300))
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all()) and float(out.max()) == 60000


@pytest.mark.parametrize("call,shape", [
    (lambda m: ops.head_mean_grad_attn(grad().to(m), attn().to(m)), (2, 5, 5)),
    (lambda m: ops.relevance_update(rel().to(m), rel().to(m)), (2, 5, 5)),
    (lambda m: ops.row_relevance_update(torch.rand(2, 3, 5, device=m), grad().to(m), attn().to(m)), (2, 3, 5)),
    (lambda m: ops.normalize_residual(rel().to(m)), (2, 5, 5)),
    (lambda m: ops.bimodal_update(*[rel().to(m)] * 4), (2, 5, 5)),
    (lambda m: ops.rollout([attn().to(m)] * 2), (2, 5, 5)),
    (lambda m: ops.sdpa_row_relevance_update(torch.rand(2, 3, 5, device=m), *[torch.randn(2, 4, 5, 8, device=m)] * 4,
                                             torch.randn(2, 4, 5, device=m)), (2, 3, 5)),
])
def test_meta_tensors_give_the_output_shape_without_reading_values(call, shape):
    # Shape propagation (torch.compile, export, model sizing) reads no values: no finiteness check runs.
    out = call("meta")
    assert out.device.type == "meta" and tuple(out.shape) == shape


def test_inplace_update_leaves_R_untouched_on_overflow():
    R = full(2, 5, 5, value=300)
    with pytest.raises(ValueError, match="result overflowed"):
        ops.relevance_update_(R, full(2, 5, 5, value=300))
    assert bool((R == 300).all())


def test_inplace_update_leaves_R_untouched_on_bad_abar():
    R = rel()
    before = R.clone()
    with pytest.raises(ValueError):
        ops.relevance_update_(R, poisoned(rel(), NAN))
    torch.testing.assert_close(R, before)


def test_finite_inputs_with_zeros_are_not_rejected():
    # inf * 0 would be NaN, but plain zeros are fine: the check must not misfire.
    g, a = grad(), attn()
    g[0, 0] = 0
    assert torch.isfinite(ops.head_mean_grad_attn(g, a)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixed_cpu_cuda_raises():
    with pytest.raises(ValueError, match="device"):
        ops.head_mean_grad_attn(grad().cuda(), attn())
