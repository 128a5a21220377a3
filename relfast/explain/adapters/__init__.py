"""Model families relfast explains; one file each (see base.py for how to add one)."""
from . import hf_bert, hf_vit, timm_vit  # noqa: F401  (registration)
from .base import Adapter, adapter_for, register

__all__ = ["Adapter", "adapter_for", "register"]
