"""The capture alone: what it records for each way a model can run attention equals the
probabilities and the gradient ∇A of an explicit float64 softmax attention, and the model's
output is what it computes without relfast."""
import pytest
import torch
import torch.nn.functional as F

from relfast.explain.capture import AttentionCapture, ProbabilityRecord, SdpaRecord


def explicit(query, key, value, bias, scale):
    """Plain attention with the probabilities in the graph (the reference)."""
    repeats = query.shape[-3] // key.shape[-3]
    key, value = key.repeat_interleave(repeats, dim=-3), value.repeat_interleave(repeats, dim=-3)
    scores = query @ key.transpose(-2, -1) * scale
    if bias is not None:
        scores = scores + bias
    probabilities = scores.softmax(dim=-1)
    return probabilities @ value, probabilities


def as_bias(mask, causal, n_q, n_k):
    bias = torch.zeros(n_q, n_k, dtype=torch.float64)
    if causal:
        bias = bias.masked_fill(~torch.ones(n_q, n_k, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        bias = bias + (torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
                       if mask.dtype == torch.bool else mask)
    return bias


# (B, H_q, H_kv, N_q, N_k, mask kind, causal, strided q/k/v)
CASES = [(3, 4, 4, 7, 7, None, False, False), (1, 1, 1, 1, 1, None, False, False),
         (2, 4, 2, 197, 197, None, True, False), (3, 6, 2, 9, 9, "bool", False, True),
         (2, 4, 4, 5, 11, "float", False, True), (0, 4, 4, 7, 7, None, False, False)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}Hq{}Hkv{}Nq{}Nk{}-{}-{}-{}".format(*c))
def test_sdpa_record_equals_explicit_attention(case):
    B, Hq, Hkv, Nq, Nk, mask_kind, causal, strided = case
    g = torch.Generator().manual_seed(sum(case[:5]))
    d = 8

    def tensor(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        return t.transpose(1, 2).contiguous().transpose(1, 2) if strided else t  # (B, N, H, d) memory, as HF

    query, key, value = tensor(B, Hq, Nq, d), tensor(B, Hkv, Nk, d), tensor(B, Hkv, Nk, d)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, Nq, Nk, generator=g) > 0.3
        mask[..., 0] = True  # every query sees one key
    elif mask_kind == "float":
        mask = torch.randn(B, 1, Nq, Nk, generator=g, dtype=torch.float64)
        mask[..., 1] = float("-inf")
    query, key, value = (t.requires_grad_() for t in (query, key, value))
    capture = AttentionCapture()
    with torch.enable_grad(), capture:
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal,
                                                enable_gqa=Hq != Hkv)
    (record,) = capture.records
    assert isinstance(record, SdpaRecord) and record.shape == (B, Hq, Nq, Nk)
    expected_output, expected_probabilities = explicit(query, key, value, as_bias(mask, causal, Nq, Nk), d ** -0.5)
    torch.testing.assert_close(output, expected_output)
    torch.testing.assert_close(record.probabilities(), expected_probabilities.detach())
    output_grad = torch.randn(output.shape, generator=g, dtype=torch.float64)
    (expected_grad,) = torch.autograd.grad(expected_output, expected_probabilities, output_grad, retain_graph=True)
    torch.testing.assert_close(record.attention_gradient(output_grad), expected_grad)
    assert record.source is output
    # the call's own backward (which reuses A and ∇A) gives the input gradients of explicit attention
    if B == 0:
        return
    expected_inputs = torch.autograd.grad(expected_output, (query, key, value), output_grad)
    got = torch.autograd.grad(output, (query, key, value), output_grad)
    for name, g, e in zip("qkv", got, expected_inputs):
        torch.testing.assert_close(g, e, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("reuse", [True, False], ids=["after-the-method", "alone"])
def test_sdpa_backward_with_a_learned_float_mask(reuse):
    """The mask's gradient too (position biases are learned), whether or not the method has
    computed A and ∇A for the layer first."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    capture = AttentionCapture()
    with torch.enable_grad(), capture:
        output = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    output_grad = torch.randn(output.shape, generator=g, dtype=torch.float64)
    if reuse:
        capture.records[0].probabilities()
        capture.records[0].attention_gradient(output_grad)
    expected_output, _ = explicit(q, k, v, bias, 0.5)
    got = torch.autograd.grad(output, (q, k, v, bias), output_grad)
    expected = torch.autograd.grad(expected_output, (q, k, v, bias), output_grad)
    for g_, e in zip(got, expected):
        torch.testing.assert_close(g_, e)


def test_sdpa_record_half_precision_accumulates_in_float32():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 77, 16, generator=g, dtype=torch.float64) for _ in range(3))
    capture = AttentionCapture()
    with capture:
        F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    _, expected = explicit(q.bfloat16().double(), k.bfloat16().double(), v, None, 0.25)
    got = capture.records[0].probabilities()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected, rtol=1.6e-2, atol=1e-3)


def test_a_fully_masked_query_row_gets_finite_probabilities():
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 0, :] = False  # a padding query that sees nothing
    capture = AttentionCapture()
    with capture:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    probabilities = capture.records[0].probabilities()
    assert torch.isfinite(probabilities).all()
    _, expected = explicit(q, k, v, as_bias(mask, False, 4, 4), 8 ** -0.5)  # NaN in the masked row
    torch.testing.assert_close(probabilities[..., 1:, :], expected[..., 1:, :])


@pytest.mark.parametrize("explicit_attention", [False, True])
def test_multihead_attention_record_and_unchanged_output(explicit_attention):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).double().eval()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    plain, _ = mha(x, x, x, need_weights=False)
    capture = AttentionCapture(explicit=explicit_attention)
    with torch.enable_grad(), capture:
        output, weights = mha(x, x, x, need_weights=False)
    assert weights is None  # the caller gets what it asked for
    torch.testing.assert_close(output, plain)
    (record,) = capture.records
    assert isinstance(record, ProbabilityRecord) and record.shape == (3, 4, 7, 7)
    _, reference = mha(x, x, x, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(record.probabilities(), reference.detach())
    # the recorded source is the tensor that multiplies V: its gradient is ∇A of explicit attention
    output_grad = torch.randn_like(output)
    (source_grad,) = torch.autograd.grad(output, record.source, output_grad)
    q, k, v = (t.view(3, 7, 4, 4).transpose(1, 2) for t in F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1))
    probabilities = (q @ k.transpose(-2, -1) / 2).softmax(dim=-1)
    explicit_output = mha.out_proj((probabilities @ v).transpose(1, 2).reshape(3, 7, 16))
    (expected,) = torch.autograd.grad(explicit_output, probabilities, output_grad)
    torch.testing.assert_close(record.attention_gradient(source_grad), expected)


def test_parameters_reach_ops_detached_and_embeddings_start_the_graph():
    embedding = torch.nn.Embedding(10, 4)
    linear = torch.nn.Linear(4, 2)
    with torch.enable_grad(), AttentionCapture():
        hidden = embedding(torch.tensor([[1, 2, 3]]))
        out = linear(hidden)
    assert hidden.requires_grad and hidden.grad_fn is None  # a leaf: nothing below it is differentiated
    assert out.requires_grad
    assert torch.autograd.grad(out.sum(), hidden)[0].shape == hidden.shape
    with pytest.raises(RuntimeError):  # the weights are not in the graph
        torch.autograd.grad(out.sum(), linear.weight)
    assert embedding.weight.requires_grad and linear.weight.requires_grad  # flags untouched


def test_dropout_in_attention_is_refused():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"model\.eval\(\)"), AttentionCapture():
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
