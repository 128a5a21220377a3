"""Relevance methods, one file each; ``make_method`` builds one from its name and options."""
from typing import Dict, Type

from .attn_gradcam import AttnGradCAM
from .attnlrp import AttnLrp
from .base import Method, Run
from .generic import Generic
from .lrp import Lrp, PartialLrp, TransformerAttribution
from .raw_attention import RawAttention
from .rollout import Rollout

METHOD_CLASSES: Dict[str, Type[Method]] = {cls.name: cls for cls in (Generic, Rollout, RawAttention, AttnGradCAM,
                                                                      TransformerAttribution, PartialLrp, Lrp, AttnLrp)}
METHODS = tuple(METHOD_CLASSES)
# Methods that read the attention maps and their gradients only (no relevance pass).
ATTENTION_METHODS = tuple(name for name, cls in METHOD_CLASSES.items() if not cls.uses_relevance_pass)


def make_method(name: str, **options) -> Method:
    """The method ``name`` with ``options``; an option the method does not take is an error
    (options left at None are not given)."""
    if name not in METHOD_CLASSES:
        raise ValueError(f"relfast.Explainer: argument 'method' must be one of {', '.join(METHODS)}, got {name!r}")
    cls = METHOD_CLASSES[name]
    given = {key: value for key, value in options.items() if value is not None}
    for key in given:
        if key not in cls.option_defaults:
            users = [n for n, c in METHOD_CLASSES.items() if key in c.option_defaults]
            raise ValueError(f"relfast.Explainer: argument '{key}' applies to method "
                             f"{' or '.join(repr(u) for u in users)} only, not {name!r}")
    return cls(**given)


__all__ = ["Method", "Run", "METHODS", "ATTENTION_METHODS", "METHOD_CLASSES", "make_method"]
