"""torchvision VisionTransformer (vit_b_16 and relatives): attention through nn.MultiheadAttention."""
from ..layout import TokenLayout
from .base import Family, ModelCall, check_images, image_inputs, is_instance, register


@register
class TorchvisionVisionTransformer(Family):
    name = "torchvision VisionTransformer"

    @staticmethod
    def matches(model):
        return is_instance(model, "torchvision.models.vision_transformer", "VisionTransformer")

    def default_layout(self):
        side = self.model.image_size // self.model.patch_size
        return TokenLayout(prefix_tokens=1, patch_grid=(side, side), patch_size=self.model.patch_size)

    def num_classes(self):
        head = getattr(self.model.heads, "head", None)
        return getattr(head, "out_features", None)

    def attention_sites(self):
        return len(self.model.encoder.layers)

    def parse(self, inputs):
        pixels = image_inputs(inputs)
        size = self.model.image_size
        batch = check_images(pixels, (self.model.conv_proj.in_channels, size, size))
        return ModelCall({}, batch, args=(pixels,))

    def scores(self, output, call):
        return output
