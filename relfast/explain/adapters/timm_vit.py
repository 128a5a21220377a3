"""timm VisionTransformer (ViT, DeiT and relatives built on timm's VisionTransformer class).

timm's Attention runs fused SDPA when ``fused_attn`` is True (its default), so the attention
probabilities never exist as a tensor. For the call the adapter turns it off and reads the
probabilities at ``attn_drop`` (an identity in eval mode), where they are part of the graph.
"""
from contextlib import contextmanager
from typing import Any

import torch

from .base import Adapter, check_images, register


@register
class TimmVisionTransformer(Adapter):
    family = "timm VisionTransformer"

    @staticmethod
    def matches(model):
        try:
            from timm.models.vision_transformer import VisionTransformer
        except ImportError:
            return False
        return isinstance(model, VisionTransformer)

    def __init__(self, model):
        super().__init__(model)
        if getattr(model, "cls_token", None) is None:
            raise ValueError("relfast.Explainer: this timm VisionTransformer has no class token; the methods explain "
                             "the class token's row of the relevance map")
        self.num_prefix_tokens = model.num_prefix_tokens
        self.patch_grid = tuple(model.patch_embed.grid_size)
        self.patch_size = model.patch_embed.patch_size[0]
        self.image_size = tuple(model.patch_embed.img_size)
        self._captured = []

    def input_module(self):
        return self.model.patch_embed

    @contextmanager
    def eager_attention(self):
        attentions = [block.attn for block in self.model.blocks]
        fused = [attn.fused_attn for attn in attentions]
        hooks = [attn.attn_drop.register_forward_hook(lambda module, args, output: self._captured.append(output))
                 for attn in attentions]
        for attn in attentions:
            attn.fused_attn = False
        try:
            yield
        finally:
            for attn, was_fused in zip(attentions, fused):
                attn.fused_attn = was_fused
            for hook in hooks:
                hook.remove()
            self._captured = []

    def forward(self, inputs: Any):
        if isinstance(inputs, dict):
            inputs = inputs.get("pixel_values", inputs.get("x"))
        batch = check_images(inputs, (self.model.patch_embed.proj.in_channels, *self.image_size))
        self._captured = []
        logits = self.model(inputs)
        attentions, self._captured = self._captured, []
        return logits, attentions, batch
