"""[P2] rules 6-11: relevance across streams that attend to each other (LXMERT's co-attention,
DETR's decoder), replayed in the model's order (``relfast.explain.streams.CrossPlan``).

State: ``R^{ss}`` per stream (init I) and ``R^{sq}`` per pair of streams (init 0). With
``Ā = E_h[(∇A ⊙ A)^+]`` of each site (all from one backward per target):

- self-attention on s: rule 6 ``R^{ss} += Ā·R^{ss}``, rule 7 ``R^{sq} += Ā·R^{sq}``;
- s attends to q: rule 10 ``R^{sq} += R̄^{ss}ᵀ·Ā·R̄^{qq}`` (``R̄`` the rules 8-9 normalisation),
  rule 11 ``R^{ss} += Ā·R^{qs}``; both directions of a layer from the state before it.

Ablations ([P2] supplement Table 1): ``aggregate=False`` sets ``R ← Δ``; ``normalize=False``
uses R for R̄ in rule 10; ``cross_self_attention=False`` makes rule 10 ``R^{sq} += Ā``.
Half-precision models accumulate the state in float32.
"""
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from ... import ops
from ..streams import CoAttention, CrossPlan, SelfAttention
from .base import Run

Key = Tuple[str, str]


def cross_relevance(run: Run, plan: CrossPlan, *, aggregate: bool, normalize: bool,
                    cross_self_attention: bool) -> Dict[str, Tensor]:
    """The plan's readouts, (B, N) each, or (B, K, N) for K targets per sample."""
    sites = sorted({site for step in plan.steps for site in _sites(step)})
    results: List[Dict[str, Tensor]] = []
    count = run.num_targets
    for k in range(count):
        abar = _head_mean_gradients(run, k, sites, retain_graph=k + 1 < count)
        state = _initial_state(plan, run.batch, next(iter(abar.values())))
        for step in plan.steps:
            if isinstance(step, SelfAttention):
                _self_attention(state, step.stream, abar.pop(step.site), aggregate)
            else:
                _co_attention(state, step, abar, aggregate, normalize, cross_self_attention)
        results.append(_readouts(run, plan, state, k))
    if not run.targets.per_sample_k:
        return results[0]
    return {name: torch.stack([r[name] for r in results], dim=1) for name in results[0]}


def _sites(step) -> List[int]:
    return [step.site] if isinstance(step, SelfAttention) else [site for _, _, site in step.directions]


def _head_mean_gradients(run: Run, k: int, sites: List[int], retain_graph: bool) -> Dict[int, Tensor]:
    """Ā of every site for the k-th target, from one backward. A site the target does not reach
    (e.g. a stream's last layer whose output no head reads) gets Ā = 0."""
    scalar = run.explained_scalar(k)
    sources = [run.records[site].source for site in sites]
    if any(source is None for source in sources):
        raise ValueError("relfast.Explainer: an attention site's output is not part of the autograd graph")
    grads = torch.autograd.grad(scalar, sources, retain_graph=retain_graph or run.keep_graph, allow_unused=True)
    abar = {}
    for site, grad in zip(sites, grads):
        record = run.records[site]
        attn = record.probabilities()
        if grad is None:
            abar[site] = attn.new_zeros(attn.shape[0], *attn.shape[2:])
        else:
            abar[site] = ops.head_mean_grad_attn(record.attention_gradient(grad), attn)
        record.release()  # a recomputed A and ∇A must not outlive this target's backward
    compute = torch.float32 if next(iter(abar.values())).dtype in (torch.float16, torch.bfloat16) else None
    return {site: a.to(compute) if compute else a for site, a in abar.items()}


def _initial_state(plan: CrossPlan, batch: int, like: Tensor) -> Dict[Key, Tensor]:
    """``R^{ss} = I`` per stream; ``R^{sq} = 0`` only for the cross maps a co-attention step
    writes or reads (rule 11's ``R^{qs}``): rule 7 would only ever multiply the others' zeros
    (DETR's (B, 850, 100) ``R^{iq}`` in every encoder layer)."""
    sizes = plan.sizes()
    state = {(s, s): torch.eye(n, dtype=like.dtype, device=like.device).repeat(batch, 1, 1) for s, n in sizes.items()}
    for step in plan.steps:
        if isinstance(step, CoAttention):
            for s, q, _ in step.directions:
                for key in [(s, q)] + ([(q, s)] if step.rule_11 else []):
                    state.setdefault(key, like.new_zeros(batch, sizes[key[0]], sizes[key[1]]))
    return state


def _self_attention(state: Dict[Key, Tensor], s: str, abar: Tensor, aggregate: bool) -> None:
    """Rules 6 and 7: every map whose rows are stream s, from the same Ā."""
    for key in [key for key in state if key[0] == s]:
        state[key] = ops.relevance_update(state[key], abar, aggregate=aggregate)


def _co_attention(state: Dict[Key, Tensor], step: CoAttention, abar: Dict[int, Tensor], aggregate: bool,
                  normalize: bool, cross_self_attention: bool) -> None:
    """Rules 10 and 11 for each direction, all from the state before the layer."""
    updates: Dict[Key, Tensor] = {}
    for s, q, site in step.directions:
        a = abar.pop(site)
        cross = state[s, q] if aggregate else torch.zeros_like(state[s, q])
        if cross_self_attention:
            updates[s, q] = ops.bimodal_update(cross, state[s, s], a, state[q, q], normalize=normalize)
        else:
            updates[s, q] = cross + a
        if step.rule_11:
            delta = torch.bmm(a, state[q, s])
            updates[s, s] = state[s, s] + delta if aggregate else delta
    state.update(updates)


def _readouts(run: Run, plan: CrossPlan, state: Dict[Key, Tensor], k: int) -> Dict[str, Tensor]:
    maps = {}
    for readout in plan.readouts:
        matrix = state[readout.s, readout.q]
        if isinstance(readout.rows, str):  # "target": the explained index is the row (DETR's query)
            rows = run.explained[:, k] if run.explained.dim() == 2 else run.explained
        else:
            rows = readout.rows
        rows = rows.to(matrix.device)
        samples = torch.arange(matrix.shape[0], device=matrix.device)
        row = matrix[samples, rows].clone()
        if readout.zero_own:
            row[samples, rows] = 0
        maps[readout.name] = row
    return maps
