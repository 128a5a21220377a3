"""HuggingFace ViT and DeiT image classifiers (DeiT with or without the distillation token)."""
from ..layout import TokenLayout
from .base import HFFamily, ModelCall, check_images, image_inputs, register

_NAMES = frozenset({"ViTForImageClassification", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"})


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


@register
class HFVisionTransformer(HFFamily):
    name = "HuggingFace ViT/DeiT (" + ", ".join(sorted(_NAMES)) + ")"
    class_names = _NAMES

    def default_layout(self):
        config = self.model.config
        image, patch = _pair(config.image_size), _pair(config.patch_size)
        # DeiT prepends a distillation token after CLS.
        prefix = 2 if type(self.model).__name__.startswith("DeiT") else 1
        return TokenLayout(prefix_tokens=prefix, patch_grid=(image[0] // patch[0], image[1] // patch[1]),
                           patch_size=patch)

    def num_classes(self):
        return self.model.config.num_labels

    def parse(self, inputs):
        pixels = image_inputs(inputs)
        image = _pair(self.model.config.image_size)
        batch = check_images(pixels, (self.model.config.num_channels, *image))
        return ModelCall({"pixel_values": pixels}, batch)
