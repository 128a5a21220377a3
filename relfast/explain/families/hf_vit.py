"""HuggingFace ViT and DeiT image classifiers (DeiT with or without the distillation token)."""
from .base import HFFamily, image_call, patch_layout, register

_NAMES = frozenset({"ViTForImageClassification", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"})


@register
class HFVisionTransformer(HFFamily):
    name = "HuggingFace ViT/DeiT (" + ", ".join(sorted(_NAMES)) + ")"
    class_names = _NAMES

    def default_layout(self):
        # DeiT prepends a distillation token after CLS.
        return patch_layout(self.model.config, 2 if type(self.model).__name__.startswith("DeiT") else 1)

    def num_classes(self):
        return self.model.config.num_labels

    def parse(self, inputs):
        return image_call(inputs, self.model.config)
