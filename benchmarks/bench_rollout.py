"""rollout over 12 layers (ViT-B depth): fused vs the eager chain (per layer: head mean, + I,
row normalisation, bmm). GEMM-bound (2·B·N³ flops per layer after the first): at the long
shape one call takes ~2.5 s (relfast) / ~3.5 s (eager) on the 2-core CPU."""
import pytest

from relfast import ops, reference

OP = "rollout"
LAYERS = 12
IMPLS = {"relfast": ops.rollout, "torch": reference.rollout}


@pytest.mark.parametrize("impl", IMPLS)
def test_rollout(measure, inputs, check, shape, impl):
    attentions = [inputs.attn(shape) for _ in range(LAYERS)]
    out = ops.rollout(attentions)
    check(out, reference.rollout(attentions))
    fn = IMPLS[impl]
    measure(lambda: fn(attentions), op=OP, shape=shape, impl=impl, reads=attentions, writes=[out])
