"""Model families relfast explains; one file each (see base.py for how to add one)."""
from . import hf_bert, hf_causal_lm, hf_clip, hf_detr, hf_llava, hf_lxmert, hf_visual_bert, hf_vit, timm_vit, torchvision_vit  # noqa: F401  (registration)
from .base import ChainedStreams, Family, ModelCall, family_for, register

__all__ = ["ChainedStreams", "Family", "ModelCall", "family_for", "register"]
