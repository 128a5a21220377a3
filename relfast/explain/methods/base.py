"""What a method sees of one call (:class:`Run`), and the base class of the methods.

A method knows its math, not the model: it gets the attention records of the call in forward
order (``relfast.explain.capture``), the explained token of each sample, the targets, and a
backward that hands it each site's attention gradient as soon as autograd produces it.
"""
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..capture import AttentionRecord
from ..layout import TokenLayout
from ..targets import Targets

if TYPE_CHECKING:
    from ..lrp import RelevancePass
    from ..streams import CrossPlan, Stream


@dataclass
class Run:
    """One call, as a method sees it.

    Attributes:
        records: one per attention site, in forward order; probabilities (B, H, N, N).
        rows: (B,) int64, the explained token of each sample.
        row_weights: (B, N) or None: where the model's head reads a weighted mean of tokens
            (timm ``global_pool="avg"``), the explained row is that mean of rows, and ``rows``
            is unused.
        token_mask: (B, N) bool, the real tokens (None: all).
        layout: the token layout.
        scores: (B, C) what the target indexes (in the graph when gradients are on).
        explained: (B,) / (B, K) classes explained, or None (callable target).
        targets: the parsed target.
        relevance_pass: for methods built on LRP, the call's relevance pass
            (``relfast.explain.lrp``), which runs its own forward on first use.
    """

    records: List[AttentionRecord]
    rows: Tensor
    token_mask: Optional[Tensor]
    layout: TokenLayout
    scores: Tensor
    explained: Optional[Tensor]
    targets: Targets
    relevance_pass: Optional["RelevancePass"] = None  # methods with uses_relevance_pass: the LRP pass
    keep_graph: bool = False  # another stream's backward follows: every backward keeps the graph
    cross_plan: Optional["CrossPlan"] = None  # streams attending to each other (relfast.explain.streams)
    row_weights: Optional[Tensor] = None
    stream: Optional["Stream"] = None  # independent streams: the stream this run explains (None: the call's one)

    def for_stream(self, stream: "Stream", keep_graph: bool) -> "Run":
        """This call as one independent stream: its sites, explained rows, mask and layout."""
        return replace(self, records=[self.records[i] for i in stream.sites], rows=stream.rows,
                       token_mask=stream.token_mask, layout=stream.layout, keep_graph=keep_graph, stream=stream)

    @property
    def batch(self) -> int:
        return self.scores.shape[0]

    @property
    def num_targets(self) -> int:
        return self.targets.count

    def attention_gradients(self, k: int, sites: Sequence[int], on_gradient: Callable[[int, Tensor], None],
                            retain_graph: bool = False, raw: bool = False) -> None:
        """Backward of the k-th explained scalar; ``on_gradient(site, ∇A)`` is called for each of
        ``sites`` in backward order (last site first), as soon as its gradient is complete. The
        backward stops at the earliest of ``sites``. ``raw``: the gradient of the record's
        ``source`` as autograd gives it (for ``AttentionRecord.row_update``), not ∇A."""
        retain_graph = retain_graph or self.keep_graph
        scalar = self.explained_scalar(k)
        sites = sorted(sites)
        sources = [self.records[i].source for i in sites]
        if any(s is None for s in sources):
            raise ValueError("relfast.Explainer: an attention site's output is not part of the autograd graph")
        waiting: Dict[int, Tensor] = {}
        order = list(reversed(sites))  # the order the method must receive them in

        def arrived(site: int, source_grad: Tensor) -> None:
            waiting[site] = source_grad
            while order and order[0] in waiting:  # deliver in order, buffering any that come early
                done = order.pop(0)
                grad = waiting.pop(done)
                on_gradient(done, grad if raw else self.records[done].attention_gradient(grad))

        handles = [source.register_hook(lambda grad, site=site: arrived(site, grad))
                   for site, source in zip(sites[1:], sources[1:])]
        try:
            (first,) = torch.autograd.grad(scalar, sources[0], retain_graph=retain_graph)
        finally:
            for handle in handles:
                handle.remove()
        arrived(sites[0], first)
        if order:
            raise ValueError(f"relfast.Explainer: attention sites {sorted(order)} received no gradient from the "
                             "explained output on its way to the first site; relfast explains models whose attention "
                             "sites form one chain (each layer feeds the next)")

    def explained_scalar(self, k: int) -> Tensor:
        """The k-th explained scalar summed over the batch, checked to be in the autograd graph."""
        scalar = self.targets.scalar(self.scores, self.explained, k)
        if not scalar.requires_grad:
            raise ValueError("relfast.Explainer: the explained output does not depend on the model's inputs through "
                             "any graph (was the model run under torch.inference_mode, or are its inputs constant?)")
        return scalar

    def for_each_target(self, explain: Callable[[int, bool], Tensor]) -> Tensor:
        """``explain(k, retain_graph)`` for each of the K targets over the one forward (the graph
        kept for all but the last): its result, or the results stacked as (B, K, ...)."""
        k = self.num_targets
        results = [explain(i, i + 1 < k) for i in range(k)]
        return torch.stack(results, dim=1) if self.targets.per_sample_k else results[0]

    def class_targets(self, k: int, method: str) -> Tensor:
        """(B,) the k-th explained class of each sample, where a relevance pass starts."""
        if self.explained is None:
            raise ValueError(f"relfast.Explainer: method '{method}' propagates relevance from a class of the model's "
                             "output; it cannot start from a callable target")
        return self.explained[:, k] if self.explained.dim() == 2 else self.explained

    def gather_rows(self, matrix: Tensor) -> Tensor:
        """(B, ..., N, M) -> (B, ..., M): each sample's explained row (or weighted mean of rows)."""
        if self.row_weights is not None:
            return torch.einsum("bn,b...nm->b...m", self.row_weights.to(matrix), matrix)
        samples = torch.arange(matrix.shape[0], device=matrix.device)
        return matrix[samples, ..., self.rows.to(matrix.device), :]


class Method:
    """A relevance method. Subclasses set ``name``, ``needs_gradients`` and ``option_defaults``
    (their keyword options), and implement ``relevance``."""

    name = "?"
    needs_gradients = True
    uses_relevance_pass = False  # the session then gives the Run a relevance pass
    # the relevance forward is the call's only forward, its graph also giving the gradients
    gradients_from_relevance_pass = False
    rule_set = "textbook"  # the rules of its relevance pass (a name of relfast.explain.lrp.RuleSet)
    pixel_level = False  # images: relevance over the input's pixels (B, H, W) instead of tokens
    streams_rows = False  # only AttentionRecord.row_update is used: SDPA sites never form A
    raw_maps = False  # its maps are kept as computed: no family readout normalisation (CLIP's words_between)
    option_defaults: Dict[str, object] = {}

    def __init__(self, **options):
        for key, value in options.items():
            setattr(self, key, value)

    @property
    def full_matrix(self) -> bool:
        return bool(getattr(self, "_full_matrix", False))

    def check_layers(self, layers: int) -> None:
        """Options that depend on the model's number of attention layers, checked once it is known."""

    def check_family(self, family) -> None:
        """Refuse, when the explainer is made, a model family the method has no rules for."""

    def relevance_pass(self, family, call) -> "RelevancePass":
        """The call's relevance forward (methods with ``uses_relevance_pass``): [P1]'s rules."""
        from ..lrp import RelevancePass

        return RelevancePass(family, call, self.rule_set, gradients=self.gradients_from_relevance_pass)

    def relevance(self, run: Run) -> Tensor:
        """(B, N) rows (or (B, N, N) with full_matrix); (B, K, ...) for K targets per sample."""
        raise NotImplementedError

    def layer_maps(self, run: Run, maps: Dict[str, Tensor]) -> Optional[Dict[str, Tensor]]:
        """Per-layer relevance by map name, once ``relevance`` has run on every stream (attnlrp's
        ``layers=True``); None for methods without it."""
        return None


def checked_start_layer(start_layer) -> int:
    """The ``start_layer`` option's type (its range is checked once the layers are known)."""
    if not isinstance(start_layer, int) or isinstance(start_layer, bool):
        raise ValueError(f"relfast.Explainer: argument 'start_layer' must be an int, got {start_layer!r}")
    return start_layer


def check_start_layer_range(start_layer: int, layers: int, note: str = "") -> None:
    if not -layers <= start_layer < layers:
        raise ValueError(f"relfast.Explainer: argument 'start_layer' is {start_layer}{note}, out of range for a "
                         f"model with {layers} attention layers [-{layers}, {layers})")


def repeat_targets(result: Tensor, run: Run) -> Tensor:
    """A class-agnostic map, repeated for each of the K targets requested per sample."""
    if not run.targets.per_sample_k:
        return result
    k = run.num_targets
    return result.unsqueeze(1).expand(result.shape[0], k, *result.shape[1:]).clone()
