"""The generic rule on SDPA models runs through the fused op: the model's fused attention kernels
forward and backward, relevance from q, k, v, ∇O and the log-sum-exp, no (B, H, N, N) tensor
anywhere in the call, and the same maps as the model loaded with eager attention."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import relfast
from relfast.explain.capture import records
from engine_models import HAND_WRITTEN_LAYOUT, build, inputs_for

SDPA_FAMILIES = ["hf-vit", "hf-bert", "timm-vit", "gpt2", "llama", "qwen2", "hand-written"]


def explainer(name, model, **options):
    layout = relfast.TokenLayout(**HAND_WRITTEN_LAYOUT) if name == "hand-written" else None
    return relfast.Explainer(model, layout=layout, **options)


def float32(name, inputs):
    if torch.is_tensor(inputs):
        return inputs.float()
    return {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}


def eager_twin(name, model):
    """The same weights with eager attention: the probabilities exist as tensors there."""
    twin = copy.deepcopy(model)
    if name == "timm-vit":
        for block in twin.blocks:
            block.attn.fused_attn = False
    elif name == "hand-written":
        twin.switch.explicit = True
    else:
        twin.set_attn_implementation("eager")
    return twin


class LargestOutput(TorchDispatchMode):
    """The largest tensor any ATen op returns while active (views included)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused op's calls; any recomputation of A at an SDPA site fails the test."""
    calls = []
    real = relfast.ops.sdpa_row_relevance_update

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)

    def forbidden(self):
        raise AssertionError("an SDPA site formed its attention probabilities")

    monkeypatch.setattr(relfast.ops, "sdpa_row_relevance_update", counted)
    monkeypatch.setattr(records.SdpaRecord, "probabilities", forbidden)
    return calls


@pytest.mark.parametrize("name", SDPA_FAMILIES)
def test_sdpa_models_equal_their_eager_twins_through_the_fused_op(name, fused_calls):
    model = build(name).float()
    inputs = float32(name, inputs_for(name, batch=3))
    out = explainer(name, model)(inputs)
    assert len(fused_calls) == 3  # one per layer
    twin_out = explainer(name, eager_twin(name, model))(inputs)
    assert len(fused_calls) == 3  # the eager twin's probabilities are tensors: the fused op is not used
    assert torch.equal(out.target, twin_out.target)
    scale = twin_out.relevance.abs().max()
    torch.testing.assert_close(out.relevance, twin_out.relevance, rtol=1e-4, atol=1e-4 * float(scale))


@pytest.mark.parametrize("name", ["gpt2", "hf-bert"])
def test_several_targets_reuse_one_forward_through_the_fused_op(name, fused_calls):
    model = build(name).float()
    inputs = float32(name, inputs_for(name, batch=2))
    targets = [[1, 3], [0, 2]]
    both = explainer(name, model)(inputs, target=targets)
    for k in range(2):
        single = explainer(name, model)(inputs, target=torch.tensor([t[k] for t in targets]))
        torch.testing.assert_close(both.relevance[:, k], single.relevance)


@pytest.mark.parametrize("name", ["hf-bert", "gpt2", "llama"])
def test_no_tensor_of_the_attention_size_is_formed(name):
    """With N = 36 tokens and 4 heads, a (B, H, N, N) tensor is 4x larger than anything else the
    call needs; the eager twin (which must hold it) proves the probe sees it."""
    model = build(name).float()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 60, (2, 36), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "hf-bert":  # padding on the right; the LMs pad on the left
        inputs["attention_mask"][1, -7:] = 0
    else:
        inputs["attention_mask"][1, :7] = 0
    attention_size = 2 * 4 * 36 * 36
    with LargestOutput() as probe:
        explainer(name, model)(inputs)
    assert probe.largest < attention_size, probe.largest
    with LargestOutput() as eager_probe:
        explainer(name, eager_twin(name, model))(inputs)
    assert eager_probe.largest >= attention_size


def test_methods_that_read_the_probabilities_still_work_on_sdpa_models():
    """rollout and use_lrp need A: the sites recompute it per layer as before."""
    model = build("hf-vit").float()
    inputs = float32("hf-vit", inputs_for("hf-vit", batch=2))
    for method, options in (("rollout", {}), ("generic", {"use_lrp": True}), ("attn_gradcam", {})):
        out = relfast.Explainer(model, method, **options)(inputs)
        twin = relfast.Explainer(eager_twin("hf-vit", model), method, **options)(inputs)
        torch.testing.assert_close(out.relevance, twin.relevance, rtol=1e-4, atol=1e-5)
