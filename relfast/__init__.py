"""relfast: fast, batched, exportable gradient-weighted attention relevance for transformers.

Importing the package loads the compiled ``relfast._C`` library, which registers the
``torch.ops.relfast`` operators; ``relfast.ops`` holds their documented wrappers and
``relfast.reference`` their plain-PyTorch definitions; ``relfast.Explainer`` explains models.
"""
import torch  # noqa: F401  (the extension links against torch's libraries)

from . import _C  # noqa: F401  (registers the relfast:: operators)
from . import data, models, ops, reference, viz  # matplotlib and transformers load lazily
from .explain import Explainer, Explanation

__version__ = "0.1.0"
__all__ = ["ops", "reference", "Explainer", "Explanation", "viz", "data", "models"]
