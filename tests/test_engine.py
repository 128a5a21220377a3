"""The engine on every family as users load them (SDPA by default, timm fused attention,
nn.MultiheadAttention, decoder-only LMs, a hand-written SDPA model with an explicit layout):
each method's batched result equals a float64 per-sample reference computed from eager
attention (tests/engine_models.py), with padded samples equal to their unpadded selves."""
import pytest
import torch

import relfast
from relfast.explain.methods import ATTENTION_METHODS
from engine_models import (BUILDERS, CAUSAL_LMS, HAND_WRITTEN_LAYOUT, build, inputs_for, real_tokens,
                           reference_relevance)

RTOL = 1e-4  # max|relfast - reference| / max|reference|, float64


def explainer_for(name, model, method, **options):
    layout = relfast.TokenLayout(**HAND_WRITTEN_LAYOUT) if name == "hand-written" else None
    return relfast.Explainer(model, method, layout=layout, **options)


def relative_error(actual, expected):
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def check_against_reference(name, model, inputs, out, method):
    batch = out.relevance.shape[0]
    for b in range(batch):
        single, where = real_tokens(name, inputs, b)
        expected, target = reference_relevance(name, model, single, method, int(out.target[b]))
        assert relative_error(out.relevance[b, where], expected) <= RTOL, (name, method, b)
        outside = torch.ones(out.relevance.shape[1], dtype=torch.bool)
        outside[where] = False
        assert torch.all(out.relevance[b, outside] == 0), "padding must get no relevance"


def test_models_run_the_attention_they_were_loaded_with():
    assert build("hf-vit").config._attn_implementation == "sdpa"
    assert build("gpt2").config._attn_implementation == "sdpa"
    assert all(block.attn.fused_attn for block in build("timm-vit").blocks)


@pytest.mark.parametrize("method", ATTENTION_METHODS)  # LRP methods: tests/test_lrp.py
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_batched_equals_per_sample_eager_reference(name, method):
    model = build(name)
    inputs = inputs_for(name, batch=3)
    out = explainer_for(name, model, method)(inputs)
    assert out.relevance.dtype == torch.float32 and out.relevance.shape[0] == 3
    for b in range(3):  # the explained class is the argmax of the sample's own scores
        single, _ = real_tokens(name, inputs, b)
        assert int(out.target[b]) == int(out.logits[b].argmax())
    check_against_reference(name, model, inputs, out, method)


@pytest.mark.parametrize("name", sorted(CAUSAL_LMS))
def test_causal_lm_explicit_next_tokens_and_unpadded_batches(name):
    """target = a token id per sample; a batch without attention_mask (SDPA's is_causal path,
    and grouped-query attention without repeated heads)."""
    model = build(name)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 60, (3, 8), generator=g)
    tokens = torch.tensor([3, 17, 42])
    out = relfast.Explainer(model)(ids, target=tokens)
    assert torch.equal(out.target, tokens)
    for b in range(3):
        expected, _ = reference_relevance(name, model, {"input_ids": ids[b:b + 1]}, "generic", int(tokens[b]))
        assert relative_error(out.relevance[b], expected) <= RTOL


def test_causal_lm_right_padding_explains_the_last_real_token():
    model = build("llama")
    inputs = inputs_for("llama", batch=3)
    right = {k: torch.stack([torch.cat([v[b][inputs["attention_mask"][b] == 1], v[b][inputs["attention_mask"][b] == 0]])
                             for b in range(3)]) for k, v in inputs.items()}
    out = relfast.Explainer(model)(right)
    lengths = right["attention_mask"].sum(1)
    for b in range(3):
        expected, _ = reference_relevance("llama", model, {"input_ids": right["input_ids"][b:b + 1, :lengths[b]]},
                                          "generic", int(out.target[b]))
        assert relative_error(out.relevance[b, :lengths[b]], expected) <= RTOL


@pytest.mark.parametrize("name", ["hf-vit", "gpt2", "torchvision-vit"])
def test_multi_target_equals_separate_calls(name):
    model = build(name)
    inputs = inputs_for(name, batch=3)
    explainer = relfast.Explainer(model)
    classes = [[0, 3], [4, 4], [2, 1]]
    out = explainer(inputs, target=classes)
    assert out.relevance.shape[:2] == (3, 2)
    for k in range(2):
        single = explainer(inputs, target=torch.tensor([c[k] for c in classes]))
        torch.testing.assert_close(out.relevance[:, k], single.relevance)


def test_full_matrix_rows_equal_the_explained_row_on_sdpa_models():
    model = build("hf-bert")
    inputs = inputs_for("hf-bert", batch=3)
    full = relfast.Explainer(model, full_matrix=True)(inputs)
    row = relfast.Explainer(model)(inputs)
    assert full.relevance.shape == (3, 9, 9)
    torch.testing.assert_close(full.relevance[:, 0], row.relevance)


def test_explicit_layout_gives_image_maps():
    model = build("hand-written")
    out = explainer_for("hand-written", model, "generic")(inputs_for("hand-written", batch=2))
    assert out.image_map().shape == (2, 4, 4)
    pixels = out.image_map(upsample=True)
    assert pixels.shape == (2, 32, 32)
    assert torch.allclose(pixels.amax(dim=(1, 2)), torch.ones(2))


def test_a_layout_that_does_not_fit_the_model_is_an_error():
    model = build("hand-written")
    explainer = relfast.Explainer(model, layout=relfast.TokenLayout(prefix_tokens=1, patch_grid=(3, 3)))
    with pytest.raises(ValueError, match="layout describes 10 tokens"):
        explainer(inputs_for("hand-written", batch=2))


def test_an_unlisted_model_without_layout_names_the_way_out():
    with pytest.raises(ValueError, match="TokenLayout"):
        relfast.Explainer(build("hand-written"))


def test_a_model_that_shows_no_attention_is_an_error():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5)).double().eval()
    with pytest.raises(ValueError, match="no attention was seen"):
        relfast.Explainer(model, layout=relfast.TokenLayout())(torch.randn(2, 3, 32, 32, dtype=torch.float64))


@pytest.mark.parametrize("name", ["hf-vit", "timm-vit", "torchvision-vit", "gpt2", "llama", "hand-written"])
def test_float32_models_match_the_float64_reference(name):
    """The same weights in float32: relfast's float32 result against the float64 reference (the
    error is the float32 forward's, amplified by the gradient: 1e-3 of the scale)."""
    model64 = build(name)
    inputs = inputs_for(name, batch=3)
    model32 = build(name).float()
    inputs32 = inputs.float() if torch.is_tensor(inputs) else {
        k: v.float() if v.dtype.is_floating_point else v for k, v in inputs.items()}
    out = explainer_for(name, model32, "generic")(inputs32)
    for b in range(3):
        single, where = real_tokens(name, inputs, b)
        expected, _ = reference_relevance(name, model64, single, "generic", int(out.target[b]))
        assert relative_error(out.relevance[b, where], expected) <= 1e-3, (name, b)


@pytest.mark.parametrize("name", ["hf-vit", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_agree_with_float32(name, dtype):
    """Half-precision models (SDPA records recompute the probabilities with float32 accumulation):
    the maps agree with the float32 model's on the same weights, within half-precision error."""
    model = build(name).float()
    inputs = inputs_for(name, batch=3)
    inputs32 = inputs if not torch.is_tensor(inputs) and "input_ids" in inputs else {"pixel_values": inputs["pixel_values"].float()}
    full = relfast.Explainer(model)(inputs32)
    half_inputs = {k: v.to(dtype) if v.dtype.is_floating_point else v for k, v in inputs32.items()}
    half = relfast.Explainer(model.to(dtype))(half_inputs, target=full.target)
    assert half.relevance.dtype == torch.float32 and torch.isfinite(half.relevance).all()
    assert relative_error(half.relevance, full.relevance.double()) <= (2e-2 if dtype == torch.bfloat16 else 5e-3)
