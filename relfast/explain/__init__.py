"""Explainers for unmodified models: ``relfast.Explainer``."""
from .adapters import Adapter, adapter_for, register
from .explainer import METHODS, Explainer, Explanation

__all__ = ["Explainer", "Explanation", "METHODS", "Adapter", "adapter_for", "register"]
