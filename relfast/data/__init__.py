"""Synthetic data with known object masks (for the default model, its tests and the demos)."""
from .shapes import CLASSES, make_shapes, normalize

__all__ = ["CLASSES", "make_shapes", "normalize"]
