"""Explainers for unmodified models: ``relfast.Explainer``."""
from .adapters import Adapter, adapter_for, register
from .explainer import METHODS, Explainer, Explanation
from .targets import mean_pool, mean_pooled_cosine

__all__ = ["Explainer", "Explanation", "METHODS", "Adapter", "adapter_for", "register", "mean_pool",
           "mean_pooled_cosine"]
