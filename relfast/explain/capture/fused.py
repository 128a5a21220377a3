"""The fused attention of an SDPA site when the method only streams explained rows (``generic``):
forward and backward stay the fused kernels (O(N) memory), and the forward's row log-sum-exp is
kept so that ``relfast.ops.sdpa_row_relevance_update`` can recompute ``A`` and ``∇A`` tile by
tile from q, k, v and ∇O. No layer's (N, N) probabilities are ever formed.

The kernels are the ones ``F.scaled_dot_product_attention`` itself runs, called through their
ATen entry points because only those return the log-sum-exp: flash attention on CPU, memory-
efficient attention on CUDA. Where neither applies (a mask that requires grad, float64 on CUDA,
batch dimensions that are not (B, H), ...) ``backend`` returns None and the site falls back to
recomputing ``A`` per layer (``SdpaRecord``'s shared backward).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class FusedBackend:
    """One device's fused forward (returning the output and the (B, H, Nq) log-sum-exp) and its
    backward (dQ, dK, dV)."""

    def forward(self, query, key, value, mask, is_causal, scale) -> Tuple[Tensor, Tensor, tuple]:
        raise NotImplementedError

    def backward(self, grad_out, query, key, value, mask, output, lse, saved, is_causal, scale):
        raise NotImplementedError


class _CpuFlash(FusedBackend):
    def forward(self, query, key, value, mask, is_causal, scale):
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=additive_mask(mask, query.dtype), scale=scale)
        return output, lse, ()

    def backward(self, grad_out, query, key, value, mask, output, lse, saved, is_causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.contiguous(), query, key, value, output, lse, 0.0, is_causal,
            attn_mask=additive_mask(mask, query.dtype), scale=scale)


class _CudaEfficient(FusedBackend):
    """Memory-efficient attention: takes an additive mask and float32 as well as half types.
    Its log-sum-exp may be padded past Nq (to a multiple of 32)."""

    def forward(self, query, key, value, mask, is_causal, scale):
        mask = _aligned_bias(mask, query, key)
        output, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, mask, True, 0.0, is_causal, scale=scale)
        return output, lse[..., :query.shape[-2]], (lse, seed, offset)

    def backward(self, grad_out, query, key, value, mask, output, lse, saved, is_causal, scale):
        padded_lse, seed, offset = saved
        mask = _aligned_bias(mask, query, key)
        grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad_out.contiguous(), query, key, value, mask, output, padded_lse, seed, offset, 0.0,
            [True, True, True, False], is_causal, scale=scale)
        return grads[:3]


def _aligned_bias(mask: Optional[Tensor], query: Tensor, key: Tensor) -> Optional[Tensor]:
    """The bias as the efficient kernel reads it (what ``scaled_dot_product_attention`` prepares):
    additive in the query's dtype, (B, H, Nq, Nk), rows 16-element aligned (padded, then sliced
    back)."""
    if mask is None:
        return None
    mask = additive_mask(mask, query.dtype)
    n_k = key.shape[-2]
    mask = mask.expand(query.shape[0], query.shape[1], query.shape[2], n_k)
    if mask.stride(-1) != 1 or mask.stride(-2) % 16:
        pad = (16 - n_k % 16) % 16
        mask = torch.nn.functional.pad(mask, (0, pad))[..., :n_k]
    return mask


_CPU, _CUDA = _CpuFlash(), _CudaEfficient()


def backend(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
            is_causal: bool) -> Optional[FusedBackend]:
    """The fused kernels for this call, or None where they do not apply (grouped key/value heads
    are already validated by the record; CPU flash attention takes them as they are)."""
    tensors = (query, key, value)
    if any(t.dim() != 4 or t.is_nested or not t.is_floating_point() for t in tensors):
        return None
    if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
        return None
    if query.shape[0] != key.shape[0] or key.shape[:3] != value.shape[:3] or query.shape[-1] != key.shape[-1]:
        return None
    if attn_mask is not None and (is_causal or attn_mask.requires_grad or attn_mask.dim() > 4
                                  or attn_mask.device != query.device):
        return None
    if query.device.type == "cpu":
        return _CPU
    if query.device.type == "cuda" and query.dtype in _CUDA_DTYPES and query.shape[1] == key.shape[1]:
        return _CUDA  # grouped heads are left to the shared path there: the kernel wants equal heads
    return None


def additive_mask(attn_mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """The mask as the fused attention kernels take it: additive in the query's dtype (a bool mask
    becomes 0 / -inf, as ``scaled_dot_product_attention`` converts it). Made for each kernel call
    and dropped after it, as SDPA does: a kept copy per layer would be O(layers · N²) for a
    (B, 1, N, N) mask."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(~attn_mask,
                                                                                                float("-inf"))
    return attn_mask.to(dtype)


class FusedAttention(torch.autograd.Function):
    """``scaled_dot_product_attention`` through ``record``'s fused backend; the forward hands the
    log-sum-exp to the record, the backward is the fused one. ``record.fused_mask`` is the
    model's own mask (bool or additive), which the relevance op reads as it is."""

    @staticmethod
    def forward(ctx, query, key, value, record):
        mask = record.fused_mask
        output, lse, saved = record.fused_backend.forward(query, key, value, mask, record.is_causal, record.scale)
        record.logsumexp = lse
        ctx.backend, ctx.mask, ctx.saved = record.fused_backend, mask, saved
        ctx.is_causal, ctx.scale = record.is_causal, record.scale
        ctx.save_for_backward(query, key, value, output, lse)
        return output

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, output, lse = ctx.saved_tensors
        grads = ctx.backend.backward(grad_out, query, key, value, ctx.mask, output, lse, ctx.saved, ctx.is_causal,
                                     ctx.scale)
        return (*grads, None)
