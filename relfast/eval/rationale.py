"""Text with known rationales: how well token relevance ranks the tokens that decide the label.
Per sentence, scikit-learn's average precision of the relevance of its real tokens ([CLS],
[SEP] and padding left out) against the rationale; the mean over sentences (the text analogue of
the segmentation test's mAP)."""
from typing import Dict, Optional

import numpy as np
import torch
from torch import Tensor

from . import checks


def rationale_ap(explainer, inputs: Dict[str, Tensor], rationale: Tensor, *, target: str = "predicted",
                 labels: Optional[Tensor] = None, batch_size: int = 64, progress: bool = True) -> float:
    """Mean average precision of ``explainer``'s token relevance against ``rationale`` (N, L) bool,
    over the sentences whose rationale is neither empty nor everything (at least one must be).

    Args:
        explainer: a ``relfast.Explainer`` of a text classifier (or a reference); any callable
            ``(inputs, target=None) -> Explanation`` with relevance (B, L) is taken as it is.
        inputs: a tokenizer's dict of (N, L) tensors, [CLS] first and [SEP] last.
        target: "predicted" (explain the predicted class) or "label" (``labels``, (N,)).
    """
    from tqdm import tqdm

    where = "relfast.eval.rationale_ap"
    family = None
    if hasattr(explainer, "family"):
        family = checks.classifier(explainer, where, "text")
    elif not callable(explainer):
        raise ValueError(f"{where}: argument 'explainer' must be a relfast.Explainer, got {type(explainer).__name__}")
    if not hasattr(inputs, "keys") or "input_ids" not in inputs:
        raise ValueError(f"{where}: argument 'inputs' must be a tokenizer's dict with 'input_ids', got "
                         f"{type(inputs).__name__}")
    inputs = dict(inputs)
    ids = checks.token_batch(inputs, "inputs", where)
    count = ids.shape[0]
    rationale = checks.binary(rationale, "rationale", where, ids.shape).cpu()
    target = checks.choice(target, "target", where, ("predicted", "label"))
    num_classes = family.num_classes() if family is not None else None
    if target == "label":
        labels = checks.class_labels(labels, count, where, num_classes)
    elif labels is not None:  # they would be ignored
        raise ValueError(f"{where}: argument 'labels' is used with target='label' only; pass target='label' to "
                         "explain them, or leave 'labels' out")
    batch_size = checks.positive_int(batch_size, "batch_size", where)
    progress = checks.flag(progress, "progress", where)
    if family is not None:
        checks.model_inputs(family, inputs, "inputs", where)
    real = inputs.get("attention_mask", torch.ones_like(ids))
    if not isinstance(real, Tensor) or real.shape != ids.shape:
        raise ValueError(f"{where}: argument 'inputs' ('attention_mask') must have the shape of input_ids "
                         f"{tuple(ids.shape)}")
    real = real.bool().cpu()
    words = [real[b].nonzero().view(-1)[1:-1] for b in range(count)]  # without [CLS] and [SEP]
    scored = [bool(rationale[b, words[b]].any()) and not bool(rationale[b, words[b]].all()) for b in range(count)]
    if not any(scored):  # a mean over no sentences is NaN, not a score
        raise ValueError(f"{where}: argument 'rationale' marks, in no sentence, some but not all of its words "
                         "([CLS], [SEP] and padding left out); average precision needs both")
    precisions = []
    for start in tqdm(range(0, count, batch_size), desc="rationales", unit="batch", disable=not progress):
        batch = {k: v[start:start + batch_size] for k, v in inputs.items()}
        explained = None if target == "predicted" else labels[start:start + batch_size]
        relevance = explainer(batch, target=explained).relevance
        if not isinstance(relevance, Tensor) or tuple(relevance.shape) != tuple(batch["input_ids"].shape):
            raise ValueError(f"{where}: the explainer's relevance must be (B, L) {tuple(batch['input_ids'].shape)}, "
                             f"one value per token, got {getattr(relevance, 'shape', type(relevance).__name__)}")
        stop = start + relevance.shape[0]
        found = sentence_precisions(relevance, real[start:stop], rationale[start:stop], where)
        precisions.extend(float(p) for p in found[~np.isnan(found)])
    return float(np.mean(precisions))


def sentence_precisions(relevance: Tensor, real: Tensor, rationale: Tensor,
                        where: str = "relfast.eval.rationale_ap") -> np.ndarray:
    """(B,) each sentence's average precision of its words' relevance against its rationale
    ([CLS], [SEP] and padding left out: ``real`` is the attention mask); NaN where the rationale
    marks none or all of its words (average precision needs both)."""
    from sklearn.metrics import average_precision_score

    relevance = relevance.detach().double().cpu()
    if not bool(torch.isfinite(relevance).all()):
        raise ValueError(f"{where}: the explainer's relevance holds NaN or infinite values")
    real, rationale = real.bool().cpu(), rationale.bool().cpu()
    precisions = np.full(relevance.shape[0], np.nan)
    for b in range(relevance.shape[0]):
        positions = real[b].nonzero().view(-1)[1:-1]
        marked = rationale[b, positions]
        if bool(marked.any()) and not bool(marked.all()):
            precisions[b] = average_precision_score(marked.numpy(), relevance[b, positions].numpy())
    return precisions
