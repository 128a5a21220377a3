"""bimodal_update: fused ``R_sq + norm(R_ss)^T @ abar @ norm(R_qq)`` vs the eager chain (two
residual normalisations, two bmm, add), with S = Q = N. GEMM-bound (4·B·N³ flops)."""
import pytest

from relfast import ops, reference

OP = "bimodal_update"
IMPLS = {"relfast": ops.bimodal_update, "torch": reference.bimodal_update}


@pytest.mark.parametrize("impl", IMPLS)
def test_bimodal_update(measure, inputs, check, shape, impl):
    R_sq, R_ss, abar, R_qq = inputs.rmap(shape), inputs.rmap(shape), inputs.abar(shape), inputs.rmap(shape)
    out = ops.bimodal_update(R_sq, R_ss, abar, R_qq)
    check(out, reference.bimodal_update(R_sq, R_ss, abar, R_qq))
    fn = IMPLS[impl]
    measure(lambda: fn(R_sq, R_ss, abar, R_qq), op=OP, shape=shape, impl=impl,
            reads=[R_sq, R_ss, abar, R_qq], writes=[out])
