"""The ops inside TorchScript (and through save/load), torch.compile(fullgraph=True) and
torch.export, each with a dynamic batch, give the eager results and keep the relfast ops."""
from typing import Tuple

import pytest
import torch
from torch import Tensor

from relfast import ops
from testing import attention, generator, gradient

L, H, N = 3, 4, 9


class ExplainChain(torch.nn.Module):
    """Every op in one realistic chain: a CLS row streamed backwards, the full matrix forwards
    (out-of-place and in place), its normalisation, a rule-10 update, and rollout."""

    def forward(self, grads: Tensor, attns: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        # grads, attns: (L, B, H, N, N)
        B, n = grads.shape[1], grads.shape[-1]
        Q = 5  # regions of a second modality, for the rule-10 update
        v = torch.zeros(B, 1, n, dtype=grads.dtype, device=grads.device)
        v[:, 0, 0] = 1.0
        for layer in range(grads.shape[0] - 1, -1, -1):
            v = ops.row_relevance_update(v, grads[layer], attns[layer])
        R = torch.eye(n, dtype=grads.dtype, device=grads.device).repeat(B, 1, 1)
        for layer in range(grads.shape[0]):
            abar = ops.head_mean_grad_attn(grads[layer], attns[layer])
            if layer % 2 == 0:
                R = ops.relevance_update(R, abar)
            else:
                R = ops.relevance_update_(R.clone(), abar)
        R_qq = torch.eye(Q, dtype=grads.dtype, device=grads.device).repeat(B, 1, 1)
        cross = ops.bimodal_update(torch.zeros(B, n, Q, dtype=grads.dtype, device=grads.device), R,
                                   attns[0, :, 0, :, :Q].contiguous(), R_qq)
        roll = ops.rollout(list(attns.unbind(0)), 1)
        return v[:, 0], ops.normalize_residual(R), cross, roll


def example(B, seed=0):
    gen = generator(seed)
    grads = torch.stack([gradient(B, H, N, N, gen) for _ in range(L)]).float()
    attns = torch.stack([attention(B, H, N, N, gen) for _ in range(L)]).float()
    return grads, attns


def assert_same_outputs(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_chain_row_equals_full_matrix_row():
    # Sanity of the chain itself: streamed CLS row == row 0 of the forward product.
    row, _, _, _ = ExplainChain()(*example(2))
    grads, attns = example(2)
    R = torch.eye(N).repeat(2, 1, 1)
    for layer in range(L):
        R = ops.relevance_update(R, ops.head_mean_grad_attn(grads[layer], attns[layer]))
    torch.testing.assert_close(row, R[:, 0])


def test_torchscript_script_save_load(tmp_path):
    scripted = torch.jit.script(ExplainChain())
    graph = str(scripted.inlined_graph)  # the wrappers are calls until inlined
    for op in ["row_relevance_update", "head_mean_grad_attn", "relevance_update", "relevance_update_",
               "normalize_residual", "bimodal_update", "rollout"]:
        assert f"relfast::{op}" in graph, f"relfast::{op} missing from the TorchScript graph"
    path = tmp_path / "chain.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    for B in (1, 2, 5):
        inputs = example(B, seed=B)
        expected = ExplainChain()(*inputs)
        assert_same_outputs(scripted(*inputs), expected)
        assert_same_outputs(loaded(*inputs), expected)


def test_torchscript_reports_bad_input():
    scripted = torch.jit.script(ExplainChain())
    grads, attns = example(2)
    with pytest.raises(Exception, match="must be finite"):
        scripted(grads.index_fill(0, torch.tensor([1]), float("nan")), attns)


def test_torch_compile_fullgraph_dynamic_batch():
    torch._dynamo.reset()
    compiled = torch.compile(ExplainChain(), fullgraph=True, dynamic=True)
    for B in (2, 3, 6):
        inputs = example(B, seed=10 + B)
        assert_same_outputs(compiled(*inputs), ExplainChain()(*inputs))


def test_torch_export_dynamic_batch():
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(ExplainChain(), example(3), dynamic_shapes=({1: batch}, {1: batch}))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    text = " ".join(targets)
    for op in ["row_relevance_update", "head_mean_grad_attn", "relevance_update", "normalize_residual",
               "bimodal_update", "rollout"]:
        assert f"relfast.{op}" in text, f"relfast.{op} missing from the exported graph: {sorted(targets)}"
    module = exported.module()
    for B in (1, 2, 7):
        inputs = example(B, seed=20 + B)
        assert_same_outputs(module(*inputs), ExplainChain()(*inputs))
