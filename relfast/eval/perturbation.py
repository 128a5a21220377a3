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

from . import checks

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
    where = "relfast.eval.area_under_curve"
    try:
        x, y = np.asarray(fractions, dtype=np.float64), np.asarray(accuracy, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: arguments 'fractions' and 'accuracy' must be sequences of numbers") from None
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"{where}: 'fractions' and 'accuracy' must be 1-D of the same length >= 2, got "
                         f"{x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"{where}: 'fractions' and 'accuracy' must be finite")
    if (x < 0).any() or (x > 1).any() or (np.diff(x) <= 0).any():
        raise ValueError(f"{where}: argument 'fractions' must increase within [0, 1], got {x.tolist()}")
    if (y < 0).any() or (y > 1).any():  # percentages would be scaled by 100 twice
        raise ValueError(f"{where}: argument 'accuracy' must hold shares in [0, 1] (not percentages), got "
                         f"{y.tolist()}")
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) * 100)


def _fractions(steps: int, where: str = "relfast.eval.perturbation") -> np.ndarray:
    if not checks.is_int(steps) or steps < 2:
        raise ValueError(f"{where}: argument 'steps' must be an int >= 2 (fractions 0, 1/steps, ...), got {steps!r}")
    return np.arange(int(steps)) / int(steps)


def _direction(positive, where: str, both: bool) -> Union[bool, str]:
    if isinstance(positive, (bool, np.bool_)):
        return bool(positive)
    if both and isinstance(positive, str) and positive == "both":
        return positive
    allowed = "True, False or 'both'" if both else "True or False"
    raise ValueError(f"{where}: argument 'positive' must be {allowed}, got {positive!r}")


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
    where = "relfast.eval.perturbation_curve"
    for name, value in (("predict", predict), ("remove", remove)):
        if not callable(value):
            raise ValueError(f"{where}: argument '{name}' must be a callable, got {type(value).__name__}")
    if not isinstance(scores, Tensor) or scores.dim() != 2 or not scores.dtype.is_floating_point:
        raise ValueError(f"{where}: argument 'scores' must be a float tensor (B, M), got "
                         f"{getattr(scores, 'shape', type(scores).__name__)}")
    checks.not_empty(scores.shape[0], "scores", where)
    if not isinstance(rankable, Tensor) or rankable.dtype != torch.bool or rankable.shape != scores.shape:
        raise ValueError(f"{where}: argument 'rankable' must be a bool tensor of the shape of 'scores' "
                         f"{tuple(scores.shape)}, got {getattr(rankable, 'dtype', type(rankable).__name__)} "
                         f"{tuple(getattr(rankable, 'shape', ()))}")
    if not isinstance(labels, Tensor) or tuple(labels.shape) != (scores.shape[0],):
        raise ValueError(f"{where}: argument 'labels' must be a tensor of shape ({scores.shape[0]},), got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    return _curve(predict, data, labels, scores, rankable, remove, _direction(positive, where, both=False),
                  _fractions(steps, where), where)


def _curve(predict, data, labels, scores, rankable, remove, positive: bool, fractions, where: str) -> np.ndarray:
    return sample_correct(predict, data, labels, scores, rankable, remove, positive, fractions, where).sum(axis=0)


def sample_correct(predict, data, labels, scores, rankable, remove, positive: bool, fractions,
                   where: str = "relfast.eval.perturbation") -> np.ndarray:
    """(B, S) float64: 1 where sample b is still predicted right after step s of removal. Summed
    over samples it is the curve; per sample it adds up the same however a data set is split
    (relfast.scale sums it over Ray's batches)."""
    if not bool(torch.isfinite(scores[rankable]).all()):  # NaN would sort anywhere: an arbitrary order
        raise ValueError(f"{where}: the relevance scores hold NaN or infinite values; no removal order follows")
    ranks = removal_ranks(scores, rankable, positive)
    correct = []
    for fraction in fractions:
        predicted = predict(remove(data, removed_at(ranks, rankable, fraction)))
        if not isinstance(predicted, Tensor) or tuple(predicted.shape) != tuple(labels.shape):
            raise ValueError(f"{where}: 'predict' must return one class per sample {tuple(labels.shape)}, got "
                             f"{getattr(predicted, 'shape', type(predicted).__name__)}")
        correct.append((predicted.to(labels.device) == labels).cpu().numpy())
    return np.stack(correct, axis=1).astype(np.float64)


def perturbation(explainer, data: Data, labels: Tensor, *, positive: Union[bool, str] = True, steps: int = 10,
                 preprocess: Optional[Callable[[Tensor], Tensor]] = None, target: str = "predicted",
                 mask_token_id: Optional[int] = None, pad_token_id: int = 0, batch_size: int = 32,
                 progress: bool = True) -> PerturbationCurve:
    """[P1]'s perturbation test of ``explainer`` on a data set.

    Args:
        explainer: a ``relfast.Explainer`` (any method) of an image or text classifier, or a
            reference of ``relfast.eval.references``. Causal LMs, CLIP, DETR, LXMERT, VisualBERT
            and models without a head are refused: the test measures a classifier's accuracy.
        data: images (N, C, H, W) in [0, 1] (the model gets ``preprocess(images)``), or a
            tokenizer's dict of (N, L) tensors.
        labels: (N,) the true classes; accuracy counts predictions equal to them.
        positive: remove the most relevant first (else the least); "both": the two curves
            (positive, negative) from one explanation per batch.
        steps: the fractions 0, 1/steps, ..., (steps-1)/steps ([P1]: 10).
        preprocess: images only: the model's normalisation.
        target: "predicted" (explain each sample's predicted class, [P1]) or "label".
        mask_token_id: text: replace removed tokens by it (e.g. ``tokenizer.mask_token_id``);
            None deletes them. pad_token_id: the padding deletion leaves at the end.
        batch_size: samples per explanation call. progress: a tqdm progress bar.
    """
    from tqdm import tqdm

    where = "relfast.eval.perturbation"
    family = checks.classifier(explainer, where)
    fractions = _fractions(steps)
    positive = _direction(positive, where, both=True)
    directions = (True, False) if positive == "both" else (positive,)
    target = checks.choice(target, "target", where, ("predicted", "label"))
    preprocess = checks.optional_callable(preprocess, "preprocess", where)
    batch_size = checks.positive_int(batch_size, "batch_size", where)
    progress = checks.flag(progress, "progress", where)
    layout = explainer.layout
    images = isinstance(data, Tensor)
    if not images and not (hasattr(data, "keys") and "input_ids" in data):
        raise ValueError(f"{where}: argument 'data' must be images (N, C, H, W) in [0, 1] or a tokenizer's dict "
                         f"with 'input_ids', got {type(data).__name__}")
    if images != layout.is_vision:
        raise ValueError(f"{where}: argument 'data' must be {'images' if layout.is_vision else 'a tokenizer dict'} "
                         f"for the explainer's {'image' if layout.is_vision else 'text'} model, got "
                         f"{'images' if images else 'token inputs'}")
    if images and layout.patch_size is None:
        raise ValueError(f"{where}: the explainer's model has no patch size (its layout's 'patch_size'); patch "
                         "removal needs it")
    if images:
        count = _check_images(data, layout, where)
        if mask_token_id is not None:
            raise ValueError(f"{where}: argument 'mask_token_id' applies to text; images lose whole patches (set to 0)")
    else:
        data = dict(data)
        count = checks.token_batch(data, "data", where).shape[0]
        if preprocess is not None:  # silently unused otherwise
            raise ValueError(f"{where}: argument 'preprocess' applies to images; token inputs go to the model as given")
        vocab = family.vocab_size()
        if mask_token_id is not None:
            checks.token_id(mask_token_id, "mask_token_id", where, vocab)
        checks.token_id(pad_token_id, "pad_token_id", where, vocab)
    labels = checks.class_labels(labels, count, where, family.num_classes())
    tester = BatchPerturbation(family, layout, preprocess, mask_token_id, pad_token_id)

    def batch_at(start: int) -> Data:
        return data[start:start + batch_size] if images else {k: v[start:start + batch_size] for k, v in data.items()}

    starts = range(0, count, batch_size)
    if images:  # the model's own checks (shape, channels, values), before any forward
        for start in starts:
            checks.model_inputs(family, tester.model_inputs(batch_at(start)), "data", where)
    else:
        checks.model_inputs(family, data, "data", where)

    correct = {direction: np.zeros(len(fractions)) for direction in directions}
    label = "both" if positive == "both" else ("positive" if positive else "negative")
    for start in tqdm(starts, desc=f"perturbation ({label})", unit="batch", disable=not progress):
        batch = batch_at(start)
        batch_labels = labels[start:start + batch_size]
        explained = tester.predict(batch) if target == "predicted" else batch_labels
        out = explainer(tester.model_inputs(batch), target=explained)
        for direction, per_sample in tester.correct(batch, batch_labels, out, directions, fractions, where).items():
            correct[direction] += per_sample.sum(axis=0)
    curves = tuple(PerturbationCurve(fractions, correct[d] / count, area_under_curve(fractions, correct[d] / count), d)
                   for d in directions)
    return curves if positive == "both" else curves[0]


class BatchPerturbation:
    """One batch's share of the perturbation test: the model's inputs, its predictions, the
    removal, and which samples stay right at each step. ``perturbation`` runs it batch by batch;
    relfast.scale runs it in Ray's actors (same batches, same numbers)."""

    def __init__(self, family, layout, preprocess: Optional[Callable[[Tensor], Tensor]] = None,
                 mask_token_id: Optional[int] = None, pad_token_id: int = 0):
        self.family, self.layout = family, layout
        self.images = layout.is_vision
        self.preprocess = preprocess or (lambda x: x)
        self.mask_token_id, self.pad_token_id = mask_token_id, pad_token_id

    def model_inputs(self, batch: Data) -> Data:
        return self.preprocess(batch) if self.images else batch

    def predict(self, batch: Data) -> Tensor:
        return self.family.plain_scores(self.model_inputs(batch)).argmax(dim=-1)

    def remove(self, batch: Data, removed: Tensor) -> Data:  # the map may live where the model does, not the data
        if self.images:
            layout = self.layout
            return remove_patches(batch, removed.to(batch.device), layout.patch_grid, layout.patch_size)
        return remove_tokens(batch, removed.to(batch["input_ids"].device), self.mask_token_id, self.pad_token_id)

    def correct(self, batch: Data, labels: Tensor, out, directions, fractions,
                where: str = "relfast.eval.perturbation") -> Dict[bool, np.ndarray]:
        """By direction (True: most relevant first): (B, S) 1 where a sample is still right."""
        scores, rankable = _scores(out, batch, self.layout, self.images)
        return {direction: sample_correct(self.predict, batch, labels, scores, rankable, self.remove, direction,
                                          fractions, where) for direction in directions}


def _check_images(images: Tensor, layout, where: str) -> int:
    """The count of an image batch (N, C, H, W) in [0, 1] that the patch grid covers."""
    if images.dim() != 4 or not images.dtype.is_floating_point:
        raise ValueError(f"{where}: argument 'data' must be float images (N, C, H, W) in [0, 1], got {images.dtype} "
                         f"{tuple(images.shape)}")
    checks.not_empty(images.shape[0], "data", where)
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{where}: argument 'data' holds NaN or infinite pixel values")
    if float(images.min()) < 0 or float(images.max()) > 1:
        raise ValueError(f"{where}: argument 'data' must hold images (N, C, H, W) with values in [0, 1] (the model's "
                         "normalisation goes in 'preprocess')")
    covered = tuple(g * p for g, p in zip(layout.patch_grid, layout.patch_size))
    if images.shape[2] < covered[0] or images.shape[3] < covered[1]:
        raise ValueError(f"{where}: argument 'data' holds images of {tuple(images.shape[2:])} pixels, smaller than "
                         f"the model's patch grid "
                         f"{layout.patch_grid} of {layout.patch_size}-pixel patches {covered}")
    return images.shape[0]


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
    first = torch.where(real, positions, ids.shape[1]).amin(dim=1, keepdim=True)  # left padding: [CLS] is not at 0
    last = torch.where(real, positions, -1).amax(dim=1, keepdim=True)
    rankable = real & (positions > first) & (positions < last)
    return scores, rankable.to(scores.device)
