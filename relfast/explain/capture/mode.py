"""The capture for one call: a ``TorchFunctionMode`` (per thread, active only inside the call)
that sees attention without editing or re-configuring the model.

While it is active:
- ``F.scaled_dot_product_attention`` (HF ``sdpa``, timm ``fused_attn``, hand-written modules)
  runs the fused kernel as the model asked and leaves an ``SdpaRecord`` (whose backward shares
  the recomputed probabilities with the method); with ``explicit=True`` (export) it is computed
  as ``softmax(q·kᵀ·s + mask)·v`` instead, so a traced graph holds only plain ops.
- ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, torchvision's ViT) runs its
  weights-returning path, whose softmax output is recorded; the caller gets what it asked for.
- optionally, a softmax over the last dimension of a 4-D tensor (eager attention written by
  hand, timm with ``fused_attn=False``) is recorded as the probabilities.
- with gradients on, parameters reach every op detached (weights frozen for the call without
  touching ``requires_grad``), and embedding lookups start the graph: autograd then keeps only
  what input gradients need.
"""
import inspect
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .records import (AttentionRecord, ProbabilityRecord, SdpaRecord, attention_probabilities, expand_groups,
                      group_size)

_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax}
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _detached(value: Any) -> Any:
    if isinstance(value, torch.nn.Parameter):
        return value.detach()
    if type(value) in (list, tuple) and any(isinstance(v, torch.nn.Parameter) for v in value):
        return type(value)(v.detach() if isinstance(v, torch.nn.Parameter) else v for v in value)
    return value


def detached_parameters(args: Tuple, kwargs: Dict[str, Any]) -> Tuple[Tuple, Dict[str, Any]]:
    """An op's arguments with the model's parameters detached: frozen for the call, without
    touching their ``requires_grad``."""
    return tuple(_detached(a) for a in args), {k: _detached(v) for k, v in kwargs.items()}


def training_error(what: str) -> ValueError:
    return ValueError(f"relfast.Explainer: the model runs {what} with dropout (training mode); explanations need "
                      "the deterministic model: call model.eval() first")


class AttentionCapture(TorchFunctionMode):
    """Records every attention site of one forward, in order (``records``)."""

    def __init__(self, *, softmax: bool = False, explicit: bool = False, fused_rows: bool = False):
        super().__init__()
        self.records: List[AttentionRecord] = []
        self.softmax = softmax
        self.explicit = explicit
        self.fused_rows = fused_rows  # the method only streams rows: SDPA sites keep their fused kernels
        self.freeze = torch.is_grad_enabled()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.freeze:
            args, kwargs = detached_parameters(args, kwargs)
        if func is F.scaled_dot_product_attention:
            return self._sdpa(**_bind_sdpa(args, kwargs))
        if func is F.multi_head_attention_forward:
            return self._multi_head(args, kwargs)
        result = func(*args, **kwargs)
        if func is F.embedding and self.freeze and isinstance(result, torch.Tensor) and not result.requires_grad:
            result.requires_grad_()  # the graph's leaf: nothing below the embeddings is differentiated
        elif self.softmax and func in _SOFTMAX and _is_attention_softmax(args, kwargs, result):
            scores = args[0] if args else kwargs["input"]
            self.records.append(ProbabilityRecord(self._in_graph(result), dtype=scores.dtype))
        return result

    def _in_graph(self, result: torch.Tensor) -> torch.Tensor:
        """Attention over constants (DETR's first decoder layer: zero queries plus frozen
        embeddings) still has a gradient ∇A = ∇O·Vᵀ: its output joins the graph as a leaf."""
        if self.freeze and not result.requires_grad and result.is_floating_point():
            result.requires_grad_()
        return result

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p > 0:
            raise training_error("scaled_dot_product_attention")
        if query.dim() < 3:
            raise ValueError(f"relfast: scaled_dot_product_attention with a query of shape {tuple(query.shape)}; "
                             "expected (..., heads, tokens, dim)")
        if self.explicit:
            repeats = group_size(query, key, enable_gqa)
            probabilities = self._in_graph(attention_probabilities(query, expand_groups(key, repeats), attn_mask,
                                                                   is_causal, scale))
            self.records.append(ProbabilityRecord(probabilities))
            return torch.matmul(probabilities, expand_groups(value, repeats))
        record = SdpaRecord(query, key, value, attn_mask, is_causal, scale, enable_gqa, fused_rows=self.fused_rows)
        self.records.append(record)
        output = record.run(query, key, value, attn_mask)
        if record.source is None and self.freeze:
            record.source = self._in_graph(output)
        return output

    def _multi_head(self, args: Tuple, kwargs: Dict[str, Any]):
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        if call["training"] and call["dropout_p"] > 0:
            raise training_error("nn.MultiheadAttention")
        wanted, average = call["need_weights"], call["average_attn_weights"]
        call.update(need_weights=True, average_attn_weights=False)
        output, weights = F.multi_head_attention_forward(**call)
        # The returned (B, H, L, S) weights are a view of the (B·H, L, S) softmax output that
        # multiplies V: that tensor is the one whose gradient is ∇A.
        probabilities = weights._base if weights._base is not None else weights
        if probabilities.numel() != weights.numel():
            raise ValueError("relfast: could not read nn.MultiheadAttention's attention probabilities")
        self.records.append(ProbabilityRecord(probabilities, heads_shape=tuple(weights.shape)))
        if not wanted:
            return output, None
        return output, (weights.mean(dim=1) if average else weights)


def _bind_sdpa(args: Tuple, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    bound = dict(zip(_SDPA_PARAMETERS, args))
    bound.update(kwargs)
    unknown = set(bound) - set(_SDPA_PARAMETERS)
    if unknown:
        raise ValueError(f"relfast: scaled_dot_product_attention called with arguments relfast does not know: "
                         f"{sorted(unknown)}")
    return bound


def _is_attention_softmax(args: Tuple, kwargs: Dict[str, Any], result: Any) -> bool:
    """A softmax over the last dimension of a 4-D tensor: (B, H, N_q, N_k) attention."""
    if not isinstance(result, torch.Tensor) or result.dim() != 4:
        return False
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    return dim in (-1, 3)
