"""The relevance pass as a gradient pass: transformer_attribution takes ∇A from its relevance
forward's graph (one forward per call), with every rule's backward switched to the vector-Jacobian
product of the op it computed. Here that gradient is compared with the model's own autograd
gradient, on every family the [P1] rules cover (written-out gelu_new and RMSNorm, rotary
embeddings, gated MLPs, grouped-query heads, padding included), float64."""
import pytest
import torch

from relfast.explain.families import family_for
from relfast.explain.lrp import RelevancePass
from relfast.explain.session import _graph_inputs

import engine_models as em

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

NAMES = ("hf-vit", "hf-bert", "timm-vit", "torchvision-vit", "gpt2", "llama", "qwen2", "mistral")


def relevance_pass(model, inputs, gradients=True):
    family = family_for(model)
    call = _graph_inputs(family.parse(inputs))
    rp = RelevancePass(family, call, True, gradients=gradients)  # the CVPR method's rules
    _, maps = rp.forward()
    call.rows = family.explained_rows(call, maps[0].shape[-1], torch.device("cpu"))  # as the session sets them
    return rp


def model_gradient(name, model, inputs, seed, call):
    """The model's own gradient of <scores, seed> at its pixels or word embeddings, with the
    call's other inputs (the position ids relfast derives from the mask)."""
    if name in em.VISION:
        pixels = (inputs if torch.is_tensor(inputs) else inputs["pixel_values"]).clone().requires_grad_()
        output = model(pixels) if torch.is_tensor(inputs) else model(pixel_values=pixels)
        logits = output if torch.is_tensor(output) else output.logits
        (grad,) = torch.autograd.grad(logits, pixels, seed)
        return grad
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_()
    others = {k: v for k, v in call.kwargs.items() if k != "input_ids"}
    logits = model(inputs_embeds=embeds, **others).logits
    if name in em.CAUSAL_LMS:
        logits = logits[:, -1]  # left padding: every sample's last real token is the last position
    (grad,) = torch.autograd.grad(logits, embeds, seed)
    return grad


@pytest.mark.parametrize("name", NAMES)
def test_the_gradient_pass_is_the_models_gradient(name):
    model = em.build(name)
    inputs = em.inputs_for(name)
    rp = relevance_pass(model, inputs)
    scores = rp.scores
    seed = torch.randn(scores.shape, dtype=scores.dtype, generator=torch.Generator().manual_seed(5))
    (leaf,) = rp.input_leaves()
    with rp.computing_gradients():
        (got,) = torch.autograd.grad(scores, leaf, seed, retain_graph=True)
    expected = model_gradient(name, model, inputs, seed, rp.call)
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11 * float(expected.abs().max()))

    # the same graph still propagates relevance afterwards: not the gradient
    (relevance,) = torch.autograd.grad(scores, leaf, seed)
    assert not torch.allclose(relevance, expected)


def test_gradients_are_refused_by_a_pass_made_for_relevance_only():
    model = em.build("hf-vit")
    rp = relevance_pass(model, em.inputs_for("hf-vit"), gradients=False)
    with pytest.raises(RuntimeError, match="not made for gradients"):
        with rp.computing_gradients():
            pass


def test_the_gradient_switch_is_reset_when_the_backward_fails():
    model = em.build("hf-vit")
    inputs = em.inputs_for("hf-vit")
    rp = relevance_pass(model, inputs)
    scores = rp.scores
    (leaf,) = rp.input_leaves()
    with pytest.raises(RuntimeError, match="failing midway"):
        with rp.computing_gradients():
            handle = rp.forward()[1][-1].register_hook(lambda grad: (_ for _ in ()).throw(RuntimeError("failing midway")))
            try:
                torch.autograd.grad(scores[:, 0].sum(), leaf, retain_graph=True)
            finally:
                handle.remove()
    assert not rp.state.gradients
    fresh = relevance_pass(model, inputs, gradients=False)
    (expected,) = torch.autograd.grad(fresh.scores[:, 0].sum(), fresh.input_leaves())
    (got,) = torch.autograd.grad(scores[:, 0].sum(), leaf)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
