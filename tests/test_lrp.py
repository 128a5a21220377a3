"""[P1] LRP-based methods (transformer_attribution, partial_lrp, lrp) on unmodified models:
equal to a plain float64 per-sample implementation of the rules written apart from the engine
(tests/lrp_reference.py; the baselines with rules="textbook", their default rules are
tests/test_lrp_paper_rules.py's), batched with K targets; conservation block by block (seed 000, Lemma 2);
every family runs; bad use is refused clearly; the model is left as it was."""
import pytest
import torch
import transformers

import relfast
from relfast.explain.lrp import RelevanceCapture, rules

import engine_models as em
from lrp_reference import hf_bert_relevance, hf_vit_relevance, timm_vit_relevance

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

METHODS = ("transformer_attribution", "partial_lrp", "lrp")
TEXTBOOK = {"partial_lrp": {"rules": "textbook"}, "lrp": {"rules": "textbook"}}  # the rules lrp_reference has
TARGETS = torch.tensor([[0, 2], [1, 3], [4, 0]])  # K = 2 classes per sample, batch 3


def vit(implementation="sdpa"):
    config = transformers.ViTConfig(image_size=em.IMAGE, patch_size=em.PATCH, hidden_size=em.HIDDEN,
                                    num_hidden_layers=em.LAYERS, num_attention_heads=em.HEADS, intermediate_size=64,
                                    num_labels=em.CLASSES, attn_implementation=implementation)
    return transformers.ViTForImageClassification(config)


def deit(teacher=False):
    config = transformers.DeiTConfig(image_size=em.IMAGE, patch_size=em.PATCH, hidden_size=em.HIDDEN,
                                     num_hidden_layers=em.LAYERS, num_attention_heads=em.HEADS, intermediate_size=64,
                                     num_labels=em.CLASSES)
    cls = transformers.DeiTForImageClassificationWithTeacher if teacher else transformers.DeiTForImageClassification
    return cls(config)


def seeded_float64(build, seed=0):
    torch.manual_seed(seed)
    return build().double().eval()


def images(batch=3, seed=1):
    return torch.randn(batch, 3, em.IMAGE, em.IMAGE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def bert_inputs(batch=3):
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[0, 5:] = 0  # a padded sample
    return {"input_ids": torch.randint(1, em.VOCAB, (batch, 7), generator=g), "attention_mask": mask}


def image_sample(model, inputs, b, target, method, reference):
    return reference(model, inputs[b], target, method), slice(None)


def text_sample(model, inputs, b, target, method, reference):
    n = int(inputs["attention_mask"][b].sum())  # the sample alone, without its padding
    return reference(model, inputs["input_ids"][b, :n], target, method), slice(0, n)


# name -> (model, inputs, reference, how to cut a sample, tolerance). HF's eager attention runs
# its softmax in float32 even in a float64 model: its maps agree to float32 rounding only.
REFERENCES = {
    "vit-sdpa": (vit, images, hf_vit_relevance, image_sample, 1e-6),
    "vit-eager": (lambda: vit("eager"), images, hf_vit_relevance, image_sample, 1e-3),
    "deit": (deit, images, hf_vit_relevance, image_sample, 1e-6),
    "deit-teacher": (lambda: deit(teacher=True), images, hf_vit_relevance, image_sample, 1e-6),
    "bert": (em.hf_bert, bert_inputs, hf_bert_relevance, text_sample, 1e-6),
    "timm": (em.timm_vit, images, timm_vit_relevance, image_sample, 1e-6),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_batched_k_targets_equal_the_per_sample_reference(name, method):
    build, make_inputs, reference, one_sample, tolerance = REFERENCES[name]
    model = seeded_float64(build)
    inputs = make_inputs()
    out = relfast.Explainer(model, method, **TEXTBOOK.get(method, {}))(inputs, target=TARGETS)
    pixel_map = method == "lrp" and make_inputs is images
    expected_shape = (3, 2, em.IMAGE, em.IMAGE) if pixel_map else (3, 2, out.relevance.shape[-1])
    assert tuple(out.relevance.shape) == expected_shape and out.pixel_level == pixel_map
    for b in range(3):
        for k in range(2):
            expected, tokens = one_sample(model, inputs, b, int(TARGETS[b, k]), method, reference)
            got = out.relevance[b, k, ..., tokens].double() if not pixel_map else out.relevance[b, k].double()
            # (a map can be all zero: partial LRP of a class the last layer gives no positive relevance)
            error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
            assert error <= tolerance, (b, k, error)


@pytest.mark.parametrize("start_layer", [0, 2, -1])
def test_transformer_attribution_start_layer(start_layer):
    model = seeded_float64(vit)
    pixels = images(batch=2)
    out = relfast.Explainer(model, "transformer_attribution", start_layer=start_layer)(pixels)
    for b in range(2):
        expected = hf_vit_relevance(model, pixels[b], int(out.target[b]), "transformer_attribution", start_layer)
        torch.testing.assert_close(out.relevance[b].double(), expected, rtol=1e-6, atol=1e-9)


def roberta():
    config = transformers.RobertaConfig(vocab_size=em.VOCAB, hidden_size=em.HIDDEN, num_hidden_layers=2,
                                        num_attention_heads=em.HEADS, intermediate_size=64, num_labels=em.CLASSES,
                                        max_position_embeddings=42, pad_token_id=1)
    return transformers.RobertaForSequenceClassification(config)


def distilbert():
    config = transformers.DistilBertConfig(vocab_size=em.VOCAB, dim=em.HIDDEN, n_layers=2, n_heads=em.HEADS,
                                           hidden_dim=64, max_position_embeddings=40, num_labels=em.CLASSES)
    return transformers.DistilBertForSequenceClassification(config)


FAMILIES = {"hf-bert": (em.hf_bert, bert_inputs), "roberta": (roberta, bert_inputs),
            "distilbert": (distilbert, bert_inputs), "timm": (em.timm_vit, images),
            "torchvision": (em.torchvision_vit, images), "deit": (deit, images)}


def sample(inputs, b):
    if isinstance(inputs, dict):
        mask = inputs["attention_mask"][b]
        keep = int(mask.sum())
        return {k: v[b:b + 1, :keep] for k, v in inputs.items()}, keep
    return inputs[b:b + 1], None


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_batched_equals_per_sample(family, method):
    build, make_inputs = FAMILIES[family]
    explainer = relfast.Explainer(seeded_float64(build), method)
    inputs = make_inputs()
    out = explainer(inputs, target=TARGETS)
    assert bool(torch.isfinite(out.relevance).all())
    for b in range(3):
        one, keep = sample(inputs, b)
        alone = explainer(one, target=TARGETS[b:b + 1]).relevance[0]
        got = out.relevance[b] if keep is None else out.relevance[b, :, :keep]
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-7)


# ---- conservation (seed 000, Lemma 2) ----

def relevance_through_blocks(model, pixels, target, conserve):
    """Per layer: relevance sums at the block's input and output and at its two residual
    branches (attention, MLP), from a relevance pass with the test's own forward hooks."""
    seen = {"in": [], "out": [], "attention": [], "mlp": []}
    hooks = []
    def keep(*names):
        def hook(module, args, out):  # returns None: the output is left as it is
            values = {"in": args[0], "out": out, "attention": out[0] if isinstance(out, tuple) else out, "mlp": out}
            for name in names:
                seen[name].append(values[name])
        return hook

    for layer in model.vit.layers:
        hooks.append(layer.register_forward_hook(keep("in", "out")))
        hooks.append(layer.attention.register_forward_hook(keep("attention")))
        hooks.append(layer.mlp.register_forward_hook(keep("mlp")))
    try:
        with torch.enable_grad(), RelevanceCapture(conserve):
            logits = model(pixel_values=pixels.clone().requires_grad_()).logits
    finally:
        for hook in hooks:
            hook.remove()
    seed = torch.zeros_like(logits)
    seed[torch.arange(len(target)), target] = 1
    names = ["in", "out", "attention", "mlp"]
    tensors = [t for name in names for t in seen[name]]
    relevance = torch.autograd.grad(logits, tensors, grad_outputs=seed)
    layers = len(model.vit.layers)
    sums = [r.sum(dim=tuple(range(1, r.dim()))) for r in relevance]  # per sample
    return {name: torch.stack(sums[i * layers:(i + 1) * layers]) for i, name in enumerate(names)}  # (L, B)


def conservation_violations(sums):
    """Lemma 2 with relevance 1 at the logits: every block passes exactly 1 on (i), and each
    residual branch takes a share in [0, 1] (ii)."""
    problems = []
    for where in ("in", "out"):
        worst = float((sums[where] - 1).abs().max())
        if worst > 1e-6:
            problems.append(f"block {where}puts sum to 1 ± {worst:.3g}")
    for branch in ("attention", "mlp"):
        low, high = float(sums[branch].min()), float(sums[branch].max())
        if low < -1e-9 or high > 1 + 1e-9:
            problems.append(f"{branch} branch share in [{low:.3g}, {high:.3g}]")
    return problems


def test_the_cvpr_rules_conserve_relevance_block_by_block():
    model = seeded_float64(vit)
    pixels = images(batch=4, seed=5)
    sums = relevance_through_blocks(model, pixels, torch.tensor([0, 1, 2, 3]), conserve=True)
    assert conservation_violations(sums) == []


@pytest.mark.parametrize("broken", ["matmul not halved", "sums without Eq. 9"])
def test_the_conservation_check_fails_when_a_rule_is_broken(broken, monkeypatch):
    """The same check on rules with one part removed must report violations."""
    if broken == "matmul not halved":
        original = rules.MatMulRule.backward

        def unhalved(ctx, relevance):
            r_u, r_v, none = original(ctx, relevance)
            return (r_u * 2, r_v * 2, none) if ctx.halve else (r_u, r_v, none)

        monkeypatch.setattr(rules.MatMulRule, "backward", staticmethod(unhalved))
        conserve = True
    else:
        conserve = False  # plain LRP: z-rule sums, and matmul relevance not halved either
    model = seeded_float64(vit)
    pixels = images(batch=4, seed=5)
    sums = relevance_through_blocks(model, pixels, torch.tensor([0, 1, 2, 3]), conserve=conserve)
    assert conservation_violations(sums) != []


def test_eq9_alone_bounds_the_branch_shares(monkeypatch):
    """Halved products but plain z-rule sums: blocks still conserve (Lemma 1 i), but a branch
    share leaves [0, 1]: only Eq. 9 bounds it (Lemma 2 ii)."""
    original = rules.AddRule.backward

    def plain_sums(ctx, relevance):
        normalise, ctx.normalise = ctx.normalise, False
        try:
            return original(ctx, relevance)
        finally:
            ctx.normalise = normalise

    model = seeded_float64(vit)
    pixels = images(batch=4, seed=5)
    with_eq9 = relevance_through_blocks(model, pixels, torch.tensor([0, 1, 2, 3]), conserve=True)
    monkeypatch.setattr(rules.AddRule, "backward", staticmethod(plain_sums))
    without = relevance_through_blocks(model, pixels, torch.tensor([0, 1, 2, 3]), conserve=True)
    shares = torch.cat([without["attention"], without["mlp"]])
    assert conservation_violations(with_eq9) == []
    assert float(shares.min()) < 0 or float(shares.max()) > 1


# ---- rules in isolation ----

def test_safe_divide_moves_the_denominator_away_from_zero_keeping_its_sign():
    a = torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1e-12, -1e-12, 4.0], dtype=torch.float64)
    got = rules.safe_divide(a, b)
    assert got[0] == 0 and got[1] > 0 and got[2] < 0
    expected = torch.tensor([1 / (1e-12 + 1e-9), 1 / (-1e-12 - 1e-9), 2 / (4 + 1e-9)], dtype=torch.float64)
    torch.testing.assert_close(got[1:], expected)


def test_linear_rule_keeps_positive_contributions_only():
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[3.0, 1.0]], dtype=torch.float64)  # z⁺ parts: x₁w₁ = 3 (x⁺W⁺); x₂w₂ = -2 is x⁻W⁺: left out
    out = rules.LinearRule.apply(x, w, None)
    (relevance,) = torch.autograd.grad(out, x, torch.ones_like(out))
    torch.testing.assert_close(relevance, torch.tensor([[3 / (3 + 1e-9), 0.0]], dtype=torch.float64))


# ---- bad use ----

def test_a_callable_target_is_refused_by_the_relevance_methods():
    explainer = relfast.Explainer(seeded_float64(vit), "transformer_attribution")
    with pytest.raises(ValueError, match="'transformer_attribution' propagates relevance from a class"):
        explainer(images(batch=2), target=lambda logits: logits[:, 0])


def test_the_default_start_layer_needs_two_layers():
    config = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=8, num_labels=2)
    with pytest.raises(ValueError, match="'start_layer' is 1 \\(the default; pass start_layer=0"):
        relfast.Explainer(transformers.ViTForImageClassification(config).eval(), "transformer_attribution")


def test_lrp_takes_no_start_layer():
    with pytest.raises(ValueError, match="argument 'start_layer' applies to method"):
        relfast.Explainer(seeded_float64(vit), "lrp", start_layer=1)


class GatedMlpModel(torch.nn.Module):
    """Attention through SDPA, then x * sigmoid(x): a product of two activations, which has no rule."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 1, 8).permute(2, 0, 3, 1, 4)
        h = torch.nn.functional.scaled_dot_product_attention(q, k, v)[:, 0]
        h = h * torch.sigmoid(h)
        return self.head(h[:, 0])


def test_an_op_without_rule_is_named_and_the_model_left_untouched():
    torch.manual_seed(0)
    model = GatedMlpModel().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    explainer = relfast.Explainer(model, "lrp", layout=relfast.TokenLayout(prefix_tokens=1))
    with pytest.raises(ValueError, match="applies .*sigmoid.* to its activations, for which relfast has no LRP rule"):
        explainer(torch.randn(2, 5, 8))
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])
    assert not model._forward_hooks and not model._forward_pre_hooks
    # the generic rule needs no rule per op and explains it
    assert relfast.Explainer(model, layout=relfast.TokenLayout(prefix_tokens=1))(torch.randn(2, 5, 8)).relevance.shape == (2, 5)


# ---- the generic rule "with LRP" ([P2] supplement §4) ----

@pytest.mark.parametrize("name", ["vit-sdpa", "bert", "timm"])
def test_generic_with_lrp_is_the_attribution_product_over_every_layer(name):
    build, make_inputs, reference, one_sample, tolerance = REFERENCES[name]
    model = seeded_float64(build)
    inputs = make_inputs()
    out = relfast.Explainer(model, "generic", use_lrp=True)(inputs, target=TARGETS)
    for b in range(3):
        for k in range(2):
            expected, tokens = one_sample(model, inputs, b, int(TARGETS[b, k]), "transformer_attribution",
                                          lambda *a: reference(*a, start_layer=0))
            got = out.relevance[b, k, ..., tokens].double()
            assert float((got - expected).abs().max() / expected.abs().max()) <= tolerance


def test_generic_with_lrp_keeps_the_generic_options():
    model = seeded_float64(vit)
    pixels = images(batch=2)
    full = relfast.Explainer(model, "generic", use_lrp=True, full_matrix=True)(pixels)
    rows = relfast.Explainer(model, "generic", use_lrp=True)(pixels)
    torch.testing.assert_close(full.relevance[:, 0], rows.relevance)
    ablation = relfast.Explainer(model, "generic", use_lrp=True, aggregate=False)(pixels)
    assert ablation.relevance.shape == rows.relevance.shape and not torch.allclose(ablation.relevance, rows.relevance)
    with pytest.raises(ValueError, match="argument 'use_lrp' applies to method 'generic'"):
        relfast.Explainer(model, "rollout", use_lrp=True)
    with pytest.raises(ValueError, match="argument 'use_lrp' must be True or False"):
        relfast.Explainer(model, "generic", use_lrp="yes")
