"""sdpa_row_relevance_update: the streamed rule from a fused attention's q, k, v, ∇O and
log-sum-exp (K=1) vs the unfused PyTorch chain (``relfast.reference``: forms A and ∇A per head,
then the head mean and the product), with the fused attention kernels' own forward and backward
on the same tensors as yardsticks (what a layer of the model already costs). CPU: torch's flash
attention; CUDA: memory-efficient attention.

Shapes: ``vitb`` (B 8, H 12, N 197, no mask) and ``gpt2-4k`` (B 1, H 12, N 4096, causal), D 64."""
from dataclasses import dataclass

import pytest
import torch

from relfast import ops, reference

OP = "sdpa_row_relevance_update"


@dataclass(frozen=True)
class Case:
    id: str
    B: int
    H: int
    N: int
    causal: bool
    D: int = 64


CASES = [Case("vitb", 8, 12, 197, False), Case("gpt2-4k", 1, 12, 4096, True)]


def fused_forward(q, k, v, causal):
    if q.is_cuda:
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0,
                                                                                         causal)
        return out, lse[..., :q.shape[-2]].contiguous(), (lse, seed, offset)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    return out, lse, None


def fused_backward(dout, q, k, v, out, lse, saved, causal):
    if q.is_cuda:
        padded, seed, offset = saved
        return torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, padded, seed, offset, 0.0, [True, True, True, False], causal)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, causal)


@pytest.mark.parametrize("impl", ["relfast", "torch", "attention-forward", "attention-backward"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_sdpa_row_relevance_update(measure, device, case, impl):
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = [torch.randn(case.B, case.H, case.N, case.D, generator=gen).to(device) for _ in range(4)]
    rows = torch.zeros(case.B, 1, case.N, device=device)
    rows[:, 0, -1 if case.causal else 0] = 1  # the explained token: the last (LM) or CLS
    out, lse, saved = fused_forward(q, k, v, case.causal)
    result = ops.sdpa_row_relevance_update(rows, q, k, v, dout, lse, is_causal=case.causal)
    if impl == "torch" or case.N <= 1024:  # correctness before timing (the chain holds 2 (B, H, N, N) tensors)
        expected = reference.sdpa_row_relevance_update(rows, q, k, v, dout, lse, is_causal=case.causal)
        torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    calls = {
        "relfast": lambda: ops.sdpa_row_relevance_update(rows, q, k, v, dout, lse, is_causal=case.causal),
        "torch": lambda: reference.sdpa_row_relevance_update(rows, q, k, v, dout, lse, is_causal=case.causal),
        "attention-forward": lambda: fused_forward(q, k, v, case.causal),
        "attention-backward": lambda: fused_backward(dout, q, k, v, out, lse, saved, case.causal),
    }
    measure(calls[impl], op=OP, shape=case.id, impl=impl, reads=[q, k, v, dout], writes=[result])
