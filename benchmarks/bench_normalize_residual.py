"""normalize_residual: fused ``(R - I) / rowsum(R - I) + I`` vs the eager chain."""
import pytest

from relfast import ops, reference

OP = "normalize_residual"
IMPLS = {"relfast": ops.normalize_residual, "torch": reference.normalize_residual}


@pytest.mark.parametrize("impl", IMPLS)
def test_normalize_residual(measure, inputs, check, shape, impl):
    R = inputs.rmap(shape)
    out = ops.normalize_residual(R)
    check(out, reference.normalize_residual(R))
    fn = IMPLS[impl]
    measure(lambda: fn(R), op=OP, shape=shape, impl=impl, reads=[R], writes=[out])
