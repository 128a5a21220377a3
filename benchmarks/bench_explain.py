"""End-to-end explanation of a ViT-B/16-shaped model (HF ``ViTForImageClassification``, default
config: 224 px, 12 layers, 12 heads, hidden 768, 1000 classes, random weights, float32) on the
CPU, at batch 1 and 8, one group per batch (``explain-vitb16-b<B>``):

* ``forward``: the plain forward under ``torch.no_grad()`` with the model's default (SDPA)
  attention, what production inference costs;
* ``floor``: one eager forward (``output_attentions=True``) plus one input-gradient backward
  (``autograd.grad`` of the target logits w.r.t. ``pixel_values``, parameters frozen): the
  physical floor of a gradient-based explanation, about 2x the forward's FLOPs;
* ``relfast``: ``relfast.Explainer(model)(pixels)`` (method "generic");
* ``reference``: the algorithm as the papers' code runs it: one sample at a time, eager attention,
  attention gradients saved by tensor hooks, ``model.zero_grad()`` then ``one_hot.backward()``
  with the parameters requiring grad (weight gradients computed, about 3x the forward's FLOPs),
  then the full-matrix rule ``R = R + E_h[(grad * attn)^+] @ R`` from ``R = I`` and its row 0.

The reference is checked against relfast's relevance before it is timed. Medians feed the
"end-to-end explanation" table printed at the end of the session (conftest.py). Each benchmark
leaves the model as it found it (attention implementation, ``requires_grad``, no ``.grad``).
"""
from contextlib import contextmanager

import pytest
import torch

import relfast

transformers = pytest.importorskip("transformers")

BATCHES = (1, 8)
ROUNDS = {1: 5, 8: 3}  # each round of batch 8 takes seconds on 2 cores
IMPLS = ("forward", "floor", "relfast", "reference")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000))
    return net.float().eval()


@pytest.fixture(params=BATCHES, ids=lambda b: f"b{b}")
def pixels(request):
    gen = torch.Generator().manual_seed(request.param)
    return torch.randn(request.param, 3, 224, 224, generator=gen, dtype=torch.float32)


@contextmanager
def eager(model):
    """Eager attention for the block (the attention probabilities exist only there), then back."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@contextmanager
def parameters_requiring_grad(model, flag):
    """Sets ``requires_grad`` of every parameter for the block, then restores each one; drops
    any ``.grad`` the block left behind."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in before:
        p.requires_grad_(flag)
    try:
        yield
    finally:
        for p, req in before:
            p.requires_grad_(req)
        model.zero_grad(set_to_none=True)


def reference_one(model, single, target=None):
    """The papers' algorithm for one sample (1, 3, H, W) -> the explained row (N,). Runs under
    eager attention with the parameters requiring grad (the caller's job)."""
    out = model(pixel_values=single, output_attentions=True)
    attentions = out.attentions
    saved = [None] * len(attentions)

    def saver(i):
        def save(grad):
            saved[i] = grad
        return save

    for i, attn in enumerate(attentions):
        attn.register_hook(saver(i))
    logits = out.logits
    if target is None:
        target = int(logits.detach().argmax(dim=-1)[0])
    one_hot = torch.zeros_like(logits)
    one_hot[0, target] = 1
    one_hot = (one_hot * logits).sum()
    model.zero_grad()
    one_hot.backward()
    n = attentions[0].shape[-1]
    R = torch.eye(n, dtype=logits.dtype)
    for grad, attn in zip(saved, attentions):
        cam = (grad[0] * attn[0].detach()).clamp(min=0).mean(dim=0)
        R = R + torch.matmul(cam, R)
    return R[0]


def reference(model, pixels, targets=None):
    """The reference over a batch: one sample at a time -> (B, N)."""
    with eager(model), parameters_requiring_grad(model, True):
        rows = [reference_one(model, pixels[b:b + 1], None if targets is None else int(targets[b]))
                for b in range(pixels.shape[0])]
    return torch.stack(rows)


def floor(model, pixels):
    """One eager forward plus one input-gradient backward, parameters frozen."""
    with eager(model), parameters_requiring_grad(model, False), torch.enable_grad():
        x = pixels.detach().requires_grad_(True)
        logits = model(pixel_values=x, output_attentions=True).logits
        y = logits.gather(1, logits.detach().argmax(dim=-1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(y, x)
    return grad


def forward(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels).logits


@pytest.mark.parametrize("impl", IMPLS)
def test_explain(benchmark, explain_results, model, pixels, impl):
    B = pixels.shape[0]
    explainer = relfast.Explainer(model)
    if impl == "forward":
        assert model.config._attn_implementation != "eager"  # production inference: fused attention
        fn = lambda: forward(model, pixels)  # noqa: E731
    elif impl == "floor":
        fn = lambda: floor(model, pixels)  # noqa: E731
    elif impl == "relfast":
        fn = lambda: explainer(pixels)  # noqa: E731
    else:
        # correctness before timing: the reference's rows equal relfast's, for relfast's targets
        out = explainer(pixels)
        expected = reference(model, pixels, out.target).detach()
        scale = expected.abs().max().item()
        torch.testing.assert_close(out.relevance, expected, rtol=1e-4, atol=1e-6 * scale)
        fn = lambda: reference(model, pixels)  # noqa: E731

    benchmark.group = f"explain-vitb16-b{B}"
    benchmark.extra_info.update(model="ViT-B/16 224px", batch=B, impl=impl,
                                attn=model.config._attn_implementation if impl == "forward" else "eager")
    benchmark.pedantic(fn, rounds=ROUNDS[B], iterations=1, warmup_rounds=1)
    assert model.config._attn_implementation != "eager"
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    if benchmark.stats is not None:  # None under --benchmark-disable
        explain_results[("vitb16", B)][impl] = benchmark.stats.stats.median
