"""Argument checks shared by the evaluation protocols: every mistake is a ValueError that names
the entry point and the argument, raised before any model runs."""
import math
from numbers import Integral, Real
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import Tensor

# What the protocols measure: a one-stream classifier's accuracy, its class logits, its token map.
SUPPORTED = ("image classifiers (HuggingFace ViT/DeiT, timm and torchvision VisionTransformers with a head, a "
             "module explained with a patch layout) and text classifiers (HuggingFace BERT-family sequence "
             "classifiers)")
_EXPLAINER_PREFIX = "relfast.Explainer: "


def is_int(value: Any) -> bool:
    return isinstance(value, (Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def positive_int(value: Any, name: str, where: str) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{where}: argument '{name}' must be a positive int, got {value!r}")
    return int(value)


def flag(value: Any, name: str, where: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{where}: argument '{name}' must be True or False, got {value!r}")
    return bool(value)


def choice(value: Any, name: str, where: str, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{where}: argument '{name}' must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def optional_callable(value: Any, name: str, where: str):
    if value is not None and not callable(value):
        raise ValueError(f"{where}: argument '{name}' must be a callable or None, got {type(value).__name__}")
    return value


def real_number(value: Any, name: str, where: str) -> float:
    if not isinstance(value, (Real, np.floating, np.integer)) or isinstance(value, (bool, np.bool_)) \
            or not math.isfinite(float(value)):
        raise ValueError(f"{where}: argument '{name}' must be a finite number, got {value!r}")
    return float(value)


def token_id(value: Any, name: str, where: str, vocab_size: Optional[int]) -> int:
    """A token id inside the model's vocabulary (an embedding lookup outside it fails deep inside)."""
    if not is_int(value) or value < 0 or (vocab_size is not None and value >= vocab_size):
        bound = f" in the model's vocabulary [0, {vocab_size})" if vocab_size is not None else " >= 0"
        raise ValueError(f"{where}: argument '{name}' must be a token id{bound}, got {value!r}")
    return int(value)


def binary(value: Any, name: str, where: str, shape) -> Tensor:
    """A bool tensor of ``shape`` (0/1 values of another dtype are accepted)."""
    if not isinstance(value, Tensor) or tuple(value.shape) != tuple(shape):
        raise ValueError(f"{where}: argument '{name}' must be a bool tensor of shape {tuple(shape)}, got "
                         f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}")
    if value.dtype != torch.bool:
        if value.is_complex() or not bool(((value == 0) | (value == 1)).all()):
            raise ValueError(f"{where}: argument '{name}' must be bool (or hold only 0 and 1), got {value.dtype} "
                             "with other values")
        value = value.bool()
    return value


def class_labels(labels: Any, count: int, where: str, num_classes: Optional[int], name: str = "labels") -> Tensor:
    """(N,) integer classes in [0, num_classes): a label no prediction can equal would count as a
    silent miss, K labels per sample would mis-broadcast."""
    if labels is None:
        raise ValueError(f"{where}: argument '{name}' is required: a tensor of shape ({count},), one class per sample")
    shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
    if not isinstance(labels, Tensor) or tuple(labels.shape) != (count,):
        raise ValueError(f"{where}: argument '{name}' must be a tensor of shape ({count},), one class per sample "
                         f"(K classes per sample are not supported), got {shape}")
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.is_complex():
        raise ValueError(f"{where}: argument '{name}' must hold integer class indices, got {labels.dtype}")
    if count:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            raise ValueError(f"{where}: argument '{name}' holds class {low if low < 0 else high}, outside the "
                             f"model's classes {bound}")
    return labels


def token_batch(inputs: Dict[str, Any], name: str, where: str) -> Tensor:
    """``inputs['input_ids']``: an (N, L) tensor of at least one sequence."""
    ids = inputs["input_ids"]
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError(f"{where}: argument '{name}' ('input_ids') must be a tensor (N, L), got "
                         f"{getattr(ids, 'shape', type(ids).__name__)}")
    not_empty(ids.shape[0], name, where)
    return ids


def not_empty(count: int, name: str, where: str) -> None:
    if count == 0:
        raise ValueError(f"{where}: argument '{name}' holds no samples; there is nothing to evaluate")


def family_of(explainer: Any, where: str):
    """The relfast family behind ``explainer`` (a relfast.Explainer or a reference)."""
    from ..explain.families import Family

    family = getattr(explainer, "family", None)
    if not isinstance(family, Family) or not callable(explainer):
        raise ValueError(f"{where}: argument 'explainer' must be a relfast.Explainer (or a relfast.eval.references "
                         f"RandomMap / Occlusion), got {type(explainer).__name__}")
    return family


def classifier(explainer: Any, where: str, modality: Optional[str] = None):
    """The family of a one-stream classifier's explainer (``modality``: 'image', 'text' or None for
    either), refused otherwise with the kind of model it is and what the protocols support."""
    from ..explain.families.hf_bert import HFBertEncoder, HFBertFamily
    from ..explain.families.hf_vit import HFVisionTransformer
    from ..explain.families.sdpa_module import AnyAttentionModule
    from ..explain.families.timm_vit import TimmVisionTransformer
    from ..explain.families.torchvision_vit import TorchvisionVisionTransformer

    family = family_of(explainer, where)
    model = f"{type(family.model).__name__} (relfast family: {family.name})"
    vision = (HFVisionTransformer, TimmVisionTransformer, TorchvisionVisionTransformer)
    supported = (isinstance(family, vision + (HFBertFamily,)) and not isinstance(family, HFBertEncoder)) \
        or (isinstance(family, AnyAttentionModule) and family.layout.explained_token != "last")
    if not supported or family.needs_callable_target:
        raise ValueError(f"{where}: the explainer's model {model} is not a classifier this protocol applies to; "
                         f"it measures a one-stream classifier's accuracy and token maps: {SUPPORTED}")
    if getattr(explainer, "full_matrix", False):
        raise ValueError(f"{where}: argument 'explainer' returns all rows of R (full_matrix=True); the protocols "
                         "rank the explained row, explain with full_matrix=False")
    layout = family.layout
    if modality == "image" and (not layout.is_vision or layout.patch_size is None):
        raise ValueError(f"{where}: the explainer's model {model} is not an image model with a patch grid and size; "
                         "this protocol needs image patches")
    if modality == "text" and layout.is_vision:
        raise ValueError(f"{where}: the explainer's model {model} is an image model; this protocol needs a text "
                         "classifier")
    return family


def model_inputs(family, inputs: Any, name: str, where: str) -> None:
    """The family's own checks of ``inputs`` (keys, shapes, dtypes, ids in the vocabulary, finite
    values), as the eval entry point's error: a plain scoring forward runs none of them."""
    try:
        family.check_values(family.parse(inputs))
    except ValueError as error:
        message = str(error)
        message = message[len(_EXPLAINER_PREFIX):] if message.startswith(_EXPLAINER_PREFIX) else message
        message = message.replace("argument 'inputs'", "it")
        raise ValueError(f"{where}: argument '{name}' is not an input the explainer's model takes: {message}") \
            from None
