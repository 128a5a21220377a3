"""[P1] baseline: attention GradCAM on the last layer. Head weights ``w_h`` = the mean gradient of
the explained row over the content tokens (prefix tokens and padding excluded); the map is
``(E_h[A_h[row, :] · w_h])^+`` (``image_map(upsample=True)`` min-max normalises it)."""
import torch

from .base import Method, Run

HALF = (torch.float16, torch.bfloat16)


class AttnGradCAM(Method):
    name = "attn_gradcam"

    def relevance(self, run: Run) -> torch.Tensor:
        last = len(run.records) - 1

        def one_target(k: int, retain_graph: bool) -> torch.Tensor:
            grads = {}
            run.attention_gradients(k, [last], grads.__setitem__, retain_graph)
            return self._map(run, grads[last], run.records[last].probabilities())

        return run.for_each_target(one_target)

    @staticmethod
    def _map(run: Run, grad: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        grad_row, attn_row = run.gather_rows(grad), run.gather_rows(attn)  # (B, H, N)
        if grad_row.dtype in HALF:  # half models: head weights are means of gradients of either sign
            grad_row, attn_row = grad_row.float(), attn_row.float()
        columns = torch.ones(grad_row.shape[0], grad_row.shape[-1], dtype=torch.bool, device=attn.device)
        columns[:, :run.layout.prefix_tokens] = False
        if run.token_mask is not None:
            columns &= run.token_mask.to(attn.device)
        weights = (grad_row * columns[:, None]).sum(-1, keepdim=True) / columns.sum(-1).clamp_min(1)[:, None, None]
        return (attn_row * weights).mean(dim=1).clamp(min=0)
