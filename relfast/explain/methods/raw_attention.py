"""[P1] baseline: raw attention, the last layer's head-mean probabilities, the explained row."""
import torch

from .base import Method, Run, repeat_targets


class RawAttention(Method):
    name = "raw_attention"
    needs_gradients = False

    def relevance(self, run: Run) -> torch.Tensor:
        return repeat_targets(run.gather_rows(run.records[-1].probabilities().mean(dim=1)), run)
