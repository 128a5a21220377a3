"""[P1] methods built on relevance propagation (``relfast.explain.lrp``):

- ``transformer_attribution`` (the CVPR method): ``Ā_l = E_h[(∇A_l ⊙ R_A_l)^+]``,
  ``C = (I + Ā_L) ··· (I + Ā_s)`` without row normalisation, the explained row. ``R_A`` comes from
  the relevance pass with the method's own rules (matmul relevance halved, Eq. 9 on sums); ``∇A``
  from the call's backward, streamed into ``row_relevance_update`` as for the generic rule.
- ``partial_lrp``: the plain-LRP relevance of the last attention map, ``E_h (R_A)^+``, explained row.
- ``lrp``: plain LRP to the input: pixels summed over channels (B, H, W) for images, the token
  embeddings summed over their width (B, N) for text.
"""
import torch

from ... import ops
from .base import Method, Run


class _RelevanceMethod(Method):
    uses_relevance_pass = True

    def class_targets(self, run: Run, k: int) -> torch.Tensor:
        return run.class_targets(k, self.name)


class TransformerAttribution(_RelevanceMethod):
    """Options: ``start_layer`` (first layer of the product; default 1, the reference code's image
    evaluation; its BERT evaluation uses the last layer only, ``start_layer=-1``; negative counts
    from the end)."""

    name = "transformer_attribution"
    conserve = True
    option_defaults = {"start_layer": 1}

    def __init__(self, start_layer: int = 1):
        if not isinstance(start_layer, int) or isinstance(start_layer, bool):
            raise ValueError(f"relfast.Explainer: argument 'start_layer' must be an int, got {start_layer!r}")
        super().__init__(start_layer=start_layer)

    def check_layers(self, layers: int) -> None:
        if not -layers <= self.start_layer < layers:
            default = " (the default; pass start_layer=0 for a one-layer model)" if self.start_layer == 1 else ""
            raise ValueError(f"relfast.Explainer: argument 'start_layer' is {self.start_layer}{default}, out of range "
                             f"for a model with {layers} attention layers [-{layers}, {layers})")

    def relevance(self, run: Run) -> torch.Tensor:
        layers = len(run.records)
        self.check_layers(layers)
        sites = list(range(self.start_layer % layers, layers))

        def one_target(k: int, retain_graph: bool) -> torch.Tensor:
            attention_relevance = dict(zip(sites, run.relevance_pass.backward(self.class_targets(run, k), sites,
                                                                              retain_graph=retain_graph)))
            state = {}

            def update(site: int, grad: torch.Tensor) -> None:
                r_a = attention_relevance.pop(site).to(grad.dtype)
                if "rows" not in state:
                    state["rows"] = torch.zeros(run.batch, 1, grad.shape[-1], dtype=grad.dtype, device=grad.device)
                    state["rows"][torch.arange(run.batch, device=grad.device), 0, run.rows.to(grad.device)] = 1
                state["rows"] = ops.row_relevance_update(state["rows"], grad, r_a)

            run.attention_gradients(k, sites, update, retain_graph)
            return state["rows"][:, 0]

        return run.for_each_target(one_target)


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
