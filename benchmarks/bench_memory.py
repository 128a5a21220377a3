"""Copy bandwidth of the GPU (``y.copy_(x)`` of a 256 MiB buffer: 256 MiB read + 256 MiB
written), the reference for the "% of copy bandwidth" column. CUDA only; the CPU figures use the
read floor in bench_head_mean_grad_attn.py / bench_row_relevance_update.py instead."""
import pytest
import torch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_copy_bandwidth(measure):
    x = torch.randn(64 * 2**20, device="cuda")  # 256 MiB of float32
    y = torch.empty_like(x)
    measure(lambda: y.copy_(x), op="copy", shape="256MiB", impl="copy", reads=[x], writes=[y])
