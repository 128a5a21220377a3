"""timm VisionTransformer (ViT, DeiT and relatives built on timm's VisionTransformer class).

timm's Attention runs fused SDPA when ``fused_attn`` is True (its default) and an explicit
softmax otherwise; the capture sees either, and the flag is never touched. The explained row is
what the head reads: the class token (``global_pool="token"``) or the mean of the tokens it
pools (``"avg"``: the mean of their rows); other pooling modes are refused.
"""
import torch

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
        self.pool = getattr(model, "global_pool", "token")
        if getattr(model, "attn_pool", None) is not None or self.pool not in ("token", "avg"):
            mode = "map" if getattr(model, "attn_pool", None) is not None else self.pool
            raise ValueError(f"relfast.Explainer: this timm VisionTransformer pools its tokens with global_pool="
                             f"{mode!r}; relfast explains the heads that read the class token ('token') or the mean "
                             "of the tokens ('avg')")
        if self.pool == "token" and getattr(model, "cls_token", None) is None and layout is None:
            raise ValueError("relfast.Explainer: this timm VisionTransformer has no class token but pools with "
                             "global_pool='token' (its first token); pass layout= to say which token is explained")
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

    def explained_row_weights(self, call, device):
        if self.pool != "avg":
            return None
        tokens = self.layout.num_tokens
        first = 0 if getattr(self.model, "pool_include_prefix", False) else self.model.num_prefix_tokens
        weights = torch.zeros(call.batch, tokens, device=device)
        weights[:, first:] = 1.0 / (tokens - first)
        return weights

    def scores(self, output, call):
        return output
