"""relfast.Explainer against a plain float64, one-sample-at-a-time implementation of the
reference algorithm (docs/METHODS.md): forward with the attention maps, autograd.grad of the target logit
with respect to them, then the method's rule layer by layer."""
import copy

import pytest
import torch
import transformers  # installed by requirements.txt: a missing one must fail, not skip

import relfast
from relfast.explain.methods import ATTENTION_METHODS

LAYERS, HEADS, HIDDEN, CLASSES = 3, 4, 32, 5


def vit(cls_name="ViTForImageClassification", config_name="ViTConfig"):
    config = getattr(transformers, config_name)(
        image_size=32, patch_size=8, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=64, num_labels=CLASSES)
    return getattr(transformers, cls_name)(config)


def bert(cls_name="BertForSequenceClassification", config_name="BertConfig", **extra):
    config = getattr(transformers, config_name)(
        vocab_size=60, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=64, max_position_embeddings=40, num_labels=CLASSES, **extra)
    return getattr(transformers, cls_name)(config)


def distilbert():
    config = transformers.DistilBertConfig(vocab_size=60, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=64,
                                           max_position_embeddings=40, num_labels=CLASSES)
    return transformers.DistilBertForSequenceClassification(config)


def timm_vit():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=HIDDEN, depth=LAYERS, num_heads=HEADS,
                             mlp_ratio=2.0, num_classes=CLASSES)


class TimmEager(torch.nn.Module):
    """Runs a timm ViT the way the papers' code does: non-fused attention, probabilities
    captured at attn_drop; returns an object with .logits and .attentions like HF models."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, output_attentions=True):
        captured = []
        hooks = [b.attn.attn_drop.register_forward_hook(lambda m, a, o: captured.append(o)) for b in self.model.blocks]
        for b in self.model.blocks:
            b.attn.fused_attn = False
        try:
            logits = self.model(pixel_values)
        finally:
            for h in hooks:
                h.remove()
        return type("Out", (), {"logits": logits, "attentions": tuple(captured)})()


FAMILIES = {
    "vit": lambda: vit(),
    "deit": lambda: vit("DeiTForImageClassification", "DeiTConfig"),
    "deit-distilled": lambda: vit("DeiTForImageClassificationWithTeacher", "DeiTConfig"),
    "bert": lambda: bert(),
    "roberta": lambda: bert("RobertaForSequenceClassification", "RobertaConfig", pad_token_id=1),
    "distilbert": distilbert,
    "timm-vit": timm_vit,
}
VISION = {"vit", "deit", "deit-distilled", "timm-vit"}


def make(family, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = FAMILIES[family]().to(dtype).eval()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    return model


def inputs_for(family, batch, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    if family in VISION:
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=gen, dtype=dtype)}
    ids = torch.randint(5, 60, (batch, 11), generator=gen)
    mask = torch.ones(batch, 11, dtype=torch.long)
    if batch > 1:
        mask[1, 8:] = 0  # a padded sample: batching must not change its explanation
    return {"input_ids": ids, "attention_mask": mask}


def sample(inputs, b):
    return {k: v[b:b + 1] for k, v in inputs.items()}


def reference(model, single, method, target, prefix, start_layer=0, aggregate=True):
    """The reference algorithm for one sample, float64, the explained row (N,)."""
    out = model(**single, output_attentions=True)
    atts = out.attentions
    n = atts[0].shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    if method == "raw_attention":
        return atts[-1][0].mean(0)[0].detach()
    if method == "rollout":
        joint = None
        for a in atts[start_layer:]:
            m = a[0].mean(0) + eye
            m = m / m.sum(-1, keepdim=True)
            joint = m if joint is None else m @ joint
        return joint[0].detach()
    grads = torch.autograd.grad(out.logits[0, target], atts)
    if method == "attn_gradcam":
        g, a = grads[-1][0], atts[-1][0]
        w = g[:, 0, prefix:].mean(-1)
        return (a[:, 0, :] * w[:, None]).mean(0).clamp(min=0).detach()
    R = eye
    for g, a in zip(grads, atts):
        abar = (g[0] * a[0]).clamp(min=0).mean(0)
        R = R + abar @ R if aggregate else abar @ R
    return R[0].detach()


def assert_close_relative(actual, expected, rtol=1e-5):
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale.item())


@pytest.mark.parametrize("method", ATTENTION_METHODS)  # LRP methods: tests/test_lrp.py
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_equals_per_sample_reference(family, method):
    model = make(family)
    inputs = inputs_for(family, batch=3)
    out = relfast.Explainer(model, method)(inputs["pixel_values"] if family == "timm-vit" else inputs)
    assert out.relevance.dtype == torch.float32 and out.relevance.shape[0] == 3
    prefix = 2 if family.startswith("deit") else 1  # HF DeiT always carries the distillation token
    plain = TimmEager(model) if family == "timm-vit" else model
    for b in range(3):
        target = int(out.logits[b].argmax())
        assert int(out.target[b]) == target
        expected = reference(plain, sample(inputs, b), method, target, prefix)
        assert_close_relative(out.relevance[b], expected)


@pytest.mark.parametrize("family", ["vit", "bert"])
@pytest.mark.parametrize("method", ["generic", "attn_gradcam"])
def test_multi_target_equals_separate_single_target_calls(family, method):
    model = make(family)
    inputs = inputs_for(family, batch=3)
    explainer = relfast.Explainer(model, method)
    classes = [[0, 3], [4, 4], [2, 1]]
    out = explainer(inputs, target=classes)
    assert out.relevance.shape[:2] == (3, 2)
    for k in range(2):
        single = explainer(inputs, target=torch.tensor([c[k] for c in classes]))
        assert_close_relative(out.relevance[:, k], single.relevance.double())


@pytest.mark.parametrize("target", [2, torch.tensor([0, 4, 1]), [1, 3]])
def test_target_forms(target):
    model, inputs = make("vit"), inputs_for("vit", batch=3)
    out = relfast.Explainer(model)(inputs, target=target)
    wanted = torch.as_tensor(target)
    wanted = wanted.expand(3) if wanted.dim() == 0 else (wanted.expand(3, -1) if isinstance(target, list) else wanted)
    assert torch.equal(out.target, wanted)
    for b in range(3):
        for k, t in enumerate(out.target[b].view(-1).tolist()):
            got = out.relevance[b] if out.relevance.dim() == 2 else out.relevance[b, k]
            assert_close_relative(got, reference(model, sample(inputs, b), "generic", t, 1))


def test_callable_target_explains_that_scalar():
    model, inputs = make("bert"), inputs_for("bert", batch=2)
    out = relfast.Explainer(model)(inputs, target=lambda logits: logits[:, 1] - logits[:, 2])
    assert out.target is None
    for b in range(2):
        single = sample(inputs, b)
        res = model(**single, output_attentions=True)
        grads = torch.autograd.grad(res.logits[0, 1] - res.logits[0, 2], res.attentions)
        R = torch.eye(res.attentions[0].shape[-1], dtype=torch.float64)
        for g, a in zip(grads, res.attentions):
            R = R + (g[0] * a[0]).clamp(min=0).mean(0) @ R
        assert_close_relative(out.relevance[b], R[0].detach())


def test_full_matrix_and_no_aggregation():
    model, inputs = make("vit"), inputs_for("vit", batch=2)
    full = relfast.Explainer(model, full_matrix=True)(inputs)
    row = relfast.Explainer(model)(inputs)
    assert full.relevance.shape == (2, 17, 17)
    torch.testing.assert_close(full.relevance[:, 0], row.relevance, rtol=1e-5, atol=1e-7)
    plain = relfast.Explainer(model, aggregate=False)(inputs)
    for b in range(2):
        expected = reference(model, sample(inputs, b), "generic", int(plain.target[b]), 1, aggregate=False)
        assert_close_relative(plain.relevance[b], expected)


def test_rollout_start_layer():
    model, inputs = make("vit"), inputs_for("vit", batch=2)
    out = relfast.Explainer(model, "rollout", start_layer=1)(inputs)
    for b in range(2):
        assert_close_relative(out.relevance[b], reference(model, sample(inputs, b), "rollout", 0, 1, start_layer=1))


def test_image_map_drops_special_tokens_and_upsamples():
    model, inputs = make("deit-distilled"), inputs_for("deit-distilled", batch=2)
    out = relfast.Explainer(model)(inputs)
    patches = out.image_map()
    assert patches.shape == (2, 4, 4)
    torch.testing.assert_close(patches.reshape(2, -1), out.relevance[:, 2:])
    pixels = out.image_map(upsample=True)
    assert pixels.shape == (2, 32, 32)
    assert torch.allclose(pixels.amin(dim=(1, 2)), torch.zeros(2)) and torch.allclose(pixels.amax(dim=(1, 2)), torch.ones(2))


def test_timm_with_and_without_fused_attention_agree():
    model = make("timm-vit")
    assert all(b.attn.fused_attn for b in model.blocks)
    pixels = inputs_for("timm-vit", batch=2)["pixel_values"]
    fused = relfast.Explainer(model)(pixels)
    assert all(b.attn.fused_attn for b in model.blocks)
    for b in model.blocks:  # the user's choice: explicit softmax attention
        b.attn.fused_attn = False
    torch.testing.assert_close(relfast.Explainer(model)(pixels).relevance, fused.relevance)
    assert not any(b.attn.fused_attn for b in model.blocks)


@pytest.mark.parametrize("method", ATTENTION_METHODS)
def test_sdpa_model_keeps_sdpa_and_gives_the_eager_result(method):
    torch.manual_seed(0)
    model = vit().double().eval()
    assert model.config._attn_implementation == "sdpa"
    inputs = inputs_for("vit", batch=2)
    out = relfast.Explainer(model, method)(inputs)
    assert model.config._attn_implementation == "sdpa"
    eager = make("vit")
    torch.testing.assert_close(out.relevance, relfast.Explainer(eager, method)(inputs).relevance)


def test_attention_the_engine_cannot_see_is_an_error():
    model = make("vit")
    model.config._attn_implementation = "flash_attention_2"  # as a model loaded with it reports
    with pytest.raises(ValueError, match="'flash_attention_2'.*attn_implementation='sdpa'"):
        relfast.Explainer(model)(inputs_for("vit", 2))


@pytest.mark.parametrize("method", ["generic", "rollout", "attn_gradcam", "transformer_attribution"])
def test_a_model_mixing_eager_and_sdpa_layers_is_explained_as_it_runs(method, monkeypatch):
    """The capture sees eager softmaxes and SDPA calls alike, in the order they run: a model whose
    config says eager but whose layer 1 runs SDPA gets the all-eager model's map (same weights).
    (transformer_attribution's only forward is its relevance forward, which writes every site out
    as its softmax: it records no kinds.)"""
    model = make("vit")  # eager; HF's eager softmax runs in float32, so the maps agree to float32 rounding
    mixed = make("vit")
    attention = mixed.vit.layers[1].attention
    config = copy.deepcopy(attention.config)
    config._attn_implementation = "sdpa"
    attention.config = config
    kinds = []
    forward = relfast.explain.session.Session._forward

    def recording(session, call):
        output, records = forward(session, call)
        kinds.append([type(record).__name__ for record in records])
        return output, records

    inputs = inputs_for("vit", 2)
    expected = relfast.Explainer(model, method)(inputs).relevance
    monkeypatch.setattr(relfast.explain.session.Session, "_forward", recording)
    got = relfast.Explainer(mixed, method)(inputs).relevance
    if method == "transformer_attribution":
        assert kinds == [], kinds
    else:
        assert kinds[-1] == ["ProbabilityRecord", "SdpaRecord", "ProbabilityRecord"], kinds
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


BAD = {
    "unsupported model": (lambda: relfast.Explainer(torch.nn.Linear(3, 3)), ValueError, "Supported families"),
    "unknown method": (lambda: relfast.Explainer(make("vit"), "gradients"), ValueError, "'method'"),
    "full matrix of an LRP method": (lambda: relfast.Explainer(make("vit"), "transformer_attribution",
                                                               full_matrix=True), ValueError, "'full_matrix=True'"),
    "start_layer on raw attention": (lambda: relfast.Explainer(make("vit"), "raw_attention", start_layer=1), ValueError,
                                     "'start_layer'"),
    "generic start_layer out of range": (lambda: relfast.Explainer(make("vit"), start_layer=100), ValueError,
                                         "out of range"),
    "normalize on a one-stream model": (lambda: relfast.Explainer(make("vit"), normalize=False), ValueError,
                                        "'normalize'"),
    "target out of range": (lambda: relfast.Explainer(make("vit"))(inputs_for("vit", 2), target=5), ValueError,
                            "out of range"),
    "negative target": (lambda: relfast.Explainer(make("vit"))(inputs_for("vit", 2), target=torch.tensor([0, -1])),
                        ValueError, "out of range"),
    "float target": (lambda: relfast.Explainer(make("vit"))(inputs_for("vit", 2), target=torch.tensor([0.5, 1.0])),
                     ValueError, "integer"),
    "target batch mismatch": (lambda: relfast.Explainer(make("vit"))(inputs_for("vit", 2), target=torch.tensor([0, 1, 2])),
                              ValueError, "batch has 2"),
    "empty batch": (lambda: relfast.Explainer(make("vit"))(inputs_for("vit", 2)["pixel_values"][:0]), ValueError,
                    "empty batch"),
    "wrong image size": (lambda: relfast.Explainer(make("vit"))(torch.randn(2, 3, 48, 48, dtype=torch.float64)),
                         ValueError, "pixel_values"),
    "text without input_ids": (lambda: relfast.Explainer(make("bert"))({"attention_mask": torch.ones(2, 5)}), ValueError,
                               "input_ids"),
    "bad callable": (lambda: relfast.Explainer(make("vit"))(inputs_for("vit", 2), target=lambda logits: logits),
                     ValueError, "one scalar per sample"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gets_a_clear_error(case):
    call, error, words = BAD[case]
    with pytest.raises(error, match=words):
        call()


def test_parameters_are_restored_and_inputs_that_require_grad_work():
    model, inputs = make("vit"), inputs_for("vit", batch=2)
    model.vit.embeddings.cls_token.requires_grad_(False)  # a user's own frozen parameter stays frozen
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    plain = relfast.Explainer(model)(inputs)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    pixels = inputs["pixel_values"].clone().requires_grad_()
    torch.testing.assert_close(relfast.Explainer(model)(pixels).relevance, plain.relevance)
