"""timm VisionTransformer heads that read the mean of the tokens (global_pool="avg") are explained
at what they read: the mean of the pooled tokens' rows of R, not the class token's row. Compared
with a float64, one-sample-at-a-time reference written from [P2]'s rule on the eager
probabilities (a deep copy with fused_attn off, softmax outputs taken from the graph). Pooling
modes relfast does not explain are refused when the Explainer is made."""
import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import relfast


def model(**options):
    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5)
    kwargs.update(options)
    return VisionTransformer(**kwargs).double().eval()


def reference(net, image, start_layer=0):
    """[P2] rules 5-6 for one image: R = Π (I + E_h[(∇A ⊙ A)^+]) from start_layer on; the row the
    head reads is the mean of the pooled tokens' rows."""
    copy_ = copy.deepcopy(net)
    probabilities = []
    for block in copy_.blocks:
        block.attn.fused_attn = False  # our own copy: the softmax output is a graph tensor
        block.attn.attn_drop.register_forward_hook(lambda module, args, output: probabilities.append(output))
    logits = copy_(image)
    grads = torch.autograd.grad(logits[0, logits[0].argmax()], probabilities)
    n = probabilities[0].shape[-1]
    relevance = torch.eye(n, dtype=torch.float64)
    for attention, grad in list(zip(probabilities, grads))[start_layer:]:
        relevance = relevance + (grad * attention).clamp(min=0).mean(dim=1)[0] @ relevance
    first = 0 if net.pool_include_prefix else net.num_prefix_tokens
    row = torch.zeros(n, dtype=torch.float64)
    row[first:] = 1.0 / (n - first)
    return row @ relevance


@pytest.mark.parametrize("options", [dict(global_pool="avg"), dict(global_pool="avg", class_token=False),
                                     dict(global_pool="avg", reg_tokens=2), dict(global_pool="avg", no_embed_class=True)],
                         ids=["cls", "no-class-token", "register-tokens", "no-embed-class"])
@pytest.mark.parametrize("start_layer", [0, -1])
def test_mean_pooled_heads_are_explained_at_the_mean_row(options, start_layer):
    net = model(**options)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = relfast.Explainer(net, start_layer=start_layer)(images)
    for b in range(images.shape[0]):
        expected = reference(net, images[b:b + 1], start_layer % 3)
        torch.testing.assert_close(out.relevance[b].double(), expected, rtol=1e-5, atol=1e-6)
    if start_layer == -1:  # the last layer alone: the patch map is the mean rows' own attention, not 0
        assert out.image_map().abs().sum() > 0


def class_token_head(net):
    """The same weights, the head reading the class token."""
    token = copy.deepcopy(net)
    token.global_pool = "token"
    return token


def test_avg_and_token_pooling_explain_different_rows():
    """Same weights, the head reading the class token vs the mean: the maps differ."""
    avg = model(global_pool="avg")
    token = class_token_head(avg)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got_avg = relfast.Explainer(avg)(images).relevance
    got_token = relfast.Explainer(token)(images).relevance
    assert not torch.allclose(got_avg, got_token, atol=1e-3)


@pytest.mark.parametrize("method", ["rollout", "raw_attention", "attn_gradcam", "transformer_attribution"])
def test_other_methods_read_the_mean_row_too(method):
    """Batched results equal per-sample ones, and differ from the class-token head's map."""
    net = model(global_pool="avg")
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    explainer = relfast.Explainer(net, method)
    batched = explainer(images).relevance
    for b in range(3):
        torch.testing.assert_close(batched[b], explainer(images[b:b + 1]).relevance[0], rtol=1e-5, atol=1e-6)
    if method in ("rollout", "raw_attention"):  # class-agnostic: the mean of the class-token-free rows
        token = class_token_head(net)
        assert not torch.allclose(batched, relfast.Explainer(token, method)(images).relevance, atol=1e-4)


@pytest.mark.parametrize("options,words", [
    (dict(global_pool="map"), "'map'"),
    (dict(global_pool="max"), "'max'"),
    (dict(global_pool="avgmax"), "'avgmax'"),
    (dict(global_pool=""), "''"),
])
def test_pooling_relfast_does_not_explain_is_refused(options, words):
    with pytest.raises(ValueError) as error:
        relfast.Explainer(model(**options))
    assert words in str(error.value) and str(error.value).startswith("relfast.Explainer"), str(error.value)
