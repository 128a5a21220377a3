"""One record per attention site seen during a call: the (B, H, N_q, N_k) probabilities and, once
the backward reaches the site, their gradient.

Two kinds, both read-only views of what the model computed:
- ``ProbabilityRecord``: the probabilities exist as a tensor in the graph (eager attention,
  ``output_attentions``, an explicit softmax, ``nn.MultiheadAttention`` with weights); autograd
  gives their gradient directly.
- ``SdpaRecord``: the model ran ``scaled_dot_product_attention``, which never forms them. The
  record keeps q, k, v, the mask and the scale, and hooks the output O = A·V: with the
  gradient ∇O, ``∇A = ∇O · Vᵀ``, and ``A = softmax(q·kᵀ·scale + mask)`` is recomputed from q and k
  when (and only while) the method needs it.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor


class AttentionRecord:
    """A site's attention. ``source`` is the tensor whose gradient the backward delivers (None
    when the call runs without gradients)."""

    source: Optional[Tensor] = None

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """(B, H, N_q, N_k)."""
        raise NotImplementedError

    def probabilities(self) -> Tensor:
        """(B, H, N_q, N_k), detached."""
        raise NotImplementedError

    def attention_gradient(self, source_grad: Tensor) -> Tensor:
        """∇A (B, H, N_q, N_k) from the gradient of ``source``."""
        raise NotImplementedError


class ProbabilityRecord(AttentionRecord):
    """Probabilities that are a tensor of the graph. ``heads_shape`` views a (B·H, N_q, N_k)
    tensor (``nn.MultiheadAttention``'s) as (B, H, N_q, N_k)."""

    def __init__(self, probabilities: Tensor, heads_shape: Optional[Tuple[int, int, int, int]] = None):
        self.source = probabilities if probabilities.requires_grad else None
        self._values = probabilities.detach()
        self._shape = tuple(heads_shape) if heads_shape is not None else tuple(probabilities.shape)

    @property
    def shape(self):
        return self._shape

    def probabilities(self) -> Tensor:
        return self._values.view(self._shape)

    def attention_gradient(self, source_grad: Tensor) -> Tensor:
        return source_grad.reshape(self._shape)


def attention_bias(attn_mask: Optional[Tensor], is_causal: bool, n_q: int, n_k: int, dtype: torch.dtype,
                   device) -> Optional[Tensor]:
    """The additive mask SDPA applies, with masked entries at the dtype's lowest finite value
    (not -inf): a fully masked row (a padding query) then gets finite probabilities instead of
    NaN, as eager attention gives it; no real token attends to such rows."""
    lowest = torch.finfo(dtype).min
    bias = None
    if is_causal:  # SDPA's causal mask is aligned to the top left
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()
        bias = torch.zeros(n_q, n_k, dtype=dtype, device=device).masked_fill(~keep, lowest)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            mask_bias = torch.zeros(attn_mask.shape, dtype=dtype, device=device).masked_fill(~attn_mask, lowest)
        else:
            mask_bias = attn_mask.to(dtype).clamp_min(lowest)
        bias = mask_bias if bias is None else bias + mask_bias
    return bias


def attention_probabilities(query: Tensor, key: Tensor, bias: Optional[Tensor], scale: Optional[float]) -> Tensor:
    """softmax(q·kᵀ·scale + bias) over the keys; half types accumulate in float32."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    compute = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    scores = torch.matmul(query.to(compute), key.to(compute).transpose(-2, -1)) * scale
    if bias is not None:
        scores = (scores + bias.to(compute)).clamp_min(torch.finfo(compute).min)
    return torch.softmax(scores, dim=-1).to(query.dtype)


def expand_groups(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool) -> Tuple[Tensor, Tensor]:
    """Grouped-query attention: key/value heads repeated to the query heads (each key/value head
    serves ``H_q / H_kv`` consecutive query heads, as SDPA's ``enable_gqa`` defines it)."""
    heads, kv_heads = query.shape[-3], key.shape[-3]
    if heads == kv_heads:
        return key, value
    if not enable_gqa or heads % kv_heads:
        raise ValueError(f"relfast: scaled_dot_product_attention got {heads} query heads and {kv_heads} key/value "
                         "heads without enable_gqa (or not a multiple)")
    repeats = heads // kv_heads
    return key.repeat_interleave(repeats, dim=-3), value.repeat_interleave(repeats, dim=-3)


class SdpaRecord(AttentionRecord):
    """A ``scaled_dot_product_attention`` call: the fused kernel ran; the probabilities and their
    gradient are recomputed from what it was given."""

    def __init__(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                 scale: Optional[float], enable_gqa: bool, output: Tensor):
        self._query = query.detach()
        self._key, self._value = (t.detach() for t in expand_groups(query, key, value, enable_gqa))
        self._mask = None if attn_mask is None else attn_mask.detach()
        self._is_causal = is_causal
        self._scale = scale
        self.source = output if output.requires_grad else None
        batch = torch.broadcast_shapes(query.shape[:-2], self._key.shape[:-2])
        self._shape = (*batch, query.shape[-2], self._key.shape[-2])

    @property
    def shape(self):
        return self._shape

    def probabilities(self) -> Tensor:
        q, k = self._query, self._key
        bias = attention_bias(self._mask, self._is_causal, q.shape[-2], k.shape[-2], q.dtype, q.device)
        return attention_probabilities(q, k, bias, self._scale).expand(self._shape)

    def attention_gradient(self, source_grad: Tensor) -> Tensor:
        return torch.matmul(source_grad, self._value.transpose(-2, -1)).expand(self._shape)
