"""What an explainer needs from a model family, and the registry of families.

Adding a family is one small file: subclass :class:`Adapter`, implement ``matches`` and
``forward`` (and the vision fields if it is a vision model), and decorate it with ``@register``.
"""
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor

_ADAPTERS: List[Type["Adapter"]] = []


def register(cls: Type["Adapter"]) -> Type["Adapter"]:
    _ADAPTERS.append(cls)
    return cls


class Adapter:
    """Runs one model family and exposes its attention probabilities.

    Attributes set by subclasses:
        family: name shown in errors.
        num_prefix_tokens: special tokens before the patches (vision: CLS, DeiT's distillation token).
        patch_grid: (h_p, w_p) for vision models, else None.
        patch_size: pixels per patch side for vision models, else None.
    """

    family = "?"
    needs_callable_target = False  # models without a classification head
    num_prefix_tokens = 1
    patch_grid: Optional[Tuple[int, int]] = None
    patch_size: Optional[int] = None

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @staticmethod
    def matches(model: torch.nn.Module) -> bool:
        raise NotImplementedError

    def input_module(self) -> torch.nn.Module:
        """The module whose output starts the autograd graph (the token/patch embeddings)."""
        return self.model.get_input_embeddings()

    @contextmanager
    def gradients_from_inputs_only(self):
        """Weights frozen for the call and the embeddings' output made the graph's leaf: autograd
        then saves only what input gradients need (no activations kept for weight gradients)."""
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        def start_graph(module, args, output):
            if isinstance(output, Tensor) and not output.requires_grad:
                output.requires_grad_()  # a leaf here: its inputs carry no graph
            return output

        hook = self.input_module().register_forward_hook(start_graph)
        try:
            yield
        finally:
            hook.remove()
            for p in frozen:
                p.requires_grad_(True)

    def forward(self, inputs: Any) -> Tuple[Tensor, Sequence[Tensor], int]:
        """Returns (logits (B, C), attention probabilities per layer (B, H, N, N), batch size)."""
        raise NotImplementedError

    @contextmanager
    def eager_attention(self):
        """Attention probabilities exist only with eager attention: switch to it for the call
        (and back after), or fail clearly; never fall back silently."""
        config = getattr(self.model, "config", None)
        current = getattr(config, "_attn_implementation", "eager")
        if current in (None, "eager"):
            yield
            return
        if not hasattr(self.model, "set_attn_implementation"):
            raise ValueError(f"relfast.Explainer: the {self.family} model runs attention with '{current}', which never "
                             "forms the attention probabilities; load it with attn_implementation='eager'")
        self.model.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.model.set_attn_implementation(current)


def adapter_for(model: torch.nn.Module) -> Adapter:
    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls(model)
    families = ", ".join(cls.family for cls in _ADAPTERS)
    raise ValueError(
        f"relfast.Explainer: unsupported model {type(model).__name__}. Supported families: {families}. To add "
        "one, write a small adapter in relfast/explain/adapters/ (subclass Adapter, implement matches() and "
        "forward(), decorate with @register); see the existing adapters.")


def check_batch(inputs: Dict[str, Tensor], key: str) -> int:
    """The batch size of `inputs[key]`, rejecting empty batches before any work."""
    if key not in inputs:
        raise ValueError(f"relfast.Explainer: argument 'inputs' must contain '{key}', got keys {sorted(inputs)}")
    batch = inputs[key].shape[0]
    if batch == 0:
        raise ValueError(f"relfast.Explainer: argument 'inputs' holds an empty batch ('{key}' has shape "
                         f"{tuple(inputs[key].shape)}); there is nothing to explain")
    return batch


def check_images(pixels: Tensor, expected_chw: Tuple[int, ...]) -> int:
    """The batch size of an image batch (B, C, H, W) of the shape the model takes, checked before
    any work (empty batches rejected)."""
    batch = check_batch({"pixel_values": pixels}, "pixel_values")
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != tuple(expected_chw):
        raise ValueError(f"relfast.Explainer: argument 'inputs' (pixel_values) must have shape (B, "
                         f"{', '.join(map(str, expected_chw))}) for this model, got {tuple(pixels.shape)}")
    return batch
