"""End-to-end explanation of two models as production loads them (HF defaults: SDPA attention;
random weights, float32, CPU), one group per model and batch (``explain-<model>-b<B>``):

* ``vitb16``: a ViT-B/16-shaped ``ViTForImageClassification`` (224 px, 12 layers, 12 heads,
  hidden 768, 1000 classes), batch 1 and 8;
* ``gpt2s``: a GPT-2-small-shaped ``GPT2LMHeadModel`` (12 layers, 12 heads, hidden 768, vocabulary
  50257), one prompt of 512 tokens, explaining the next token.

Implementations, each timed on the same inputs:

* ``forward``: the plain forward under ``torch.no_grad()``, what production inference costs;
* ``floor``: one forward plus one input-gradient backward (gradient of the explained logits
  w.r.t. the embeddings' output, parameters frozen), with the model's own SDPA attention: the
  physical floor of a gradient-based explanation;
* ``relfast``: ``relfast.Explainer(model)(inputs)`` (method "generic");
* ``reference``: the algorithm as the papers' code runs it: one sample at a time, eager
  attention, attention gradients saved by tensor hooks, ``model.zero_grad()`` then
  ``one_hot.backward()`` with the parameters requiring grad (weight gradients computed), then the
  full-matrix rule ``R = R + E_h[(grad * attn)^+] @ R`` from ``R = I`` and the explained row.

The reference is checked against relfast's relevance before it is timed. Medians feed the
"end-to-end explanation" table printed at the end of the session (conftest.py). Each benchmark
leaves the model as it found it (attention implementation, ``requires_grad``, no ``.grad``).
The file uses only relfast's public API, so it also times an earlier relfast (``-k vitb16``).
"""
from contextlib import contextmanager

import pytest
import torch

import relfast

transformers = pytest.importorskip("transformers")

CASES = [("vitb16", 1), ("vitb16", 8), ("gpt2s", 1)]
ROUNDS = {("vitb16", 1): 5, ("vitb16", 8): 3, ("gpt2s", 1): 3}
IMPLS = ("forward", "floor", "relfast", "reference")
SEQUENCE = 512


@pytest.fixture(scope="module")
def models():
    built = {}

    def get(name):
        if name not in built:
            torch.manual_seed(0)
            if name == "vitb16":
                net = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000))
            else:
                net = transformers.GPT2LMHeadModel(transformers.GPT2Config())
            built[name] = net.float().eval()
        return built[name]

    return get


def make_inputs(name, batch):
    gen = torch.Generator().manual_seed(batch)
    if name == "vitb16":
        return {"pixel_values": torch.randn(batch, 3, 224, 224, generator=gen)}
    return {"input_ids": torch.randint(0, 50257, (batch, SEQUENCE), generator=gen)}


def explained_logits(name, output):
    """(B, C): class logits, or the next-token logits at the last position."""
    return output.logits if name == "vitb16" else output.logits[:, -1]


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


def reference_one(name, model, single, target=None):
    """The papers' algorithm for one sample -> the explained row (N,). Runs under eager attention
    with the parameters requiring grad (the caller's job)."""
    extra = {} if name == "vitb16" else {"use_cache": False}
    out = model(**single, output_attentions=True, **extra)
    attentions = out.attentions
    saved = [None] * len(attentions)

    def saver(i):
        def save(grad):
            saved[i] = grad
        return save

    for i, attn in enumerate(attentions):
        attn.register_hook(saver(i))
    logits = explained_logits(name, out)
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
    return R[0] if name == "vitb16" else R[-1]


def reference(name, model, inputs, targets=None):
    """The reference over a batch: one sample at a time -> (B, N)."""
    batch = next(iter(inputs.values())).shape[0]
    with eager(model), parameters_requiring_grad(model, True):
        rows = [reference_one(name, model, {k: v[b:b + 1] for k, v in inputs.items()},
                              None if targets is None else int(targets[b])) for b in range(batch)]
    return torch.stack(rows)


def input_gradient(model, inputs, embeddings, explained, **forward_kwargs):
    """One forward plus one input-gradient backward from ``embeddings``' output, parameters frozen;
    ``explained(output)`` gives the (B, C) logits whose argmax is explained."""
    with parameters_requiring_grad(model, False), torch.enable_grad():
        start = []

        def leaf(module, args, output):
            output = output.detach().requires_grad_()
            start.append(output)
            return output

        handle = embeddings.register_forward_hook(leaf)
        try:
            out = model(**inputs, **forward_kwargs)
        finally:
            handle.remove()
        logits = explained(out)
        y = logits.gather(1, logits.detach().argmax(dim=-1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(y, start[0])
    return grad


def floor(name, model, inputs):
    """One SDPA forward plus one input-gradient backward from the embeddings' output, parameters
    frozen."""
    embeddings = model.vit.embeddings.patch_embeddings if name == "vitb16" else model.get_input_embeddings()
    return input_gradient(model, inputs, embeddings, lambda out: explained_logits(name, out),
                          **({} if name == "vitb16" else {"use_cache": False}))


def forward(name, model, inputs):
    with torch.no_grad():
        return model(**inputs, **({} if name == "vitb16" else {"use_cache": False})).logits


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-b{c[1]}")
def test_explain(benchmark, explain_results, models, case, impl):
    name, batch = case
    model = models(name)
    inputs = make_inputs(name, batch)
    explainer = relfast.Explainer(model)
    attention = model.config._attn_implementation
    assert attention == "sdpa"  # production inference: fused attention
    if impl == "forward":
        fn = lambda: forward(name, model, inputs)  # noqa: E731
    elif impl == "floor":
        fn = lambda: floor(name, model, inputs)  # noqa: E731
    elif impl == "relfast":
        fn = lambda: explainer(inputs)  # noqa: E731
    else:
        # correctness before timing: the reference's rows equal relfast's, for relfast's targets
        out = explainer(inputs)
        expected = reference(name, model, inputs, out.target).detach()
        scale = expected.abs().max().item()
        torch.testing.assert_close(out.relevance, expected, rtol=1e-4, atol=1e-5 * scale)
        fn = lambda: reference(name, model, inputs)  # noqa: E731

    benchmark.group = f"explain-{name}-b{batch}"
    benchmark.extra_info.update(model=name, batch=batch, impl=impl,
                                attn="eager" if impl == "reference" else attention)
    benchmark.pedantic(fn, rounds=ROUNDS[case], iterations=1, warmup_rounds=1)
    assert model.config._attn_implementation == attention
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    if benchmark.stats is not None:  # None under --benchmark-disable
        explain_results[(name, batch)][impl] = benchmark.stats.stats.median
