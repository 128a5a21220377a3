"""Every method on float16 and bfloat16 models, against float64 (issue 19).

The reference is the same model in float64: the half model's own weights and inputs, cast up
exactly. Not the float64 model the half one was cast from: the LRP rules divide by sums that
nearly cancel, so rounding the weights to half moves the LRP maps by itself, in float64 arithmetic
too (plain ``lrp`` on the bfloat16 timm ViT: cosine -0.14 to the unrounded model's map). That is
the model being explained, not an error of the arithmetic.

The maps (3 samples x their 2 top classes) are compared on their content: without the explained
token where the method adds the identity (its 1 would set the scale and hide the rest). Errors are
relative to the batch's largest content value, as in the other dtype tests, floored at the dtype's
smallest normal number times the largest value of the whole maps: the rows of the identity methods
are kept in the model's dtype, and float16 cannot hold the 1e-8 the tiny BERTs put beside the
identity's 1 (it holds zeros there). Cosines are taken per map, for the maps on the batch's scale
(content above 1/16 of it): smaller ones are what is left of a clamped sum that cancels (attention
GradCAM's), judged by the error bound alone.
"""
import functools

import pytest
import torch

import relfast
from relfast.explain.layout import TokenLayout
from relfast.explain.methods.attn_gradcam import AttnGradCAM
from relfast.explain.methods.base import Run

import engine_models as em
from test_lrp import FAMILIES, TARGETS, images, seeded_float64, vit
from test_model_untouched import model_state
from testing import RTOL

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

HALF = [torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}

LRP_FAMILIES = {"hf-vit": (vit, images), **FAMILIES}  # families with LRP rules, (build, inputs)
LANGUAGE_MODELS = {name: (getattr(em, name), functools.partial(em.inputs_for, name)) for name in ("gpt2", "llama")}
# label -> (method, options)
METHODS = {"generic": ("generic", {}), "generic_lrp": ("generic", {"use_lrp": True}),
           "transformer_attribution": ("transformer_attribution", {}), "lrp": ("lrp", {}),
           "partial_lrp": ("partial_lrp", {}), "rollout": ("rollout", {}), "raw_attention": ("raw_attention", {}),
           "attn_gradcam": ("attn_gradcam", {})}
WITH_IDENTITY = {"generic", "generic_lrp", "transformer_attribution", "rollout"}  # rows start from I
RELEVANCE_PASS = {"generic_lrp", "transformer_attribution", "lrp", "partial_lrp"}

# Largest relative error allowed, per method and dtype; u = the unit roundoff (fp16 2^-11 = 4.9e-4,
# bf16 2^-8 = 3.9e-3). In brackets: the largest error measured over these families, about half the
# bound or less.
TOLERANCE = {
    # the probabilities' own rounding, 4u as in tests/testing.py [fp16 1.1u, bf16 1.1u]
    "rollout": RTOL, "raw_attention": RTOL,
    # the half model's gradients ∇A in every layer's update, 10u [fp16 3.4u, bf16 2.6u]
    "generic": {torch.float16: 10 * UNIT_ROUNDOFF[torch.float16], torch.bfloat16: 10 * UNIT_ROUNDOFF[torch.bfloat16]},
    # the last layer's ∇A, averaged over columns of either sign, then clamped [fp16 0.0072, bf16 0.024]
    "attn_gradcam": {torch.float16: 0.02, torch.bfloat16: 0.06},
    # ∇A as for generic; R_A from the float32 relevance pass, where sums that cancel to 1e-5 of
    # their terms (deit in fp16) leave float32's own error amplified [fp16 0.0122, bf16 0.0159]
    "generic_lrp": {torch.float16: 0.03, torch.bfloat16: 0.04},
    "transformer_attribution": {torch.float16: 0.03, torch.bfloat16: 0.04},
    # the float32 relevance pass alone, the same map as a float32 model of the same weights gives
    # (test_the_relevance_pass_of_a_half_model_is_the_float32_pass): no half-precision term
    # [lrp 0.025 (deit fp16, as its float32 model), partial_lrp 2.4e-4]
    "lrp": {torch.float16: 0.05, torch.bfloat16: 0.05},
    "partial_lrp": {torch.float16: 1e-3, torch.bfloat16: 1e-3},
}
MIN_COSINE = 0.99


def cast(inputs, dtype):
    if torch.is_tensor(inputs):
        return inputs.to(dtype)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def family(name):
    return LRP_FAMILIES[name] if name in LRP_FAMILIES else LANGUAGE_MODELS[name]


@functools.lru_cache(maxsize=None)
def models(name, dtype):
    """(the half model, the same weights in float64); explaining leaves both as they were."""
    build, _ = family(name)
    return seeded_float64(build).to(dtype), seeded_float64(build).to(dtype).double()


@functools.lru_cache(maxsize=None)
def top_classes(name, dtype):
    """(B, 2): the two best classes of each sample, by the float64 model."""
    _, full = models(name, dtype)
    inputs = cast(cast(family(name)[1](), dtype), torch.float64)
    return relfast.Explainer(full, "raw_attention")(inputs).logits.topk(2, dim=-1).indices


def explained_token(name):
    return -1 if name in em.CAUSAL_LMS else 0  # LMs are padded on the left and explain the last token


def map_errors(name, label, dtype):
    """(relative errors, cosines) of the (sample, target) maps of the half model against the same
    model in float64."""
    method, options = METHODS[label]
    half, full = models(name, dtype)
    inputs, targets = cast(family(name)[1](), dtype), top_classes(name, dtype)
    got = relfast.Explainer(half, method, **options)(inputs, target=targets).relevance
    expected = relfast.Explainer(full, method, **options)(cast(inputs, torch.float64), target=targets).relevance
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    got, expected = got.double().flatten(0, 1), expected.double().flatten(0, 1)  # (B * K, ...)
    floor = torch.finfo(dtype).tiny * float(expected.abs().max())
    if label in WITH_IDENTITY:
        keep = torch.ones(expected.shape[-1], dtype=torch.bool)
        keep[explained_token(name)] = False
        got, expected = got[..., keep], expected[..., keep]
    got, expected = got.flatten(1), expected.flatten(1)
    content = expected.abs().amax(1)
    assert float(content.max()) > 0, "no map has content: the comparison would prove nothing"
    scale = max(float(content.max()), floor)
    errors = (got - expected).abs().amax(1) / scale
    on_scale = content > scale / 16
    cosines = (got * expected).sum(1)[on_scale] / (got.norm(dim=1) * expected.norm(dim=1))[on_scale]
    return errors, cosines


def cases(families, labels):
    return [pytest.param(name, label, dtype, id=f"{name}-{label}-{str(dtype)[6:]}")
            for name in families for label in labels for dtype in HALF]


@pytest.mark.parametrize("name, label, dtype", cases(LRP_FAMILIES, METHODS) + cases(LANGUAGE_MODELS, METHODS))
def test_every_method_in_half_precision_is_near_float64(name, label, dtype):
    errors, cosines = map_errors(name, label, dtype)
    assert float(errors.max()) <= TOLERANCE[label][dtype], f"relative errors {errors.tolist()}"
    assert cosines.numel() == 0 or float(cosines.min()) >= MIN_COSINE, f"cosines {cosines.tolist()}"


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("label", ["lrp", "partial_lrp"])
@pytest.mark.parametrize("name", sorted(LRP_FAMILIES))
def test_the_relevance_pass_of_a_half_model_is_the_float32_pass(name, label, dtype):
    """The relevance pass of a half model computes in float32 (its only forward for these two
    methods): its map is a float32 model's with the same weights, to float32 rounding, and the
    half model keeps its dtype, weights and state."""
    build, make_inputs = family(name)
    half = seeded_float64(build).to(dtype)
    weights = {k: v.clone() for k, v in half.state_dict().items()}
    state = model_state(half)
    inputs = cast(make_inputs(), dtype)
    method, options = METHODS[label]
    got = relfast.Explainer(half, method, **options)(inputs, target=TARGETS).relevance
    single = relfast.Explainer(seeded_float64(build).to(dtype).float(), method, **options)(
        cast(inputs, torch.float32), target=TARGETS).relevance
    scale = float(single.abs().max())
    assert scale > 0
    torch.testing.assert_close(got, single, rtol=1e-6, atol=1e-6 * scale)
    assert model_state(half) == state
    for key, value in half.state_dict().items():
        assert value.dtype == weights[key].dtype and torch.equal(value, weights[key]), key


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_attention_gradcam_of_half_gradients_is_computed_in_float32(dtype):
    """Its head weights average gradients of either sign: from half gradients and probabilities the
    map is computed in float32, as float64 computes it from the same values to float32 rounding
    (half arithmetic is off by its own rounding, 1e-3 to 1e-2 of the map)."""
    g = torch.Generator().manual_seed(5)
    batch, heads, n = 3, 4, 50
    grad = torch.randn(batch, heads, n, n, generator=g, dtype=torch.float64).to(dtype)
    attn = torch.randn(batch, heads, n, n, generator=g, dtype=torch.float64).softmax(-1).to(dtype)
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[2, 40:] = False
    run = Run(records=[], rows=torch.tensor([0, 3, 7]), token_mask=mask, layout=TokenLayout(prefix_tokens=1),
              scores=torch.zeros(batch, 2), explained=None, targets=None)
    got = AttnGradCAM._map(run, grad, attn)
    expected = AttnGradCAM._map(run, grad.double(), attn.double())
    assert got.dtype == torch.float32 and float(expected.max()) > 0
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.max()))
