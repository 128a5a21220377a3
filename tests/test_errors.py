"""Bad input gets a ValueError that names the op and the argument, before any kernel runs."""
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


def poisoned(t, value, index=(0, 1, 2)):
    t = t.clone()
    t[index] = value
    return t


# (call, words the message must contain)
BAD_CALLS = {
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
                          ["'grad' and 'attn'"]),
    "norm:nan": (lambda: ops.normalize_residual(poisoned(rel(), NAN, (1, 4, 4))), ["argument 'R'"]),
    "bimodal:inf-R_qq": (lambda: ops.bimodal_update(rel(), rel(), rel(), poisoned(rel(), INF)), ["argument 'R_qq'"]),
    "bimodal:nan-R_ss-raw": (lambda: ops.bimodal_update(rel(), poisoned(rel(), NAN), rel(), rel(), normalize=False),
                             ["argument 'R_ss'"]),
    "rollout:nan": (lambda: ops.rollout([attn(), poisoned(attn(), NAN, (1, 1, 1, 1))]), ["'attentions'"]),
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
