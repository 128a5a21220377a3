"""Any module whose attention runs through ``scaled_dot_product_attention``,
``nn.MultiheadAttention`` or an explicit softmax, described by an explicit ``TokenLayout``:

    relfast.Explainer(model, layout=relfast.TokenLayout(prefix_tokens=1, patch_grid=(14, 14), patch_size=16))

The model is called as ``model(x)`` (a tensor) or ``model(**inputs)`` (a dict); its output (or
its ``logits`` / first element) is the (B, C) scores, or (B, N, C) per-token scores read at the
explained token. Not registered: it is the fallback when a layout is given.
"""
import torch
from torch import Tensor

from .base import Family, ModelCall, check_batch


class AnyAttentionModule(Family):
    name = "any module with an explicit layout"
    softmax_capture = True

    @staticmethod
    def matches(model):
        return False

    def parse(self, inputs):
        if isinstance(inputs, Tensor):
            batch = check_batch({"inputs": inputs}, "inputs")
            return ModelCall({}, batch, args=(inputs,))
        if hasattr(inputs, "keys"):
            inputs = dict(inputs)
            tensors = [k for k, v in inputs.items() if isinstance(v, Tensor)]
            if not tensors:
                raise ValueError("relfast.Explainer: argument 'inputs' holds no tensor")
            batch = check_batch(inputs, tensors[0])
            return ModelCall(inputs, batch)
        raise ValueError(f"relfast.Explainer: argument 'inputs' must be a tensor or a dict of tensors, got "
                         f"{type(inputs).__name__}")

    def scores(self, output, call):
        if not isinstance(output, Tensor):
            output = getattr(output, "logits", None) if not isinstance(output, (tuple, list)) else output[0]
        if not isinstance(output, Tensor) or output.dim() not in (2, 3) or output.shape[0] != call.batch:
            raise ValueError("relfast.Explainer: the model's output must be (B, C) scores, (B, N, C) per-token scores, "
                             f"or carry them as .logits / first element; got {getattr(output, 'shape', output)!r}")
        if output.dim() == 3:
            return output[torch.arange(call.batch, device=output.device), call.rows.to(output.device)]
        return output
