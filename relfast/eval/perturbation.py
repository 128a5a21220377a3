"""[P1] §5 perturbation test: remove the most (positive) or least (negative) relevant patches or
tokens, a growing fraction at each step, and measure the model's accuracy; the AUC is the
trapezoid of accuracy over the fractions removed (x = 0 included), times 100. For a faithful map
the positive AUC is low (the first patches removed are the ones the prediction needs) and the
negative AUC high.

Images: whole patches are removed by setting their pixels to 0 in [0, 1] pixel space (SPEC.md),
before ``preprocess`` (the model's normalisation). Text: tokens are deleted (the rest closes up,
padding at the end) or replaced by ``mask_token_id``; the first and last real tokens ([CLS] and
[SEP]) are kept. Ties in relevance are broken by position, so a run is deterministic.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

Data = Union[Tensor, Dict[str, Tensor]]


@dataclass
class PerturbationCurve:
    """Accuracy after removing each fraction, and its AUC.

    Attributes:
        fractions: (S,) the fractions removed, 0 first.
        accuracy: (S,) the share of samples the model still gets right.
        auc: the trapezoid of ``accuracy`` over ``fractions``, x100 ([P1]'s number).
        positive: the most relevant were removed first.
    """

    fractions: np.ndarray
    accuracy: np.ndarray
    auc: float
    positive: bool


def area_under_curve(fractions: Sequence[float], accuracy: Sequence[float]) -> float:
    """[P1]'s AUC: the trapezoid of accuracy over the fractions removed, x100."""
    x, y = np.asarray(fractions, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"relfast.eval: 'fractions' and 'accuracy' must be 1-D of the same length >= 2, got "
                         f"{x.shape} and {y.shape}")
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) * 100)


def _fractions(steps: int) -> np.ndarray:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"relfast.eval.perturbation: argument 'steps' must be an int >= 2 (fractions 0, 1/steps, ...), "
                         f"got {steps!r}")
    return np.arange(steps) / steps


def removal_ranks(scores: Tensor, rankable: Tensor, positive: bool) -> Tensor:
    """(B, M) int64: each item's place in the removal order (0 = removed first); items that are
    never removed (special tokens, padding) rank after all the others. Ties keep position order."""
    key = scores.detach().double().clone()
    key = -key if positive else key
    key[~rankable] = float("inf")
    order = torch.sort(key, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def removed_at(ranks: Tensor, rankable: Tensor, fraction: float) -> Tensor:
    """(B, M) bool: the items removed at ``fraction`` (int(fraction x rankable count) per sample)."""
    counts = (rankable.sum(dim=1).double() * fraction + 1e-9).floor().long()
    return ranks < counts[:, None]


def remove_patches(images: Tensor, removed: Tensor, grid, patch_size) -> Tensor:
    """Images (B, C, H, W) with the removed patches' pixels set to 0; ``removed`` (B, h*w)."""
    patch_mask = removed.view(-1, 1, *grid).to(images.dtype)
    pixels = patch_mask.repeat_interleave(patch_size[0], dim=2).repeat_interleave(patch_size[1], dim=3)
    pixels = torch.nn.functional.pad(pixels, (0, images.shape[3] - pixels.shape[3], 0, images.shape[2] - pixels.shape[2]))
    return images * (1 - pixels)


def remove_tokens(inputs: Dict[str, Tensor], removed: Tensor, mask_token_id: Optional[int],
                  pad_token_id: int) -> Dict[str, Tensor]:
    """Token inputs with the removed tokens replaced by ``mask_token_id``, or (None) deleted: the
    kept tokens close up in order and the freed positions become padding."""
    if mask_token_id is not None:
        return {**inputs, "input_ids": inputs["input_ids"].masked_fill(removed, mask_token_id)}
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool() & ~removed
    order = torch.sort((~mask).long(), dim=1, stable=True).indices  # kept tokens first, in order
    closed = {key: value.gather(1, order) for key, value in inputs.items() if key != "position_ids"}
    kept = mask.gather(1, order)
    closed["input_ids"] = closed["input_ids"].masked_fill(~kept, pad_token_id)
    closed["attention_mask"] = kept.to(inputs.get("attention_mask", inputs["input_ids"]).dtype)
    if "token_type_ids" in closed:
        closed["token_type_ids"] = closed["token_type_ids"].masked_fill(~kept, 0)
    return closed


def perturbation_curve(predict: Callable[[Data], Tensor], data: Data, labels: Tensor, scores: Tensor,
                       rankable: Tensor, remove: Callable[[Data, Tensor], Data], *, positive: bool = True,
                       steps: int = 10) -> np.ndarray:
    """The correct predictions (S,) of one batch after each step of removal.

    Args:
        predict: inputs -> predicted classes (B,).
        data: the batch (images or token inputs). labels: (B,) the classes counted as correct.
        scores: (B, M) relevance per removable item (patches, tokens). rankable: (B, M) bool.
        remove: (data, removed (B, M) bool) -> perturbed data.
    """
    ranks = removal_ranks(scores, rankable, positive)
    correct = []
    for fraction in _fractions(steps):
        perturbed = remove(data, removed_at(ranks, rankable, fraction))
        correct.append(int((predict(perturbed).to(labels.device) == labels).sum()))
    return np.asarray(correct, dtype=np.float64)


def perturbation(explainer, data: Data, labels: Tensor, *, positive: Union[bool, str] = True, steps: int = 10,
                 preprocess: Optional[Callable[[Tensor], Tensor]] = None, target: str = "predicted",
                 mask_token_id: Optional[int] = None, pad_token_id: int = 0, batch_size: int = 32,
                 progress: bool = True) -> PerturbationCurve:
    """[P1]'s perturbation test of ``explainer`` on a data set.

    Args:
        explainer: a ``relfast.Explainer`` (any method) of an image or text classifier.
        data: images (N, C, H, W) in [0, 1] (the model gets ``preprocess(images)``), or a
            tokenizer's dict of (N, L) tensors.
        labels: (N,) the true classes; accuracy counts predictions equal to them.
        positive: remove the most relevant first (else the least); "both": the two curves
            (positive, negative) from one explanation per batch.
        steps: the fractions 0, 1/steps, ..., (steps-1)/steps ([P1]: 10).
        target: "predicted" (explain each sample's predicted class, [P1]) or "label".
        mask_token_id: text: replace removed tokens by it (e.g. ``tokenizer.mask_token_id``);
            None deletes them. pad_token_id: the padding deletion leaves at the end.
        batch_size: samples per explanation call. progress: a tqdm progress bar.
    """
    from tqdm import tqdm

    where = "relfast.eval.perturbation"
    fractions = _fractions(steps)
    if positive not in (True, False, "both"):
        raise ValueError(f"{where}: argument 'positive' must be True, False or 'both', got {positive!r}")
    directions = (True, False) if positive == "both" else (bool(positive),)
    if target not in ("predicted", "label"):
        raise ValueError(f"{where}: argument 'target' must be 'predicted' or 'label', got {target!r}")
    images = isinstance(data, Tensor)
    if not images and not (isinstance(data, dict) and "input_ids" in data):
        raise ValueError(f"{where}: argument 'data' must be images (N, C, H, W) in [0, 1] or a tokenizer's dict "
                         f"with 'input_ids', got {type(data).__name__}")
    count = data.shape[0] if images else data["input_ids"].shape[0]
    if not isinstance(labels, Tensor) or labels.shape != (count,):
        raise ValueError(f"{where}: argument 'labels' must be a tensor of shape ({count},), got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    if images and (data.dim() != 4 or float(data.min()) < 0 or float(data.max()) > 1):
        raise ValueError(f"{where}: images must be (N, C, H, W) with values in [0, 1] (the model's normalisation "
                         "goes in 'preprocess')")
    preprocess = preprocess or (lambda x: x)
    layout = explainer.layout
    if images and (layout.patch_grid is None or layout.patch_size is None):
        raise ValueError(f"{where}: the explainer's model has no patch grid and size; patch removal needs them")

    def model_inputs(batch: Data) -> Data:
        return preprocess(batch) if images else batch

    def predict(batch: Data) -> Tensor:
        return explainer.family.plain_scores(model_inputs(batch)).argmax(dim=-1)

    def remove(batch: Data, removed: Tensor) -> Data:
        if images:
            return remove_patches(batch, removed, layout.patch_grid, layout.patch_size)
        return remove_tokens(batch, removed, mask_token_id, pad_token_id)

    correct = {direction: np.zeros(len(fractions)) for direction in directions}
    starts = range(0, count, batch_size)
    label = "both" if positive == "both" else ("positive" if positive else "negative")
    for start in tqdm(starts, desc=f"perturbation ({label})", unit="batch", disable=not progress):
        batch = data[start:start + batch_size] if images else {k: v[start:start + batch_size] for k, v in data.items()}
        batch_labels = labels[start:start + batch_size]
        explained = predict(batch) if target == "predicted" else batch_labels
        out = explainer(model_inputs(batch), target=explained)
        scores, rankable = _scores(out, batch, layout, images)
        for direction in directions:
            correct[direction] += perturbation_curve(predict, batch, batch_labels, scores, rankable, remove,
                                                     positive=direction, steps=steps)
    curves = tuple(PerturbationCurve(fractions, correct[d] / count, area_under_curve(fractions, correct[d] / count), d)
                   for d in directions)
    return curves if positive == "both" else curves[0]


def _scores(out, batch: Data, layout, images: bool):
    """(scores (B, M), rankable (B, M)): patch relevance, or token relevance with the first and
    last real tokens and the padding never removed."""
    if images:
        if out.pixel_level:  # a pixel map (lrp): its mean over each patch
            grid = torch.nn.functional.avg_pool2d(out.relevance[:, None], layout.patch_size)[:, 0]
        else:
            grid = out.image_map()
        scores = grid.flatten(1)
        return scores, torch.ones_like(scores, dtype=torch.bool)
    scores = out.relevance
    ids = batch["input_ids"]
    real = batch.get("attention_mask", torch.ones_like(ids)).bool()
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    last = torch.where(real, positions, -1).amax(dim=1, keepdim=True)
    rankable = real & (positions > 0) & (positions < last)
    return scores, rankable.to(scores.device)
