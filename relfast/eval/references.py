"""Floor and ceiling references for the evaluation tables: a random map, and single-patch (or
single-token) occlusion, which measures each item's effect on the explained logit directly.

Both wrap a ``relfast.Explainer`` for its model, family and layout, and are called like it:
``reference(inputs, target)`` returns a ``relfast.Explanation``, so ``perturbation`` and
``segmentation`` take them as they take an explainer.
"""
from typing import Optional

import torch
from torch import Tensor

from ..explain.explainer import Explainer, Explanation


class _Reference:
    name = "?"

    def __init__(self, explainer: Explainer):
        if not isinstance(explainer, Explainer):
            raise ValueError(f"relfast.eval.{type(self).__name__}: argument 'explainer' must be a relfast.Explainer, "
                             f"got {type(explainer).__name__}")
        self.explainer, self.family, self.layout, self.model = explainer, explainer.family, explainer.layout, \
            explainer.model

    def _scores(self, inputs) -> Tensor:
        return self.family.plain_scores(inputs)

    def _explanation(self, scores: Tensor, target: Tensor, relevance: Tensor) -> Explanation:
        return Explanation(scores, target, relevance.float(), self.layout)

    @staticmethod
    def _classes(scores: Tensor, target) -> Tensor:
        if target is None:
            return scores.argmax(dim=-1)
        target = torch.as_tensor(target, device=scores.device)
        return target.expand(scores.shape[0]).clone() if target.dim() == 0 else target


class RandomMap(_Reference):
    """Relevance drawn uniformly at random: the floor a faithful method must beat. Each sample's
    map depends only on ``seed`` and the sample's values, so it does not change with batching."""

    name = "random"

    def __init__(self, explainer: Explainer, seed: int = 0):
        super().__init__(explainer)
        self.seed = seed

    def __call__(self, inputs, target=None) -> Explanation:
        scores = self._scores(inputs)
        call = self.family.parse(inputs)
        first = next(v for v in list(call.kwargs.values()) + list(call.args) if isinstance(v, Tensor))
        tokens = self.layout.num_tokens or first.shape[1]
        rows = []
        for sample in first:  # a seed per sample, from its values
            digest = int(torch.as_tensor(sample, dtype=torch.float64).abs().sum().item() * 1e6) % (2 ** 31)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + digest)
            rows.append(torch.rand(tokens, generator=generator))
        relevance = torch.stack(rows)
        if self.layout.prefix_tokens:
            relevance[:, :self.layout.prefix_tokens] = 0
        return self._explanation(scores, self._classes(scores, target), relevance)


class Occlusion(_Reference):
    """Single-patch (vision) or single-token (text) occlusion: an item's relevance is how much
    the explained logit drops when it alone is removed (patch pixels set to ``baseline``, the
    model-input value of a removed pixel, e.g. ``relfast.data.normalize`` of black; a token
    replaced by ``mask_token_id``, else by ``pad_token_id`` with its attention masked). One forward
    per item: a costly but direct measure, the ceiling attention methods are compared to."""

    name = "occlusion"

    def __init__(self, explainer: Explainer, baseline: Optional[Tensor] = None, mask_token_id: Optional[int] = None,
                 pad_token_id: int = 0):
        super().__init__(explainer)
        self.baseline, self.mask_token_id, self.pad_token_id = baseline, mask_token_id, pad_token_id

    def __call__(self, inputs, target=None) -> Explanation:
        scores = self._scores(inputs)
        classes = self._classes(scores, target)
        explained = scores.gather(1, classes.view(-1, 1))[:, 0]
        if self.layout.is_vision:
            relevance = self._patches(inputs, classes, explained)
        else:
            relevance = self._tokens(inputs, classes, explained)
        return self._explanation(scores, classes, relevance)

    def _logit(self, inputs, classes: Tensor) -> Tensor:
        return self._scores(inputs).gather(1, classes.view(-1, 1))[:, 0]

    def _patches(self, pixels, classes: Tensor, explained: Tensor) -> Tensor:
        pixels = pixels["pixel_values"] if isinstance(pixels, dict) else pixels
        (h, w), (ph, pw) = self.layout.patch_grid, self.layout.patch_size
        baseline = torch.zeros(()) if self.baseline is None else self.baseline
        relevance = torch.zeros(pixels.shape[0], self.layout.num_tokens)
        for index in range(h * w):
            row, column = divmod(index, w)
            occluded = pixels.clone()
            window = occluded[:, :, row * ph:(row + 1) * ph, column * pw:(column + 1) * pw]
            window.copy_(baseline.to(pixels.dtype).expand_as(window) if baseline.dim() == 0
                         else baseline.to(pixels.dtype).view(1, -1, 1, 1).expand_as(window))
            relevance[:, self.layout.prefix_tokens + index] = (explained - self._logit(occluded, classes)).float()
        return relevance

    def _tokens(self, inputs, classes: Tensor, explained: Tensor) -> Tensor:
        inputs = dict(inputs) if hasattr(inputs, "keys") else {"input_ids": inputs}
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        relevance = torch.zeros(ids.shape, dtype=torch.float32)
        for position in range(ids.shape[1]):
            occluded = dict(inputs)
            if self.mask_token_id is not None:
                occluded["input_ids"] = ids.clone().index_fill_(1, torch.tensor([position]), self.mask_token_id)
            else:
                occluded["input_ids"] = ids.clone().index_fill_(1, torch.tensor([position]), self.pad_token_id)
                occluded["attention_mask"] = mask.clone().index_fill_(1, torch.tensor([position]), 0)
            real = mask[:, position].bool()
            if not real.any():
                continue
            drop = explained - self._logit(occluded, classes)
            relevance[:, position] = torch.where(real, drop, torch.zeros_like(drop)).float()
        return relevance
