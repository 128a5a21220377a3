"""[P1] methods built on relevance propagation (``relfast.explain.lrp``):

- ``transformer_attribution`` (the CVPR method): ``Ā_l = E_h[(∇A_l ⊙ R_A_l)^+]``,
  ``C = (I + Ā_L) ··· (I + Ā_s)`` without row normalisation, the explained row. ``R_A`` comes from
  the relevance pass with the method's own rules (matmul relevance halved, Eq. 9 on sums); ``∇A``
  from a gradient backward through the same pass's graph (its rules then compute vector-Jacobian
  products), streamed into ``row_relevance_update`` as for the generic rule: one forward per call.
- ``partial_lrp``: the LRP relevance of the last attention map, ``E_h (R_A)^+``, explained row.
- ``lrp``: LRP to the input: pixels summed over channels (B, H, W) for images, the token
  embeddings summed over their width (B, N) for text.

The two baselines take the option ``rules``: ``"paper"`` (default), the rules of the papers' public
code for these baselines; ``"textbook"``, plain LRP with one αβ denominator and no halving
(``relfast.explain.lrp.paper_rules`` states both).
"""
import torch

from .base import Method, Run, check_start_layer_range
from .generic import Generic


RULES = ("paper", "textbook")  # the values of the baselines' option ``rules``


class _RelevanceMethod(Method):
    uses_relevance_pass = True
    option_defaults = {"rules": "paper"}

    def __init__(self, rules: str = "paper"):
        if not isinstance(rules, str) or rules not in RULES:
            raise ValueError(f"relfast.Explainer: argument 'rules' must be one of {', '.join(map(repr, RULES))}, "
                             f"got {rules!r}")
        super().__init__(rules=rules, rule_set=rules)

    def class_targets(self, run: Run, k: int) -> torch.Tensor:
        return run.class_targets(k, self.name)


class TransformerAttribution(Generic):
    """The generic rule's streamed product with the LRP head averaging, from ``start_layer`` on
    (default 1, the reference code's image evaluation; its BERT evaluation uses the last layer
    only, ``start_layer=-1``; negative counts from the end)."""

    name = "transformer_attribution"
    option_defaults = {"start_layer": 1}
    uses_relevance_pass = True
    relevance_label = "transformer_attribution"

    def __init__(self, start_layer: int = 1):
        super().__init__(use_lrp=True, start_layer=start_layer)

    def check_layers(self, layers: int) -> None:
        note = " (the default; pass start_layer=0 for a one-layer model)" if self.start_layer == 1 else ""
        check_start_layer_range(self.start_layer, layers, note)


class PartialLrp(_RelevanceMethod):
    name = "partial_lrp"
    needs_gradients = False

    def relevance(self, run: Run) -> torch.Tensor:
        last = len(run.records) - 1

        def one_target(k: int, retain_graph: bool) -> torch.Tensor:
            (r_a,) = run.relevance_pass.backward(self.class_targets(run, k), [last], retain_graph=retain_graph)
            return run.gather_rows(r_a.clamp(min=0).mean(dim=1))

        return run.for_each_target(one_target)


class Lrp(_RelevanceMethod):
    name = "lrp"
    needs_gradients = False
    pixel_level = True

    def relevance(self, run: Run) -> torch.Tensor:
        leaves = run.relevance_pass.input_leaves()
        if not leaves:
            raise ValueError("relfast.Explainer: method 'lrp' found no input to propagate relevance to (no float "
                             "input and no embedding lookup of 'input_ids')")

        def one_target(k: int, retain_graph: bool) -> torch.Tensor:
            (r_in,) = run.relevance_pass.backward(self.class_targets(run, k), [], leaves, retain_graph=retain_graph)
            if r_in.dim() == 4:  # pixels (B, C, H, W): summed over channels
                return r_in.sum(dim=1)
            return r_in.sum(dim=-1)  # token embeddings (B, N, D)

        return run.for_each_target(one_target)
