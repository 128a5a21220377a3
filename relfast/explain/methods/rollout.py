"""[P1] baseline: attention rollout (supplement Eq. 16), ``Â_l = E_h A_l + I`` row-normalised,
``Â_L ··· Â_s``, the explained row. Needs no gradients."""
import torch

from ... import ops
from .base import Method, Run, check_start_layer_range, checked_start_layer, repeat_targets


class Rollout(Method):
    """Options: ``start_layer`` (the first layer multiplied in; negative counts from the end),
    ``full_matrix``."""

    name = "rollout"
    needs_gradients = False
    option_defaults = {"start_layer": 0, "full_matrix": False}

    def __init__(self, start_layer: int = 0, full_matrix: bool = False):
        super().__init__(start_layer=checked_start_layer(start_layer), _full_matrix=bool(full_matrix))

    def check_layers(self, layers: int) -> None:
        check_start_layer_range(self.start_layer, layers)

    def relevance(self, run: Run) -> torch.Tensor:
        self.check_layers(len(run.records))
        matrix = ops.rollout([record.probabilities() for record in run.records], self.start_layer)
        return repeat_targets(matrix if self.full_matrix else run.gather_rows(matrix), run)
