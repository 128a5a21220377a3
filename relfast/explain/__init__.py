"""Explainers for unmodified models: ``relfast.Explainer``."""
from .explainer import METHODS, Explainer, Explanation
from .families import Family, family_for, register
from .generate import GenerationExplanation
from .layout import TokenLayout
from .targets import Targets, mean_pool, mean_pooled_cosine

__all__ = ["Explainer", "Explanation", "METHODS", "TokenLayout", "Targets", "Family", "family_for", "register",
           "mean_pool", "mean_pooled_cosine", "GenerationExplanation"]
