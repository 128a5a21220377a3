"""timm VisionTransformer (ViT, DeiT and relatives built on timm's VisionTransformer class).

timm's Attention runs fused SDPA when ``fused_attn`` is True (its default) and an explicit
softmax otherwise; the capture sees either, and the flag is never touched.
"""
from ..layout import TokenLayout
from .base import Family, ModelCall, check_images, image_inputs, is_instance, register


@register
class TimmVisionTransformer(Family):
    name = "timm VisionTransformer"
    softmax_capture = True

    @staticmethod
    def matches(model):
        return is_instance(model, "timm.models.vision_transformer", "VisionTransformer")

    def __init__(self, model, layout=None):
        if getattr(model, "cls_token", None) is None and layout is None:
            raise ValueError("relfast.Explainer: this timm VisionTransformer has no class token; the methods explain "
                             "the class token's row of the relevance map")
        super().__init__(model, layout)
        # num_classes=0: a headless feature extractor; its output is not class scores
        self.needs_callable_target = not model.num_classes

    def default_layout(self):
        embed = self.model.patch_embed
        return TokenLayout(prefix_tokens=self.model.num_prefix_tokens, patch_grid=tuple(embed.grid_size),
                           patch_size=tuple(embed.patch_size))

    def num_classes(self):
        return self.model.num_classes or None

    def attention_sites(self):
        return len(self.model.blocks)

    def parse(self, inputs):
        pixels = image_inputs(inputs, "x" if hasattr(inputs, "keys") and "x" in inputs else "pixel_values")
        batch = check_images(pixels, (self.model.patch_embed.proj.in_channels, *self.model.patch_embed.img_size))
        return ModelCall({}, batch, args=(pixels,))

    def scores(self, output, call):
        return output
