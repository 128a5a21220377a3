"""head_mean_grad_attn: fused ``E_h[(grad * attn)^+]`` vs the eager chain (mul, clamp, mean),
plus the read floor (one pass over grad and attn) in the same group."""
import pytest

from relfast import ops, reference

OP = "head_mean_grad_attn"
IMPLS = {"relfast": ops.head_mean_grad_attn, "torch": reference.head_mean_grad_attn}


@pytest.mark.parametrize("impl", IMPLS)
def test_head_mean_grad_attn(measure, inputs, check, shape, impl):
    grad, attn = inputs.grad(shape), inputs.attn(shape)
    out = ops.head_mean_grad_attn(grad, attn)
    check(out, reference.head_mean_grad_attn(grad, attn))
    fn = IMPLS[impl]
    measure(lambda: fn(grad, attn), op=OP, shape=shape, impl=impl, reads=[grad, attn], writes=[out])


def test_read_floor(measure, inputs, shape, fastest_read):
    grad, attn = inputs.grad(shape), inputs.attn(shape)
    name, read = fastest_read(grad, attn)
    measure(lambda: read(grad, attn), op=OP, shape=shape, impl="floor", reads=[grad, attn], writes=[], read=name)
