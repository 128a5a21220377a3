"""HuggingFace ViT and DeiT image classifiers (DeiT with or without the distillation token)."""
from typing import Any

import torch

from .base import Adapter, check_images, register

@register
class HFVisionTransformer(Adapter):
    family = "HuggingFace ViT/DeiT (ViTForImageClassification, DeiTForImageClassification[WithTeacher])"

    @staticmethod
    def matches(model):
        names = {"ViTForImageClassification", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"}
        return type(model).__name__ in names and hasattr(model, "config")

    def __init__(self, model):
        super().__init__(model)
        config = model.config
        self.image_size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        self.patch_size = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        side = self.image_size // self.patch_size
        self.patch_grid = (side, side)
        # DeiT prepends a distillation token after CLS.
        self.num_prefix_tokens = 2 if type(model).__name__.startswith("DeiT") else 1

    def forward(self, inputs: Any):
        if isinstance(inputs, torch.Tensor):
            inputs = {"pixel_values": inputs}
        if "pixel_values" not in inputs:
            raise ValueError(f"relfast.Explainer: argument 'inputs' must contain 'pixel_values', got keys {sorted(inputs)}")
        batch = check_images(inputs["pixel_values"], (self.model.config.num_channels, self.image_size, self.image_size))
        out = self.model(**inputs, output_attentions=True)
        return out.logits, out.attentions, batch
