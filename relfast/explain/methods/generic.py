"""[P2] generic rule (rules 5-6): ``R = (I + Ā_L) ··· (I + Ā_1)``, ``Ā = E_h[(∇A ⊙ A)^+]``.

The explained rows are computed in backward order while autograd produces the attention
gradients (layer L first), with the fused one-pass ``row_relevance_update``: no per-layer
storage, never forming Ā, and the backward stops at the first attention site.
"""
import torch

from ... import ops
from .base import Method, Run


class Generic(Method):
    """Options: ``aggregate`` (False: the "w/o aggregation" ablation ``R ← Ā·R``),
    ``full_matrix`` (all rows of R instead of the explained row)."""

    name = "generic"
    option_defaults = {"aggregate": True, "full_matrix": False}

    def __init__(self, aggregate: bool = True, full_matrix: bool = False):
        super().__init__(aggregate=bool(aggregate), _full_matrix=bool(full_matrix))

    def initial_rows(self, run: Run, like: torch.Tensor) -> torch.Tensor:
        batch, n = run.batch, like.shape[-1]
        if self.full_matrix:
            return torch.eye(n, dtype=like.dtype, device=like.device).repeat(batch, 1, 1)
        rows = torch.zeros(batch, 1, n, dtype=like.dtype, device=like.device)
        rows[torch.arange(batch, device=like.device), 0, run.rows.to(like.device)] = 1
        return rows

    def relevance(self, run: Run) -> torch.Tensor:
        def one_target(k: int, retain_graph: bool) -> torch.Tensor:
            state = {}

            def update(site: int, grad: torch.Tensor) -> None:
                attn = run.records[site].probabilities()
                rows = state["rows"] if "rows" in state else self.initial_rows(run, attn)
                state["rows"] = ops.row_relevance_update(rows, grad, attn, aggregate=self.aggregate)

            run.attention_gradients(k, range(len(run.records)), update, retain_graph)
            return state["rows"] if self.full_matrix else state["rows"][:, 0]

        return run.for_each_target(one_target)
