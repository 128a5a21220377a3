"""One record per attention site seen during a call: the (B, H, N_q, N_k) probabilities and, once
the backward reaches the site, their gradient.

Two kinds, both read-only views of what the model computed:
- ``ProbabilityRecord``: the probabilities exist as a tensor in the graph (eager attention,
  ``output_attentions``, an explicit softmax, ``nn.MultiheadAttention`` with weights); autograd
  gives their gradient directly.
- ``SdpaRecord``: the model ran ``scaled_dot_product_attention``, which never forms them. The
  record keeps q, k, v, the mask and the scale; its source is the output O = A·V: with the
  gradient ∇O, ``∇A = ∇O · Vᵀ``, and ``A = softmax(q·kᵀ·scale + mask)`` is recomputed from q and k
  when (and only while) the method needs it. The call's backward through the attention then
  reuses that A and ∇A rather than recomputing A inside the fused backward.
"""
import math
import weakref
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import ops
from . import fused


class AttentionRecord:
    """A site's attention. ``source`` is the tensor whose gradient the backward delivers (None
    when the call runs without gradients)."""

    source: Optional[Tensor] = None

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """(B, H, N_q, N_k)."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the probabilities and gradients the record gives."""
        raise NotImplementedError

    def probabilities(self) -> Tensor:
        """(B, H, N_q, N_k), detached."""
        raise NotImplementedError

    def attention_gradient(self, source_grad: Tensor) -> Tensor:
        """∇A (B, H, N_q, N_k) from the gradient of ``source``."""
        raise NotImplementedError

    def release(self) -> None:
        """Forget anything recomputed for the backward just done (another target's follows)."""

    def row_update(self, rows: Tensor, source_grad: Tensor, aggregate: bool) -> Tensor:
        """Streaming rule 6 at this site: ``rows + rows · E_h[(∇A ⊙ A)^+]`` (B, K, N_k), from the
        gradient of ``source``."""
        return ops.row_relevance_update(rows, self.attention_gradient(source_grad), self.probabilities(),
                                        aggregate=aggregate)


class ProbabilityRecord(AttentionRecord):
    """Probabilities that are a tensor of the graph. ``heads_shape`` views a (B·H, N_q, N_k)
    tensor (``nn.MultiheadAttention``'s) as (B, H, N_q, N_k). ``dtype``: the dtype the model
    computes the attention in, when the softmax ran in another (HF eager attention takes its
    softmax in float32 and casts back): the record then speaks the model's dtype, as its SDPA
    sites do, so layers of both kinds combine."""

    def __init__(self, probabilities: Tensor, heads_shape: Optional[Tuple[int, int, int, int]] = None,
                 dtype: Optional[torch.dtype] = None):
        self.source = probabilities if probabilities.requires_grad else None
        self._dtype = dtype if dtype is not None else probabilities.dtype
        self._values = probabilities.detach().to(self._dtype)
        self._shape = tuple(heads_shape) if heads_shape is not None else tuple(probabilities.shape)

    @property
    def shape(self):
        return self._shape

    @property
    def dtype(self):
        return self._dtype

    def probabilities(self) -> Tensor:
        return self._values.view(self._shape)

    def attention_gradient(self, source_grad: Tensor) -> Tensor:
        return source_grad.reshape(self._shape).to(self._dtype)


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


def sdpa_scale(query: Tensor, scale: Optional[float]) -> float:
    """SDPA's scale: the given one, or 1/sqrt(head dim)."""
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale


def attention_probabilities(query: Tensor, key: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                            scale: Optional[float]) -> Tensor:
    """What SDPA computes before multiplying by V: softmax(q·kᵀ·scale + mask) over the keys (key
    heads already matching the query heads); half types accumulate in float32."""
    bias = attention_bias(attn_mask, is_causal, query.shape[-2], key.shape[-2], query.dtype, query.device)
    compute = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    scores = torch.matmul(query.to(compute), key.to(compute).transpose(-2, -1)) * sdpa_scale(query, scale)
    if bias is not None:
        scores = (scores + bias.to(compute)).clamp_min(torch.finfo(compute).min)
    return torch.softmax(scores, dim=-1).to(query.dtype)


def group_size(query: Tensor, key: Tensor, enable_gqa: bool) -> int:
    """Grouped-query attention: how many consecutive query heads each key/value head serves (as
    SDPA's ``enable_gqa`` defines it); 1 without grouping."""
    heads, kv_heads = query.shape[-3], key.shape[-3]
    if heads == kv_heads:
        return 1
    if not enable_gqa or heads % kv_heads:
        raise ValueError(f"relfast: scaled_dot_product_attention got {heads} query heads and {kv_heads} key/value "
                         "heads without enable_gqa (or not a multiple)")
    return heads // kv_heads


def expand_groups(tensor: Tensor, repeats: int) -> Tensor:
    """Key/value heads repeated to the query heads."""
    return tensor if repeats == 1 else tensor.repeat_interleave(repeats, dim=-3)


class SdpaRecord(AttentionRecord):
    """A ``scaled_dot_product_attention`` call. Its forward is the fused kernel the model asked
    for (``run``). The probabilities and their gradient are recomputed from q, k, v and ∇O when
    the method needs them, and the backward of the call then reuses them instead of letting the
    fused backward recompute A a second time: ``dV = Aᵀ·∇O``, ``dS = A ⊙ (∇A − rowsum(∇A ⊙ A))``,
    ``dQ = s·dS·K``, ``dK = s·dSᵀ·Q``."""

    def __init__(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                 scale: Optional[float], enable_gqa: bool, fused_rows: bool = False):
        # q, k, v as given (grouped key/value heads are expanded only while a layer is worked on)
        self._query, self._key_heads, self._value_heads = query.detach(), key.detach(), value.detach()
        self._repeats = group_size(query, key, enable_gqa)
        self._mask = None if attn_mask is None else attn_mask.detach()
        self._is_causal, self._scale, self._enable_gqa = is_causal, scale, enable_gqa
        batch = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3])
        self._shape = (*batch, query.shape[-3], query.shape[-2], key.shape[-2])
        self._shared = {}  # A and ∇A of the backward in progress, from the method to the backward
        # fused_rows: the method only streams rows (row_update), so the fused kernels run forward
        # and backward and the forward's log-sum-exp is kept (capture/fused.py).
        self.fused_backend = fused.backend(query, key, value, attn_mask, is_causal) if fused_rows else None
        self.fused_mask = self._mask if self.fused_backend else None
        self.logsumexp: Optional[Tensor] = None  # set by the fused forward

    @property
    def shape(self):
        return self._shape

    @property
    def dtype(self):
        return self._query.dtype

    @property
    def is_causal(self) -> bool:
        return self._is_causal

    @property
    def scale(self) -> Optional[float]:
        return self._scale

    def run(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
        """The model's fused attention; its output becomes this record's ``source``."""
        if self.fused_backend is not None and torch.is_grad_enabled():
            output = fused.FusedAttention.apply(query, key, value, self)
            self.source = output if output.requires_grad else None
            return output
        mask_input = attn_mask if attn_mask is not None and attn_mask.requires_grad else None
        output = _SharedBackwardAttention.apply(query, key, value, mask_input, self)
        self.source = output if output.requires_grad else None
        return output

    def fused_forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        extra = {"enable_gqa": True} if self._enable_gqa else {}
        return F.scaled_dot_product_attention(query, key, value, attn_mask=self._mask, dropout_p=0.0,
                                              is_causal=self._is_causal, scale=self._scale, **extra)

    def probabilities(self) -> Tensor:
        if "A" not in self._shared:
            keys = expand_groups(self._key_heads, self._repeats)
            self._shared["A"] = attention_probabilities(self._query, keys, self._mask, self._is_causal,
                                                        self._scale).expand(self._shape)
        return self._shared["A"]

    def attention_gradient(self, source_grad: Tensor) -> Tensor:
        values = expand_groups(self._value_heads, self._repeats)
        self._shared["dA"] = torch.matmul(source_grad, values.transpose(-2, -1)).expand(self._shape)
        return self._shared["dA"]

    def release(self) -> None:
        self._shared.clear()

    def row_update(self, rows: Tensor, source_grad: Tensor, aggregate: bool) -> Tensor:
        if self.logsumexp is None:
            return super().row_update(rows, source_grad, aggregate)
        mask = self.fused_mask
        if mask is not None and mask.dtype != torch.bool:  # the values the fused forward added, rounded alike
            mask = mask.to(self._query.dtype)
        return ops.sdpa_row_relevance_update(rows, self._query, self._key_heads, self._value_heads, source_grad,
                                             self.logsumexp, mask, is_causal=self._is_causal,
                                             scale=self._scale, aggregate=aggregate)

    def input_gradients(self, output_grad: Tensor, needs: Tuple[bool, ...]):
        """(dQ, dK, dV, dmask) from ∇O, reusing (and then releasing) the A and ∇A the method
        computed for this layer; the method is done with them when this runs."""
        probabilities = self.probabilities()
        grad_attention = self._shared.pop("dA", None)
        if grad_attention is None:
            grad_attention = self.attention_gradient(output_grad)
            self._shared.pop("dA")
        self._shared.pop("A", None)
        # dS = A ⊙ ∇A − A ⊙ rowsum(A ⊙ ∇A), written over ∇A (no other (B, H, N, N) buffer)
        scores_grad = grad_attention.contiguous().mul_(probabilities)
        scores_grad.addcmul_(probabilities, scores_grad.sum(-1, keepdim=True), value=-1)
        q_grad = k_grad = v_grad = mask_grad = None
        scale = sdpa_scale(self._query, self._scale)
        if needs[0]:
            keys = expand_groups(self._key_heads, self._repeats)
            q_grad = torch.matmul(scores_grad, keys).mul_(scale).sum_to_size(self._query.shape)
        if needs[1]:
            k_grad = _fold_groups(torch.matmul(scores_grad.transpose(-2, -1), self._query).mul_(scale),
                                  self._key_heads.shape)
        if needs[2]:
            v_grad = _fold_groups(torch.matmul(probabilities.transpose(-2, -1), output_grad), self._value_heads.shape)
        if needs[3] and self._mask is not None:
            mask_grad = scores_grad.sum_to_size(self._mask.shape)
        return q_grad, k_grad, v_grad, mask_grad


def _fold_groups(grad: Tensor, shape) -> Tensor:
    """A gradient over the query heads, summed back onto the key/value heads that served them."""
    if grad.shape[-3] != shape[-3]:
        grad = grad.unflatten(-3, (shape[-3], grad.shape[-3] // shape[-3])).sum(-3)
    return grad.sum_to_size(shape)


class _SharedBackwardAttention(torch.autograd.Function):
    """The fused SDPA forward, and a backward that shares A and ∇A with the relevance rule."""

    @staticmethod
    def forward(ctx, query, key, value, mask_input, record):
        # A weak reference: record -> output -> its graph node -> record would be a reference
        # cycle, keeping each call's whole autograd graph alive until the garbage collector runs.
        ctx.record = weakref.ref(record)
        return record.fused_forward(query, key, value)

    @staticmethod
    def backward(ctx, output_grad):
        record = ctx.record()
        if record is None:
            raise RuntimeError("relfast: backward through an explanation's attention after the call ended")
        return (*record.input_gradients(output_grad, ctx.needs_input_grad[:4]), None)
