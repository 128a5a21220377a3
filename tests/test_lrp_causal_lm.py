"""[P1] relevance methods (transformer_attribution, partial_lrp, lrp) on HF causal LMs: GPT-2
(Conv1D as addmm, gelu_new written out), Llama, Qwen2 and Mistral (RMSNorm written out, rotary
embeddings, grouped-query heads, gated MLPs). A padded batch with K targets equals a float64
per-sample implementation written apart from the engine (tests/lrp_reference.py); the CVPR rules
conserve relevance block by block; the model is left as it was."""
import pytest
import torch

import relfast
from relfast.explain.lrp import RelevanceCapture, rules

import engine_models as em
from lrp_reference import gpt2_relevance, llama_relevance
from test_lrp import TEXTBOOK, conservation_violations  # Lemma 2, as for the encoders

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

METHODS = ("transformer_attribution", "partial_lrp", "lrp")
TARGETS = torch.tensor([[0, 2], [17, 3], [42, 0]])  # K = 2 next tokens per sample, batch 3
REFERENCE = {"gpt2": gpt2_relevance, "llama": llama_relevance, "qwen2": llama_relevance, "mistral": llama_relevance}
TOLERANCE = 1e-4  # relative to the map's largest entry (issue 20)


def padded_inputs(name, side):
    inputs = em.inputs_for(name)  # lengths 9, 6, 4, padded on the left (as for generation)
    if side == "right":
        inputs["attention_mask"] = inputs["attention_mask"].flip(-1)
    return inputs


def relative_error(got, expected):
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_padded_batch_with_k_targets_equals_the_per_sample_reference(name, method):
    model = em.build(name)
    inputs = padded_inputs(name, "left")
    out = relfast.Explainer(model, method, **TEXTBOOK.get(method, {}))(inputs, target=TARGETS)
    assert tuple(out.relevance.shape) == (3, 2, inputs["input_ids"].shape[1]) and not out.pixel_level
    for b in range(3):
        single, tokens = em.real_tokens(name, inputs, b)
        got = out.relevance[b]
        assert float(got[:, :tokens.start].abs().max() if tokens.start else 0) == 0  # padding: no relevance
        for k in range(2):
            expected = REFERENCE[name](model, single["input_ids"][0], int(TARGETS[b, k]), method)
            assert float(expected.abs().max()) > 0
            assert relative_error(got[k, tokens].double(), expected) <= TOLERANCE, (b, k)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_right_padding_and_start_layer(name):
    """Right padding (positions from the mask) and the last layer only: the same reference."""
    model = em.build(name)
    inputs = padded_inputs(name, "right")
    out = relfast.Explainer(model, "transformer_attribution", start_layer=-1)(inputs, target=TARGETS)
    for b in range(3):
        n = int(inputs["attention_mask"][b].sum())
        for k in range(2):
            expected = REFERENCE[name](model, inputs["input_ids"][b, :n], int(TARGETS[b, k]),
                                       "transformer_attribution", start_layer=-1)
            assert relative_error(out.relevance[b, k, :n].double(), expected) <= TOLERANCE


def test_default_targets_are_the_predicted_next_tokens():
    model = em.build("qwen2")
    inputs = padded_inputs("qwen2", "left")
    out = relfast.Explainer(model, "lrp")(inputs)
    logits = model(**inputs, use_cache=False,
                   position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)).logits[:, -1]
    assert torch.equal(out.target.flatten(), logits.argmax(-1))


# ---- conservation (seed 000, Lemma 2), block by block ----

def blocks_of(model):
    """(decoder layers, their attention module, their MLP) of either family."""
    if hasattr(model, "transformer"):
        return [(block, block.attn, block.mlp) for block in model.transformer.h]
    return [(layer, layer.self_attn, layer.mlp) for layer in model.model.layers]


def relevance_through_blocks(model, inputs, target, conserve):
    """Per layer (L, B): relevance sums at the block's input and output and at its two residual
    branches, from a relevance pass with the test's own forward hooks (removed after)."""
    seen = {"in": [], "out": [], "attention": [], "mlp": []}

    def keep(*names):
        def hook(module, args, out):
            first = out[0] if isinstance(out, tuple) else out
            values = {"in": args[0] if args else None, "out": first, "attention": first, "mlp": first}
            for name in names:
                seen[name].append(values[name])
        return hook

    hooks = []
    for block, attention, mlp in blocks_of(model):
        hooks += [block.register_forward_hook(keep("in", "out")), attention.register_forward_hook(keep("attention")),
                  mlp.register_forward_hook(keep("mlp"))]
    mask = inputs["attention_mask"]
    try:
        with torch.enable_grad(), RelevanceCapture(conserve):
            logits = model(input_ids=inputs["input_ids"], attention_mask=mask, use_cache=False,
                           position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits[:, -1]
    finally:
        for hook in hooks:
            hook.remove()
    assert all(len(v) == len(blocks_of(model)) for v in seen.values())
    seed = torch.zeros_like(logits)
    seed[torch.arange(len(target)), target] = 1
    names = ["in", "out", "attention", "mlp"]
    relevance = torch.autograd.grad(logits, [t for name in names for t in seen[name]], grad_outputs=seed)
    layers = len(blocks_of(model))
    sums = [r.sum(dim=tuple(range(1, r.dim()))) for r in relevance]
    return {name: torch.stack(sums[i * layers:(i + 1) * layers]) for i, name in enumerate(names)}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_the_cvpr_rules_conserve_relevance_block_by_block(name):
    model = em.build(name)
    sums = relevance_through_blocks(model, padded_inputs(name, "left"), torch.tensor([5, 17, 42]), conserve=True)
    assert conservation_violations(sums) == []


@pytest.mark.parametrize("broken", ["plain LRP", "gated product not halved"])
def test_the_conservation_check_fails_when_a_rule_is_broken(broken, monkeypatch):
    if broken == "gated product not halved":
        original = rules.ProductRule.backward

        def unhalved(ctx, relevance):
            r_u, r_v, none = original(ctx, relevance)
            return r_u * 2, r_v * 2, none

        monkeypatch.setattr(rules.ProductRule, "backward", staticmethod(unhalved))
    model = em.build("llama")
    sums = relevance_through_blocks(model, padded_inputs("llama", "left"), torch.tensor([5, 17, 42]),
                                    conserve=broken != "plain LRP")
    assert conservation_violations(sums) != []


# ---- the model is left as it was; what has no rule stays refused ----

@pytest.mark.parametrize("name", ["gpt2", "mistral"])
def test_the_model_is_left_untouched(name):
    model = em.build(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    for method in METHODS:
        relfast.Explainer(model, method)(padded_inputs(name, "left"))
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


class DividedByAnother(torch.nn.Module):
    """Attention, then a division of one activation by another: still no rule."""

    def __init__(self):
        super().__init__()
        self.qkv, self.gate, self.head = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 1, 8).permute(2, 0, 3, 1, 4)
        h = torch.nn.functional.scaled_dot_product_attention(q, k, v)[:, 0]
        return self.head((h / self.gate(h))[:, 0])


def test_a_quotient_of_two_activations_is_still_refused():
    torch.manual_seed(0)
    explainer = relfast.Explainer(DividedByAnother().eval(), "lrp", layout=relfast.TokenLayout(prefix_tokens=1))
    with pytest.raises(ValueError, match=r"^relfast\.Explainer: .*applies .*div.* no LRP rule"):
        explainer(torch.randn(2, 5, 8))


# ---- half precision: the relevance pass computes in float32 ----

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_half_model_gives_the_float32_model_of_its_weights(name, dtype):
    """lrp and partial_lrp (the relevance pass is their only forward) equal a float32 model of the
    same rounded weights; transformer_attribution's ∇A comes from the half forward: near float64
    (bounds of tests/test_half_precision.py: 0.03 fp16, 0.04 bf16; measured 7.5e-4 and 7.2e-3)."""
    half = em.build(name).to(dtype)
    state = {k: v.clone() for k, v in half.state_dict().items()}
    inputs = padded_inputs(name, "left")
    for method in ("lrp", "partial_lrp"):
        got = relfast.Explainer(half, method)(inputs, target=TARGETS).relevance
        single = relfast.Explainer(em.build(name).to(dtype).float(), method)(inputs, target=TARGETS).relevance
        assert float(single.abs().max()) > 0
        torch.testing.assert_close(got, single, rtol=1e-6, atol=1e-6 * float(single.abs().max()))
    got = relfast.Explainer(half, "transformer_attribution")(inputs, target=TARGETS).relevance.double()
    full = relfast.Explainer(em.build(name).to(dtype).double(), "transformer_attribution")(inputs, target=TARGETS)
    expected = full.relevance.double()
    expected[..., -1] = got[..., -1] = 0  # the explained token's own 1 (identity) left out of the scale
    assert relative_error(got, expected) <= {torch.float16: 0.03, torch.bfloat16: 0.04}[dtype]
    for key, value in half.state_dict().items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
