"""Plain-PyTorch definitions of every relfast op.

These are the readable specification of what the fused kernels compute (see ``docs/METHODS.md``), the
expected values of the tests (run in float64), and the decomposition used when a graph must not
contain ``relfast::`` ops (e.g. ONNX export). Signatures match ``relfast.ops``. Unlike the kernels
they do no argument validation and compute in the input dtype.
"""
import math
from typing import List, Optional

import torch
from torch import Tensor

__all__ = [
    "head_mean_grad_attn",
    "relevance_update",
    "row_relevance_update",
    "sdpa_row_relevance_update",
    "normalize_residual",
    "bimodal_update",
    "rollout",
]


def head_mean_grad_attn(grad: Tensor, attn: Tensor) -> Tensor:
    """[P2] rule 5: ``E_h[(grad * attn)^+]``; (B, H, Nq, Nk) -> (B, Nq, Nk)."""
    return (grad * attn).clamp(min=0).mean(dim=1)


def relevance_update(R: Tensor, abar: Tensor, aggregate: bool = True) -> Tensor:
    """[P2] rules 6/7: ``R + abar @ R`` (``abar @ R`` when ``aggregate`` is False)."""
    product = torch.bmm(abar, R)
    return R + product if aggregate else product


def row_relevance_update(v: Tensor, grad: Tensor, attn: Tensor, aggregate: bool = True) -> Tensor:
    """Streaming rule 6 on K rows: ``v + v @ E_h[(grad * attn)^+]``; v is (B, K, N)."""
    product = torch.bmm(v, head_mean_grad_attn(grad, attn))
    return v + product if aggregate else product


def sdpa_row_relevance_update(v: Tensor, query: Tensor, key: Tensor, value: Tensor, grad_out: Tensor,
                              logsumexp: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                              scale: Optional[float] = None, aggregate: bool = True) -> Tensor:
    """:func:`row_relevance_update` of a fused attention, from what its backward has:
    ``A = exp(scale·q·kᵀ + mask − logsumexp)`` and ``∇A = grad_out · valueᵀ`` (key/value heads
    repeated to the query heads). ``attn_mask``: bool (True = attend) or additive, broadcast to
    (B, H, Nq, Nk); ``is_causal``: keys j ≤ i only (top-left aligned, as SDPA). A row whose
    log-sum-exp is -inf (every key masked) has A = 0."""
    repeats = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    if is_causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    lse = logsumexp.to(scores.dtype).unsqueeze(-1)
    attn = torch.where(torch.isneginf(lse), torch.zeros_like(scores), torch.exp(scores - lse))
    grad_attn = torch.matmul(grad_out, value.transpose(-2, -1))
    return row_relevance_update(v, grad_attn, attn, aggregate=aggregate)


def _identity_like(R: Tensor) -> Tensor:
    return torch.eye(R.shape[-1], dtype=R.dtype, device=R.device).expand_as(R)


def normalize_residual(R: Tensor) -> Tensor:
    """[P2] rules 8-9: ``(R - I) / rowsum(R - I) + I``; a row of ``R - I`` summing to 0 is
    scaled by 0 (the reference code would give NaN), so it becomes the identity row."""
    eye = _identity_like(R)
    residual = R - eye
    row_sum = residual.sum(dim=-1, keepdim=True)
    scale = torch.where(row_sum == 0, torch.zeros_like(row_sum), 1.0 / row_sum)
    return residual * scale + eye


def bimodal_update(R_sq: Tensor, R_ss: Tensor, abar: Tensor, R_qq: Tensor, normalize: bool = True) -> Tensor:
    """[P2] rule 10: ``R_sq + norm(R_ss)^T @ abar @ norm(R_qq)``, with ``norm`` the residual
    normalisation (rules 8-9), or the identity when ``normalize`` is False."""
    if normalize:
        R_ss, R_qq = normalize_residual(R_ss), normalize_residual(R_qq)
    return R_sq + torch.bmm(torch.bmm(R_ss.transpose(1, 2), abar), R_qq)


def rollout(attentions: List[Tensor], start_layer: int = 0) -> Tensor:
    """[P1] Eq. 16: ``Â_L ··· Â_s`` with ``Â_l`` the row-normalised ``E_h A_l + I``
    (rows that sum to 0 become 0); returns (B, N, N)."""
    if start_layer < 0:
        start_layer += len(attentions)
    joint = None
    for attn in attentions[start_layer:]:
        layer = attn.mean(dim=1) + _identity_like(attn[:, 0])
        row_sum = layer.sum(dim=-1, keepdim=True)
        layer = layer * torch.where(row_sum == 0, torch.zeros_like(row_sum), 1.0 / row_sum)
        joint = layer if joint is None else torch.bmm(layer, joint)
    assert joint is not None, "rollout needs at least one layer"
    return joint
