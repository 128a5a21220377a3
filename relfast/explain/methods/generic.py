"""[P2] generic rule (rules 5-6): ``R = (I + Ā_L) ··· (I + Ā_s)``, ``Ā = E_h[(∇A ⊙ A)^+]``.

One stream: the explained rows are computed in backward order while autograd produces the
attention gradients (layer L first), with the fused one-pass ``row_relevance_update``: no
per-layer storage, never forming Ā, and the backward stops at the first attention site.
Streams that attend to each other (LXMERT, DETR): rules 6-11 replayed in the model's order
(``relfast.explain.methods.bimodal``). Streams that feed one another (LLaVA's vision tower into
its LM, ``ChainedStreams``): the rows run through one stream's sites, are carried onto the tokens
the next stream's outputs became, and go on through its sites (``chain_rows``).
"""
from typing import Callable, Dict, List, Optional

import torch

from ... import ops
from .base import Method, Run, check_start_layer_range, checked_start_layer


class Generic(Method):
    """Options: ``aggregate`` (False: the "w/o aggregation" ablation ``R ← Δ``), ``start_layer``
    (the first layer of the product, default 0; negative counts from the end; CLIP's default is
    -1, the reference's), ``full_matrix`` (all rows of R instead of the explained row),
    ``use_lrp`` ([P2] supplement §4: the head averaging of transformer attribution,
    ``Ā = E_h[(∇A ⊙ R_A)^+]`` with ``R_A`` the LRP relevance of the map (``relfast.explain.lrp``,
    the CVPR rules), instead of ``E_h[(∇A ⊙ A)^+]``). Cross-attention models only:
    ``normalize`` (False: the "w/o norm." ablation, R instead of R̄ in rule 10) and
    ``cross_self_attention`` (False: "Eq. 10 w/o self-attention", ``R^sq ← R^sq + Ā``)."""

    name = "generic"
    option_defaults = {"aggregate": True, "start_layer": 0, "full_matrix": False, "use_lrp": False,
                       "normalize": True, "cross_self_attention": True}
    cross_options = ("normalize", "cross_self_attention")  # options of the rules 6-11 only
    rule_set = "transformer_attribution"  # the rules of the relevance pass when use_lrp
    relevance_label = "generic (use_lrp=True)"  # how errors about the relevance pass name the method

    def __init__(self, aggregate: bool = True, start_layer: int = 0, full_matrix: bool = False, use_lrp: bool = False,
                 normalize: bool = True, cross_self_attention: bool = True):
        for name, value in (("use_lrp", use_lrp), ("aggregate", aggregate), ("normalize", normalize),
                            ("cross_self_attention", cross_self_attention)):
            if not isinstance(value, bool):
                raise ValueError(f"relfast.Explainer: argument '{name}' must be True or False, got {value!r}")
        super().__init__(aggregate=aggregate, start_layer=checked_start_layer(start_layer),
                         _full_matrix=bool(full_matrix), use_lrp=use_lrp, uses_relevance_pass=use_lrp,
                         gradients_from_relevance_pass=use_lrp,
                         normalize=normalize, cross_self_attention=cross_self_attention)

    def check_layers(self, layers: int) -> None:
        check_start_layer_range(self.start_layer, layers)

    @property
    def streams_rows(self) -> bool:
        return not self.use_lrp

    def initial_rows(self, run: Run, n: int, dtype: torch.dtype, device) -> torch.Tensor:
        batch = run.batch
        if self.full_matrix:
            return torch.eye(n, dtype=dtype, device=device).repeat(batch, 1, 1)
        if run.row_weights is not None:  # the head reads a mean of tokens: the mean of their rows
            return run.row_weights.to(device=device, dtype=dtype)[:, None, :].clone()
        rows = torch.zeros(batch, 1, n, dtype=dtype, device=device)
        rows[torch.arange(batch, device=device), 0, run.rows.to(device)] = 1
        return rows

    def first_site(self, layers: int) -> int:
        """The first layer of the product."""
        return self.start_layer % layers

    def relevance(self, run: Run):
        if run.cross_plan is not None:
            from .bimodal import cross_relevance

            return cross_relevance(run, run.cross_plan, aggregate=self.aggregate, normalize=self.normalize,
                                   cross_self_attention=self.cross_self_attention)
        layers = len(run.records)
        self.check_layers(layers)
        sites = list(range(self.first_site(layers), layers))

        def one_target(k: int, retain_graph: bool) -> torch.Tensor:
            state, weights = {}, {}
            if self.use_lrp:  # the maps' relevance R_A, one relevance backward before the gradients (same graph)
                weights = dict(zip(sites, run.relevance_pass.backward(run.class_targets(k, self.relevance_label), sites,
                                                                      retain_graph=True)))

            def update(site: int, grad: torch.Tensor) -> None:
                record = run.records[site]
                if "rows" in state:  # a model mixing eager and SDPA layers may change dtype (see ProbabilityRecord)
                    rows = state["rows"].to(record.dtype)
                else:
                    rows = self.initial_rows(run, record.shape[-1], record.dtype, grad.device)
                if self.use_lrp:  # each R_A is freed once used
                    attn = weights.pop(site).to(record.dtype)
                    state["rows"] = ops.row_relevance_update(rows, record.attention_gradient(grad), attn,
                                                             aggregate=self.aggregate)
                else:  # SDPA sites recompute A and ∇A tile by tile (ops.sdpa_row_relevance_update)
                    state["rows"] = record.row_update(rows, grad, self.aggregate)

            if self.use_lrp:  # ∇A from the relevance forward's graph, its rules computing gradients
                with run.relevance_pass.computing_gradients():
                    run.attention_gradients(k, sites, update, retain_graph, raw=True)
            else:
                run.attention_gradients(k, sites, update, retain_graph, raw=True)
            return state["rows"] if self.full_matrix else state["rows"][:, 0]

        return run.for_each_target(one_target)

    def chained_relevance(self, run: Run, plan) -> Dict[str, torch.Tensor]:
        """Streams that feed one another (a ``ChainedStreams`` plan): each stream's explained rows,
        (B, N_stream), or (B, K, N_stream) for K targets per sample; one backward per target."""
        sites = [site for stream in plan.streams for site in stream.sites]
        sources = [run.records[site].source for site in sites]
        if any(source is None for source in sources):
            raise ValueError("relfast.Explainer: an attention site's output is not part of the autograd graph")
        first = plan.streams[0]
        count = run.num_targets
        results = []
        for k in range(count):
            scalar = run.explained_scalar(k)
            grads = torch.autograd.grad(scalar, sources, retain_graph=k + 1 < count or run.keep_graph,
                                        allow_unused=True)
            record = run.records[first.sites[-1]]
            rows = self.initial_rows(run, first.size, record.dtype, scalar.device)[None]  # (1, B, 1, N)
            maps = chain_rows(plan.streams, plan.seeds, run.records, rows,
                              {site: None if g is None else g[None] for site, g in zip(sites, grads)}, self.aggregate)
            results.append({name: m[0, :, 0] for name, m in maps.items()})
        if not run.targets.per_sample_k:
            return results[0]
        return {name: torch.stack([r[name] for r in results], dim=1) for name in results[0]}


def chain_rows(streams: List, seeds: List[Callable[[torch.Tensor], torch.Tensor]], records: List,
               rows: torch.Tensor, gradients: Dict[int, Optional[torch.Tensor]], aggregate: bool
               ) -> Dict[str, torch.Tensor]:
    """Rule 6's rows ``v ← v + v·Ā`` through streams that feed one another, for C targets at once.

    ``rows``: (C, B, K, N_0) the explained rows over ``streams[0]``'s tokens; ``gradients``: site ->
    the (C, ...) gradients of its record's source, one per target (None: no gradient reached the
    site, so ``Ā = 0`` and its factor is I: skipped). Each stream's sites run in backward order,
    then ``seeds[i]`` carries the rows onto stream i+1's tokens. Returns every stream's rows as
    they leave it, (C, B, K, N_stream), by stream name."""
    maps = {}
    for i, stream in enumerate(streams):
        if i:
            rows = seeds[i - 1](rows)
        for site in reversed(stream.sites):
            grad = gradients.pop(site, None)
            if grad is None:
                continue
            record = records[site]
            rows = torch.stack([record.row_update(rows[c].to(record.dtype), grad[c], aggregate)
                                for c in range(rows.shape[0])])
            record.release()  # the A and ∇A it recomputed: another target's backward must not reuse them
        maps[stream.name] = rows
    return maps
