"""An explanation never edits, re-configures or leaves anything on the model: attention
implementation, timm's fused_attn, hooks, training mode and requires_grad are the same during
the call (seen from inside it, through a callable target), after it, and after a call that
fails midway. One Explainer serves several threads at once."""
import threading

import pytest
import torch

import relfast
from relfast.explain.methods import ATTENTION_METHODS
from engine_models import HAND_WRITTEN_LAYOUT, build as build_sdpa, inputs_for as engine_inputs

# HF models as loaded (SDPA) and with eager attention: transformers' own output_attentions path
# installs hooks for good, so eager models are where leftovers would show.
EAGER = ["hf-vit-eager", "hf-bert-eager", "gpt2-eager", "llama-eager"]
NAMES = ["hf-vit", "hf-bert", "timm-vit", "torchvision-vit", "gpt2", "llama", "hand-written"] + EAGER


def build(name):
    if not name.endswith("-eager"):
        return build_sdpa(name)
    model = build_sdpa(name[:-len("-eager")])
    if name == "llama-eager":  # HF's eager Llama turns left-padded float64 samples into NaN (its own mask)
        model.float()
    model.set_attn_implementation("eager")
    return model


def inputs_for(name, *args, **kwargs):
    inputs = engine_inputs(name.removesuffix("-eager"), *args, **kwargs)
    return {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()} if name == "llama-eager" \
        else inputs


def explainer_for(name, model, method="generic"):
    layout = relfast.TokenLayout(**HAND_WRITTEN_LAYOUT) if name == "hand-written" else None
    return relfast.Explainer(model, method, layout=layout)


def model_state(model):
    """Everything a call could change, in comparable form."""
    hooks = []
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_state_dict_hooks", "_load_state_dict_pre_hooks"):
            hooks.append((name, kind, tuple(getattr(module, kind, {}).keys())))
    globals_ = torch.nn.modules.module
    return {
        "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
        "fused_attn": [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")],
        "training": [m.training for m in model.modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "grads": [n for n, p in model.named_parameters() if p.grad is not None],
        "hooks": hooks,
        "parameter_hooks": [(n, bool(getattr(p, "_backward_hooks", None))) for n, p in model.named_parameters()],
        "global_hooks": (len(globals_._global_forward_hooks), len(globals_._global_forward_pre_hooks),
                         len(globals_._global_backward_hooks)),
    }


def user_setup(model):
    """A user's own state that must survive: a frozen parameter and a forward hook that counts."""
    first = next(model.parameters())
    first.requires_grad_(False)
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls


@pytest.mark.parametrize("name", NAMES)
def test_state_is_untouched_during_and_after_a_call(name):
    model = build(name)
    calls = user_setup(model)
    before = model_state(model)
    seen_during = []

    def target(scores):  # runs inside the call, after the forward
        seen_during.append(model_state(model))
        return scores[:, 0]

    out = explainer_for(name, model)(inputs_for(name), target=target)
    assert torch.isfinite(out.relevance).all()
    assert seen_during == [before]
    assert model_state(model) == before
    assert len(calls) == 1, "the user's own hook runs once per call, as in a plain forward"


class FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("failing in the middle of the backward")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("where", ["after the forward", "in the backward"])
def test_state_is_untouched_after_a_call_that_fails_midway(name, where):
    model = build(name)
    user_setup(model)
    before = model_state(model)
    explainer = explainer_for(name, model)
    inputs = inputs_for(name)

    def failing(scores):
        if where == "after the forward":
            raise RuntimeError("failing after the forward")
        return FailInBackward.apply(scores[:, 0])

    with pytest.raises(RuntimeError, match="failing"):
        explainer(inputs, target=failing)
    assert model_state(model) == before
    # and the explainer still works, giving what a fresh one gives
    torch.testing.assert_close(explainer(inputs).relevance, explainer_for(name, model)(inputs).relevance)


def test_set_attn_implementation_is_never_called():
    model = build("hf-vit")

    def refuse(*args, **kwargs):
        raise AssertionError("relfast must not switch the attention implementation")

    model.set_attn_implementation = refuse
    for method in relfast.explain.METHODS:
        out = relfast.Explainer(model, method)(inputs_for("hf-vit"))
        assert torch.isfinite(out.relevance).all()
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name,method", [("hf-vit", "rollout"), ("hf-vit", "raw_attention"), ("hf-vit", "generic"),
                                         ("timm-vit", "generic"), ("gpt2", "generic"), ("hf-bert", "attn_gradcam"),
                                         ("hf-vit", "transformer_attribution"), ("torchvision-vit", "lrp"),
                                         ("hf-vit-eager", "generic"), ("gpt2-eager", "generic"),
                                         ("hf-bert-eager", "transformer_attribution")])
def test_eight_threads_get_the_sequential_results(name, method):
    model = build(name)
    explainer = explainer_for(name, model, method)
    inputs = [inputs_for(name, batch=2, seed=100 + i) for i in range(8)]
    expected = [explainer(x).relevance for x in inputs]
    before = model_state(model)
    results, errors = [None] * 8, []
    start = threading.Barrier(8)

    def work(i):
        try:
            start.wait()
            for _ in range(3):  # overlap the calls several times
                results[i] = explainer(inputs[i]).relevance
        except Exception as error:  # reported below: a thread's exception must fail the test
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert model_state(model) == before


@pytest.mark.parametrize("name", ["hf-vit", "gpt2", "torchvision-vit"])
def test_a_model_in_training_mode_is_refused_before_any_work_and_left_training(name):
    model = build(name).train()
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        explainer_for(name, model)(inputs_for(name))
    assert forwards == [] and all(m.training for m in model.modules())


LRP_FAMILIES = ("hf-vit", "hf-bert", "timm-vit", "torchvision-vit", "hf-vit-eager", "hf-bert-eager")  # not the LMs


@pytest.mark.parametrize("name,method", [(name, method) for name in NAMES for method in relfast.explain.METHODS
                                         if method in ATTENTION_METHODS or name in LRP_FAMILIES])
def test_a_call_leaves_no_reference_cycles(name, method):
    """Everything a call built (the graph, the records) is freed when it returns, not when the
    garbage collector next runs: a cycle through the graph would hold all activations."""
    import gc

    model = build(name)
    explainer = explainer_for(name, model, method)
    inputs = inputs_for(name)
    explainer(inputs)
    gc.collect()
    gc.disable()
    try:
        explainer(inputs)
        assert gc.collect() == 0
    finally:
        gc.enable()


LRP_METHODS = [m for m in relfast.explain.METHODS if m not in ATTENTION_METHODS]


@pytest.mark.parametrize("method", LRP_METHODS)
@pytest.mark.parametrize("name", LRP_FAMILIES)
def test_relevance_methods_leave_the_model_bit_identical_also_when_failing_midway(name, method):
    """The relevance pass runs the model under its own mode (the call's only forward, also for
    transformer_attribution, which takes its gradients from that forward's graph): parameters,
    flags and hooks are as before, after a call and after one that fails inside the relevance
    forward. (A user's forward hook sees every forward of the call.)"""
    model = build(name)
    calls = user_setup(model)
    before, weights = model_state(model), {k: v.clone() for k, v in model.state_dict().items()}
    explainer = explainer_for(name, model, method)
    inputs = inputs_for(name)
    first = explainer(inputs)
    per_call = 1
    assert len(calls) == per_call and model_state(model) == before

    def fail_in_the_relevance_forward(module, args, output):
        if len(calls) == 2 * per_call:  # the relevance forward of the next call
            raise RuntimeError("failing in the relevance forward")

    handle = model.register_forward_hook(fail_in_the_relevance_forward)
    try:
        with pytest.raises(RuntimeError, match="failing in the relevance forward"):
            explainer(inputs)
    finally:
        handle.remove()
    assert model_state(model) == before
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(explainer(inputs).relevance, first.relevance)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,method", [("hf-vit", "generic"), ("hf-vit-eager", "transformer_attribution"),
                                         ("gpt2", "lrp"), ("hf-bert-eager", "attnlrp"), ("timm-vit", "rollout")])
def test_half_precision_models_are_left_as_found(name, method, dtype):
    """Half models: the relevance pass computes in float32, but the model keeps its dtype,
    parameters, flags and hooks, after a call and after one that fails midway."""
    model = build(name).to(dtype)
    calls = user_setup(model)
    failing = []

    def fail_when_asked(module, args, output):  # the user's own hook, there before and after
        if failing:
            raise RuntimeError("failing in the forward")

    model.register_forward_hook(fail_when_asked)
    before, weights = model_state(model), {k: v.clone() for k, v in model.state_dict().items()}
    inputs = inputs_for(name)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()} if isinstance(inputs, dict) \
        else inputs.to(dtype)
    explainer = explainer_for(name, model, method)
    assert torch.isfinite(explainer(inputs).relevance).all()
    assert len(calls) >= 1 and model_state(model) == before
    failing.append(1)
    with pytest.raises(RuntimeError, match="failing"):
        explainer(inputs)
    assert model_state(model) == before
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
