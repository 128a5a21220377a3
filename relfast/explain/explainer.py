"""relfast.Explainer: explanations of unmodified models, batched, for any target.

The default method is [P2]'s generic rule (rules 5-6): ``R = (I + Ā_L) ··· (I + Ā_1)`` and the
explained token's row of it. That row is computed in backward order, while autograd produces the
attention gradients (layer L first), with the fused one-pass ``row_relevance_update``: no weight
gradients, no backward below the first attention map, no per-layer (B, H, N, N) storage beyond
what autograd itself keeps. See SPEC.md for the math and the baselines.
"""
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .adapters import Adapter, adapter_for

METHODS = ("generic", "rollout", "raw_attention", "attn_gradcam")
NOT_YET = ("transformer_attribution", "lrp", "partial_lrp")

TargetSpec = Union[None, int, Sequence[int], Sequence[Sequence[int]], Tensor, Callable[[Tensor], Tensor]]


@dataclass
class Explanation:
    """What an explainer returns.

    Attributes:
        logits: (B, C) the model's output (for encoders without a head: the token embeddings).
        target: (B,) or (B, K) class indices explained (None for a callable target).
        relevance: float32, the explained token's row of R over all N input tokens (CLS first):
            (B, N), or (B, K, N) for K targets per sample; with ``full_matrix=True`` all rows,
            (B, N, N) or (B, K, N, N).
    """

    logits: Tensor
    target: Optional[Tensor]
    relevance: Tensor
    adapter: Adapter

    def image_map(self, upsample: bool = False) -> Tensor:
        """Vision models: the patch map (B[, K], h_p, w_p), special tokens dropped. With
        ``upsample=True``: bilinear upsampling by the patch size (align_corners=False) to pixels,
        then min-max normalisation of each map to [0, 1], as the reference code does."""
        grid, patch = self.adapter.patch_grid, self.adapter.patch_size
        if grid is None:
            raise ValueError("relfast.Explanation.image_map: the model is not a vision model; use .relevance")
        if self.relevance.dim() not in (2, 3) or self.relevance.shape[-1] != self.adapter.num_prefix_tokens + grid[0] * grid[1]:
            raise ValueError("relfast.Explanation.image_map: needs the explained row(s) (full_matrix=False)")
        lead = self.relevance.shape[:-1]
        maps = self.relevance[..., self.adapter.num_prefix_tokens:].reshape(-1, 1, *grid)
        if upsample:
            maps = F.interpolate(maps, scale_factor=patch, mode="bilinear", align_corners=False)
            low = maps.amin(dim=(-2, -1), keepdim=True)
            high = maps.amax(dim=(-2, -1), keepdim=True)
            maps = (maps - low) / (high - low).clamp_min(torch.finfo(maps.dtype).tiny)
        return maps.reshape(*lead, *maps.shape[-2:])


class Explainer:
    """Explains predictions of an unmodified model.

    Args:
        model: a supported model (see ``relfast.explain.adapters``), in eval mode. Models loaded
            with SDPA/flash attention are switched to eager attention for the call.
        method: "generic" ([P2], default), or the [P1] baselines "rollout", "raw_attention",
            "attn_gradcam".
        start_layer: rollout's first layer (default 0; negative counts from the end).
        aggregate: False gives the "w/o aggregation" ablation of the generic rule (``R ← Ā·R``).
        full_matrix: return all rows of R (token-level tasks) instead of the explained row.
    """

    def __init__(self, model: torch.nn.Module, method: str = "generic", *, start_layer: Optional[int] = None,
                 aggregate: bool = True, full_matrix: bool = False):
        if method in NOT_YET:
            raise NotImplementedError(f"relfast.Explainer: method '{method}' is not implemented yet (it comes with "
                                      f"the LRP-based methods); available: {', '.join(METHODS)}")
        if method not in METHODS:
            raise ValueError(f"relfast.Explainer: argument 'method' must be one of {', '.join(METHODS)}, got {method!r}")
        if start_layer is not None and method != "rollout":
            raise ValueError(f"relfast.Explainer: argument 'start_layer' applies to method 'rollout' only, not {method!r}")
        if not aggregate and method != "generic":
            raise ValueError("relfast.Explainer: argument 'aggregate=False' is an ablation of method 'generic' only")
        if full_matrix and method not in ("generic", "rollout"):
            raise ValueError(f"relfast.Explainer: 'full_matrix=True' needs a method with a relevance matrix "
                             f"('generic' or 'rollout'), got {method!r}")
        self.model = model
        self.adapter = adapter_for(model)
        self.method = method
        self.start_layer = 0 if start_layer is None else start_layer
        self.aggregate = aggregate
        self.full_matrix = full_matrix

    def __call__(self, inputs: Any, target: TargetSpec = None) -> Explanation:
        """Explain ``inputs`` (a tensor, or the dict a HF processor/tokenizer returns).

        ``target``: None (argmax per sample), an int, a (B,) tensor, K classes for every sample
        (a list of ints) or per sample (a (B, K) tensor or list of lists) -> relevance (B, K, N),
        computed with one batched backward; or a callable mapping the model's output (logits
        (B, C); token embeddings (B, N, D) for encoders without a head) to the explained scalar
        per sample (B,).
        """
        if self.adapter.needs_callable_target and not callable(target):
            raise ValueError(f"relfast.Explainer: a model without a classification head ({type(self.model).__name__}) "
                             "needs a callable 'target' mapping its output to one scalar per sample")
        num_classes = None if self.adapter.needs_callable_target else \
            getattr(getattr(self.model, "config", None), "num_labels", None)
        fixed_target = None if target is None or callable(target) else _as_target_tensor(target, num_classes)

        def explained_classes(logits: Tensor, batch: int) -> Optional[Tensor]:
            if fixed_target is not None and fixed_target.dim() >= 1 and fixed_target.shape[0] not in (1, batch):
                raise ValueError(f"relfast.Explainer: argument 'target' holds {fixed_target.shape[0]} rows but the "
                                 f"batch has {batch} samples")
            return self._target(logits, target, fixed_target, batch)

        logits, explained, relevance = self._explain(inputs, target, explained_classes)
        return Explanation(logits, explained, relevance, self.adapter)

    def _explain(self, inputs: Any, target: TargetSpec,
                 explained_classes: Callable[[Tensor, int], Optional[Tensor]]):
        """The forward with attention probabilities, then the method's relevance, with eager
        attention and frozen weights for the call; ``explained_classes(logits, batch)`` picks the
        classes. Returns (logits, explained classes, float32 relevance). Also what
        ``relfast.export`` traces."""
        with self.adapter.eager_attention(), self.adapter.gradients_from_inputs_only(), torch.enable_grad():
            logits, attentions, batch = self.adapter.forward(inputs)
            attentions = list(attentions)
            _check_attentions(attentions, batch)
            explained = explained_classes(logits, batch)
            relevance = self._relevance(logits, attentions, target, explained)
        return logits.detach(), explained, relevance.detach().float()

    # ---- targets ----

    @staticmethod
    def _target(logits: Tensor, target: TargetSpec, fixed: Optional[Tensor], batch: int) -> Optional[Tensor]:
        if callable(target):
            return None
        if fixed is None:
            return logits.detach().argmax(dim=-1)
        fixed = fixed.to(logits.device)
        if fixed.dim() == 0:
            return fixed.expand(batch).clone()
        return fixed.expand(batch, *fixed.shape[1:]).clone()

    def _explained_scalar(self, logits: Tensor, target: TargetSpec, explained: Optional[Tensor]) -> Tensor:
        """The scalar whose gradient defines the explanation: sum over samples of each sample's raw
        target logit (samples are independent, so one backward serves the whole batch)."""
        if callable(target):
            values = target(logits)
            if not isinstance(values, Tensor) or tuple(values.shape) != (logits.shape[0],):
                raise ValueError(f"relfast.Explainer: a callable 'target' must return one scalar per sample, shape "
                                 f"({logits.shape[0]},), got {getattr(values, 'shape', type(values))}")
            return values.sum()
        return logits.gather(1, explained.view(-1, 1)).sum()

    # ---- methods ----

    def _relevance(self, logits, attentions, target, explained) -> Tensor:
        multi = explained is not None and explained.dim() == 2
        if self.method == "raw_attention":
            row = attentions[-1].detach().mean(dim=1)[:, 0]
            return _repeat_targets(row, explained) if multi else row
        if self.method == "rollout":
            matrix = ops.rollout([a.detach() for a in attentions], self.start_layer)
            result = matrix if self.full_matrix else matrix[:, 0]
            return _repeat_targets(result, explained) if multi else result
        if multi:
            return self._multi_target(logits, attentions, explained)
        y = self._explained_scalar(logits, target, explained)
        if self.method == "attn_gradcam":
            (grad,) = torch.autograd.grad(y, attentions[-1])
            return self._gradcam(grad, attentions[-1].detach())
        return self._generic_streaming(y, attentions)

    def _rows(self, attn: Tensor, batch: int) -> Tensor:
        """Initial rows of R being propagated: e_0 (the explained token) or all of I."""
        n = attn.shape[-1]
        if self.full_matrix:
            return torch.eye(n, dtype=attn.dtype, device=attn.device).repeat(batch, 1, 1)
        rows = torch.zeros(batch, 1, n, dtype=attn.dtype, device=attn.device)
        rows[:, 0, 0] = 1
        return rows

    def _generic_streaming(self, y: Tensor, attentions: List[Tensor]) -> Tensor:
        state = {"rows": self._rows(attentions[0], attentions[0].shape[0])}

        def update(grad: Tensor, attn: Tensor) -> None:
            state["rows"] = ops.row_relevance_update(state["rows"], grad, attn, aggregate=self.aggregate)

        # Layer l's gradient reaches its hook as soon as backward has produced it, layer L first;
        # the backward stops at the first attention map (its gradient is what autograd returns).
        handles = [attn.register_hook(lambda grad, attn=attn.detach(): update(grad, attn)) for attn in attentions[1:]]
        try:
            (grad_first,) = torch.autograd.grad(y, attentions[0])
        finally:
            for handle in handles:
                handle.remove()
        update(grad_first, attentions[0].detach())
        rows = state["rows"]
        return rows if self.full_matrix else rows[:, 0]

    def _gradcam(self, grad: Tensor, attn: Tensor) -> Tensor:
        """[P1] attention GradCAM on the last layer: head weights = mean gradient over the CLS
        row's patch entries; map = (E_h[A_h[0, :] * w_h])^+ (min-max normalised by image_map)."""
        prefix = self.adapter.num_prefix_tokens
        weights = grad[:, :, 0, prefix:].mean(dim=-1, keepdim=True)  # (B, H, 1)
        return (attn[:, :, 0, :] * weights).mean(dim=1).clamp(min=0)

    def _multi_target(self, logits: Tensor, attentions: List[Tensor], explained: Tensor) -> Tensor:
        """K targets per sample with one vmapped backward (autograd's is_grads_batched)."""
        batch, K = explained.shape
        one_hot = torch.zeros(K, *logits.shape, dtype=logits.dtype, device=logits.device)
        one_hot.scatter_(2, explained.t().unsqueeze(-1), 1.0)
        needed = attentions[-1:] if self.method == "attn_gradcam" else attentions
        grads = torch.autograd.grad(logits, needed, grad_outputs=one_hot, is_grads_batched=True)

        def per_target(t: Tensor) -> Tensor:  # (K, B, ...) -> (B * K, ...), sample-major
            return t.transpose(0, 1).reshape(batch * K, *t.shape[2:])

        def repeated(a: Tensor) -> Tensor:
            return a.detach().unsqueeze(1).expand(batch, K, *a.shape[1:]).reshape(batch * K, *a.shape[1:])

        if self.method == "attn_gradcam":
            result = self._gradcam(per_target(grads[0]), repeated(attentions[-1]))
        else:
            rows = self._rows(attentions[0], batch * K)
            for grad, attn in zip(reversed(grads), reversed(attentions)):
                rows = ops.row_relevance_update(rows, per_target(grad), repeated(attn), aggregate=self.aggregate)
            result = rows if self.full_matrix else rows[:, 0]
        return result.reshape(batch, K, *result.shape[1:])


def _repeat_targets(result: Tensor, explained: Tensor) -> Tensor:
    """Class-agnostic maps, repeated for each of the K requested targets."""
    return result.unsqueeze(1).expand(result.shape[0], explained.shape[1], *result.shape[1:]).clone()


def _as_target_tensor(target: TargetSpec, num_classes: Optional[int]) -> Tensor:
    if isinstance(target, bool):
        raise ValueError("relfast.Explainer: argument 'target' must be a class index, got a bool")
    if isinstance(target, int):
        t = torch.tensor(target)
    elif isinstance(target, Tensor):
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise ValueError(f"relfast.Explainer: argument 'target' must hold integer class indices, got {target.dtype}")
        if target.dim() > 2:
            raise ValueError(f"relfast.Explainer: argument 'target' must be an int, (B,) or (B, K), got shape "
                             f"{tuple(target.shape)}")
        t = target.long()
    elif isinstance(target, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in target):
        if len(target) == 0:
            raise ValueError("relfast.Explainer: argument 'target' is an empty list")
        t = torch.tensor([list(target)])  # the same K classes for every sample: (1, K)
    elif isinstance(target, (list, tuple)) and all(isinstance(x, (list, tuple)) for x in target):
        lengths = {len(x) for x in target}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError("relfast.Explainer: argument 'target' as a list of lists must hold the same number "
                             "(>= 1) of classes for every sample")
        t = torch.tensor([list(x) for x in target])
    else:
        raise ValueError("relfast.Explainer: argument 'target' must be None, an int, a (B,) or (B, K) tensor, a list "
                         f"of class indices, a list of lists, or a callable; got {type(target).__name__}")
    if num_classes is not None and t.numel() > 0 and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"relfast.Explainer: argument 'target' holds class {int(t.min()) if int(t.min()) < 0 else int(t.max())}"
                         f", out of range for a model with {num_classes} classes [0, {num_classes})")
    return t


def _check_attentions(attentions: List[Tensor], batch: int) -> None:
    if not attentions or any(a is None for a in attentions):
        raise ValueError("relfast.Explainer: the model returned no attention probabilities; it must run eager "
                         "attention (attn_implementation='eager')")
    for a in attentions:
        if not a.requires_grad:
            raise ValueError("relfast.Explainer: the attention probabilities are not part of the autograd graph "
                             "(is the model run under torch.no_grad or with frozen inputs?)")
