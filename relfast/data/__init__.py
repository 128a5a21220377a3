"""Data the project ships: synthetic Shapes with known object masks (the default model, its tests
and the demos) and scikit-learn's real handwritten digits (the digits model, evaluation)."""
from .digits import load_digits
from .shapes import CLASSES, make_shapes, normalize

__all__ = ["CLASSES", "make_shapes", "normalize", "load_digits"]
