"""The build contains what it was asked to build."""
import os

import pytest
import torch

import relfast
import relfast.ops  # registers torch.ops.relfast


def test_ops_are_registered():
    for op in ["head_mean_grad_attn", "relevance_update", "relevance_update_", "row_relevance_update",
               "normalize_residual", "bimodal_update", "rollout"]:
        assert hasattr(torch.ops.relfast, op), op


@pytest.mark.skipif(os.environ.get("RELFAST_EXPECT_CUDA") != "1", reason="set RELFAST_EXPECT_CUDA=1 to require it")
def test_cuda_kernels_were_compiled():
    # CI sets RELFAST_EXPECT_CUDA=1 (torch CUDA build + nvcc), so CUDA kernels never rot uncompiled.
    assert relfast.ops.built_with_cuda()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("relfast::row_relevance_update", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("relfast::rollout", "CUDA")


def test_cpu_kernels_are_registered_for_cpu():
    for op in ["head_mean_grad_attn", "row_relevance_update", "normalize_residual", "rollout"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"relfast::{op}", "CPU"), op
