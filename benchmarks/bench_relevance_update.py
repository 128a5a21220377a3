"""relevance_update (``R + abar @ R``, rule 6 with M = N) and its in-place form, vs the eager
chain (bmm, then add; in place: ``R.add_(torch.bmm(abar, R))``). These are GEMM-bound
(2·B·N³ flops), so GB/s is low by nature."""
import pytest
import torch

from relfast import ops, reference

IMPLS = {"relfast": ops.relevance_update, "torch": reference.relevance_update}
INPLACE_IMPLS = {"relfast": ops.relevance_update_, "torch": lambda R, abar: R.add_(torch.bmm(abar, R))}


@pytest.mark.parametrize("impl", IMPLS)
def test_relevance_update(measure, inputs, check, shape, impl):
    R, abar = inputs.rmap(shape), inputs.abar(shape)
    out = ops.relevance_update(R, abar)
    check(out, reference.relevance_update(R, abar))
    fn = IMPLS[impl]
    measure(lambda: fn(R, abar), op="relevance_update", shape=shape, impl=impl, reads=[R, abar], writes=[out])


@pytest.mark.parametrize("impl", INPLACE_IMPLS)
def test_relevance_update_inplace(measure, inputs, check, shape, impl):
    R0, abar = inputs.rmap(shape), inputs.abar(shape)
    R = R0.clone()
    assert ops.relevance_update_(R, abar) is R
    check(R, reference.relevance_update(R0, abar))
    fn = INPLACE_IMPLS[impl]
    # R grows by (I + abar) every call, so it is restored (untimed) before each one.
    measure(lambda: fn(R, abar), setup=lambda: R.copy_(R0), op="relevance_update_", shape=shape,
            impl=impl, reads=[R, abar], writes=[R])
