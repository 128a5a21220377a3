"""row_relevance_update: fused streaming ``v + v @ E_h[(grad * attn)^+]`` (K=1, the CLS row) vs
the eager chain (head mean, then bmm, then add), plus the read floor in the same group."""
import pytest

from relfast import ops, reference

OP = "row_relevance_update"
IMPLS = {"relfast": ops.row_relevance_update, "torch": reference.row_relevance_update}


@pytest.mark.parametrize("impl", IMPLS)
def test_row_relevance_update(measure, inputs, check, shape, impl):
    v, grad, attn = inputs.rows(shape, K=1), inputs.grad(shape), inputs.attn(shape)
    out = ops.row_relevance_update(v, grad, attn)
    check(out, reference.row_relevance_update(v, grad, attn))
    fn = IMPLS[impl]
    measure(lambda: fn(v, grad, attn), op=OP, shape=shape, impl=impl, reads=[v, grad, attn], writes=[out])


def test_read_floor(measure, inputs, shape, fastest_read):
    grad, attn = inputs.grad(shape), inputs.attn(shape)
    name, read = fastest_read(grad, attn)
    measure(lambda: read(grad, attn), op=OP, shape=shape, impl="floor", reads=[grad, attn], writes=[], read=name)
