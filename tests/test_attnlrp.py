"""Method 'attnlrp' (AttnLRP, Achtibat et al. 2024, as gradient modifications in one backward).

The reference here is written apart from the engine: a deep copy of the model (never the user's)
whose modules are replaced, in the copy, by modules that carry the rules in their forward as
stop-gradients (``x * (f(x)/x).detach()`` for activations, the normaliser detached in LayerNorm and
RMSNorm, ``0.5·t + (0.5·t).detach()`` for each factor of a product) and whose attention is an
explicit softmax registered as a transformers attention function; it runs one unpadded float64
sample at a time and reads gradient × input at the input embeddings (images: at the patch
embedding). relfast runs the batch, padded, with the model's own SDPA or eager attention.
"""
import copy
import types

import pytest
import torch
import transformers

import relfast
import engine_models as em
from test_model_untouched import model_state

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

HF_NAMES = ["gpt2", "llama", "qwen2", "mistral", "hf-bert", "hf-vit"]
TARGETS = [[0, 3], [4, 1], [2, 2]]  # K = 2 targets per sample for a batch of 3
REFERENCE_ATTENTION = "relfast_test_attnlrp_reference"


# ---- the reference: a patched float64 copy, one unpadded sample ----

def half_gradient(t):
    """``t`` with half its gradient: the uniform rule's share of one factor of a product."""
    return 0.5 * t + (0.5 * t).detach()


class Record:
    """What the reference attention keeps per layer: logits before the mask, masked logits, A."""

    def __init__(self):
        self.layers = []


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax(q·kᵀ·scale [+ causal mask])·v written out with the uniform rule on both products.
    Single unpadded samples only: the only mask is the causal one."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = half_gradient(query) @ half_gradient(key).transpose(-1, -2) * scaling
    logits = scores
    if getattr(module, "is_causal", False):
        n = scores.shape[-1]
        logits = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    attention = logits.softmax(dim=-1)
    module.reference_record.layers.append((scores, logits, attention))
    out = half_gradient(attention) @ half_gradient(value)
    return out.transpose(1, 2).contiguous(), attention


transformers.AttentionInterface.register(REFERENCE_ATTENTION, reference_attention)


class IdentityActivation(torch.nn.Module):
    """The identity rule: value f(x), gradient f(x)/x (0 at x = 0)."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        y = self.f(x)
        ratio = torch.where(x == 0, torch.zeros_like(y), y / torch.where(x == 0, torch.ones_like(x), x))
        return x * ratio.detach()


class ConstantStdLayerNorm(torch.nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        std = (x.var(-1, unbiased=False, keepdim=True) + self.norm.eps).sqrt().detach()
        y = (x - mean) / std
        return y * self.norm.weight + self.norm.bias if self.norm.bias is not None else y * self.norm.weight


class ConstantRmsNorm(torch.nn.Module):
    """HF's Llama-style RMSNorm (computed in float32 as HF does) with the rms detached."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        h = x.to(torch.float32)
        inverse = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.norm.variance_epsilon).detach()
        return self.norm.weight * (h * inverse).to(x.dtype)


def roberta_head_forward(head, features, **kwargs):
    return head.out_proj(IdentityActivation(torch.tanh)(head.dense(features[:, 0])))


def gated_mlp_forward(mlp, x):
    return mlp.down_proj(half_gradient(mlp.act_fn(mlp.gate_proj(x))) * half_gradient(mlp.up_proj(x)))


ACTIVATIONS = {"NewGELUActivation", "GELUActivation", "SiLUActivation", "SiLU", "Tanh", "GELU", "ReLU"}


def reference_copy(model):
    """A deep copy of ``model`` with the AttnLRP rules in its modules (the user's model untouched)."""
    twin = copy.deepcopy(model)
    record = Record()
    for parent in list(twin.modules()):
        for child_name, child in list(parent.named_children()):
            kind = type(child).__name__
            if isinstance(child, torch.nn.LayerNorm):
                setattr(parent, child_name, ConstantStdLayerNorm(child))
            elif kind.endswith("RMSNorm"):
                setattr(parent, child_name, ConstantRmsNorm(child))
            elif kind in ACTIVATIONS:
                setattr(parent, child_name, IdentityActivation(child))
    for module in twin.modules():
        if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(gated_mlp_forward, module)
        if type(module).__name__ == "RobertaClassificationHead":  # its tanh is a function, not a module
            module.forward = types.MethodType(roberta_head_forward, module)
        if type(module).__name__.endswith(("Attention", "SelfAttention")):
            module.reference_record = record
    twin.set_attn_implementation(REFERENCE_ATTENTION)
    return twin, record


def reference(name, model, single, target):
    """One unpadded sample: (relevance (N,), the explained logit, the relevance the softmaxes
    absorb: Σ_l [Σ A⊙∇A − Σ x⊙∇x] with x the logits before the mask)."""
    twin, record = reference_copy(model)
    if name == "hf-vit":
        captured = []
        twin.vit.embeddings.patch_embeddings.projection.register_forward_hook(lambda m, i, o: captured.append(o))
        pixels = single["pixel_values"].clone().requires_grad_()
        logit = twin(pixel_values=pixels).logits[0, target]
        start = captured[0]
    else:
        start = twin.get_input_embeddings()(single["input_ids"]).detach().requires_grad_()
        kwargs = {"use_cache": False} if name in em.CAUSAL_LMS else {}
        logits = twin(inputs_embeds=start, **kwargs).logits
        logit = logits[0, -1, target] if name in em.CAUSAL_LMS else logits[0, target]
    layers = record.layers
    wanted = [start] + [a for _, _, a in layers] + [x for _, x, _ in layers]
    grads = torch.autograd.grad(logit, wanted)
    n = len(layers)
    relevance = (start * grads[0]).detach()
    relevance = relevance.sum(dim=1).flatten(1)[0] if name == "hf-vit" else relevance.sum(-1)[0]
    absorbed = sum((a * ga).sum() - (s * gx).sum() for (s, _, a), ga, gx in zip(layers, grads[1:1 + n], grads[1 + n:]))
    if name == "hf-vit":
        relevance = torch.cat([relevance.new_zeros(1), relevance])  # the class token: a parameter
    return relevance, logit.detach(), absorbed.detach()


# ---- models ----

def bias_free(name, model):
    """``model`` in place with every additive constant zeroed: biases, position and token-type
    embeddings, a ViT's class token and positions (what AttnLRP does not conserve)."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or any(k in pname for k in ("wpe", "position_embeddings", "token_type_embeddings",
                                                                  "cls_token")):
                p.zero_()
    return model


def roberta():
    return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        vocab_size=em.VOCAB, hidden_size=em.HIDDEN, num_hidden_layers=em.LAYERS, num_attention_heads=em.HEADS,
        intermediate_size=64, max_position_embeddings=40, num_labels=em.CLASSES, pad_token_id=0))


def distilbert():
    return transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=em.VOCAB, dim=em.HIDDEN, n_layers=em.LAYERS, n_heads=em.HEADS, hidden_dim=64,
        max_position_embeddings=40, num_labels=em.CLASSES))


BERT_FAMILY = {"hf-bert": lambda: em.build("hf-bert"), "roberta": roberta, "distilbert": distilbert}


def build(name):
    if name in ("roberta", "distilbert"):
        torch.manual_seed(0)
        return BERT_FAMILY[name]().double().eval()
    return em.build(name)


def data(name):
    return em.inputs_for("hf-bert" if name in BERT_FAMILY else name)


def explain(model, inputs, target=None):
    return relfast.Explainer(model, "attnlrp")(inputs, target=target)


# ---- tests ----

@pytest.mark.parametrize("name", HF_NAMES + ["roberta", "distilbert"])
def test_batched_padded_k_targets_equal_the_reference_per_sample(name):
    model = build(name)
    inputs = data(name)
    out = explain(model, inputs, TARGETS)
    assert out.relevance.shape == (3, 2, out.relevance.shape[-1]) and out.target.tolist() == TARGETS
    worst = 0.0
    for b in range(3):
        single, where = em.real_tokens("hf-bert" if name in BERT_FAMILY else name, inputs, b)
        single = {"pixel_values": single} if name == "hf-vit" else single
        for k, target in enumerate(TARGETS[b]):
            want, logit, _ = reference(name, model, single, target)
            got = out.relevance[b, k, where].double()
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
            assert float(want.abs().max()) > 1e-4  # a map, not zeros
        if name != "hf-vit":  # padding: exactly 0
            pad = ~inputs["attention_mask"][b].bool()
            assert (out.relevance[b, :, pad] == 0).all()
    print(f"{name}: max |relfast - reference| / max |reference| = {worst:.2e}")


@pytest.mark.parametrize("name", ["gpt2", "hf-bert", "hf-vit"])
def test_eager_attention_gives_the_sdpa_result(name):
    """The fused kernel with the ¼, ¼, ½ gradient factors on q, k, v equals the explicit
    softmax with the uniform rule on both products (eager: softmax in float32, as HF computes it)."""
    model = em.build(name)
    inputs = em.inputs_for(name)
    sdpa = explain(model, inputs).relevance
    model.set_attn_implementation("eager")
    eager = explain(model, inputs).relevance
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5 * float(sdpa.abs().max()))




@pytest.mark.parametrize("name", HF_NAMES)
def test_conservation_without_additive_constants(name):
    """Bias-free models (biases, position/token-type embeddings, class token zeroed): the input
    relevance plus what the softmaxes absorb (their bias term, AttnLRP Prop. 3.1) is the explained
    logit to 1e-6 (of Σ|R| + |logit|), in float64 (measured: 1e-8, relfast's float32 maps). The
    softmax term is not negligible (0.04 % to 23 % here), so the check can fail."""
    model = bias_free(name, em.build(name))
    inputs = em.inputs_for(name)
    out = explain(model, inputs)
    for b in range(3):
        single, where = em.real_tokens(name, inputs, b)
        single = {"pixel_values": single} if name == "hf-vit" else single
        target = int(out.target[b])
        _, logit, absorbed = reference(name, model, single, target)
        total = out.relevance[b].double().sum()
        assert float(out.logits[b, target]) == pytest.approx(float(logit), rel=1e-9)
        scale = float(out.relevance[b].double().abs().sum() + abs(logit))
        assert abs(float(total + absorbed - logit)) <= 1e-6 * scale, (float(total), float(absorbed),
                                                                                  float(logit))
        assert abs(float(absorbed)) > 100 * 1e-6 * scale  # without it, no conservation
        print(f"{name}: |sum R + absorbed - logit| / scale = {abs(float(total + absorbed - logit)) / scale:.1e}, "
              f"|absorbed| / scale = {abs(float(absorbed)) / scale:.1e}")


@pytest.mark.parametrize("name", ["timm-vit", "torchvision-vit"])
def test_timm_and_torchvision_batched_equal_single_images(name):
    model = em.build(name)
    images = em.inputs_for(name)
    out = explain(model, images, TARGETS)
    assert (out.relevance[:, :, 0] == 0).all()  # the class token
    for b in range(3):
        alone = explain(model, images[b:b + 1], [TARGETS[b]]).relevance[0]
        torch.testing.assert_close(out.relevance[b], alone, rtol=1e-6, atol=1e-9)
    assert out.image_map().shape == (3, 2, em.GRID, em.GRID)


def test_timm_fused_and_explicit_attention_agree():
    model = em.build("timm-vit")
    images = em.inputs_for("timm-vit")
    fused = explain(model, images).relevance
    for block in model.blocks:
        block.attn.fused_attn = False
    explicit = explain(model, images).relevance
    torch.testing.assert_close(explicit, fused, rtol=1e-6, atol=1e-9)


def test_callable_target_is_explained():
    model = em.build("gpt2")
    inputs = em.inputs_for("gpt2")
    by_class = explain(model, inputs, torch.tensor([5, 6, 7])).relevance
    by_callable = explain(model, inputs, lambda scores: scores[:, 5:8].diagonal()).relevance
    torch.testing.assert_close(by_callable, by_class)


@pytest.mark.parametrize("name", ["gpt2", "llama", "hf-bert", "hf-vit", "gpt2-eager", "hf-bert-eager"])
def test_the_model_is_untouched(name):
    eager = name.endswith("-eager")
    model = em.build(name.removesuffix("-eager"))
    if eager:
        model.set_attn_implementation("eager")
    next(model.parameters()).requires_grad_(False)  # a user's frozen parameter
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    before = model_state(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def target(scores):
        seen.append(model_state(model))
        return scores[:, 0]

    out = explain(model, em.inputs_for(name.removesuffix("-eager")), target)
    assert torch.isfinite(out.relevance).all() and out.relevance.abs().sum() > 0
    assert seen == [before] and model_state(model) == before and len(calls) == 1
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_a_call_leaves_no_reference_cycles():
    import gc

    model = em.build("gpt2")
    inputs = em.inputs_for("gpt2")
    explain(model, inputs)
    gc.collect()
    gc.disable()
    try:
        explain(model, inputs)
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_unsupported_models_and_options_are_refused_before_any_work():
    import bimodal_models

    model = bimodal_models.visual_bert()  # no AttnLRP rules yet (CLIP, modules given a layout: test_attnlrp_families)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    with pytest.raises(ValueError, match=r"relfast\.Explainer: method 'attnlrp' has no rules yet for "
                                         r"VisualBertForQuestionAnswering"):
        relfast.Explainer(model, "attnlrp")
    assert forwards == []
    with pytest.raises(ValueError, match=r"relfast\.Explainer: argument 'start_layer' applies to method"):
        relfast.Explainer(em.build("gpt2"), "attnlrp", start_layer=1)
    with pytest.raises(ValueError, match=r"relfast\.Explainer: 'full_matrix=True' needs"):
        relfast.Explainer(em.build("gpt2"), "attnlrp", full_matrix=True)


def test_an_op_without_a_rule_is_refused_by_name():
    """An activation the rules do not know (a softmax over the hidden width) is refused, not
    differentiated as if it were linear."""
    model = em.build("hf-bert")
    model.bert.encoder.layer[0].intermediate.intermediate_act_fn = SoftmaxActivation().eval()
    with pytest.raises(ValueError, match=r"applies torch\.softmax.*no AttnLRP rule"):
        explain(model, em.inputs_for("hf-bert"))


class SoftmaxActivation(torch.nn.Module):
    def forward(self, x):
        return torch.softmax(x, dim=-1)


@pytest.mark.parametrize("name", ["gpt2", "llama", "hf-vit"])
def test_lower_precision_follows_float64(name):
    """float32 and half-precision models (weights and inputs cast) give the float64 map up to
    their precision (measured here: float32 4e-7, float16 1e-3, bfloat16 1e-2 of the largest entry)."""
    want = explain(em.build(name), em.inputs_for(name)).relevance
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 5e-2)):
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in em.inputs_for(name).items()}
        got = explain(em.build(name).to(dtype), inputs).relevance
        assert float((got - want).abs().max()) <= tolerance * float(want.abs().max()), dtype
