"""Floor and ceiling references for the evaluation tables: a random map, and single-patch (or
single-token) occlusion, which measures each item's effect on the explained logit directly.

Both wrap a ``relfast.Explainer`` for its model, family and layout, and are called like it:
``reference(inputs, target)`` returns a ``relfast.Explanation``, so ``perturbation`` and
``segmentation`` take them as they take an explainer.
"""
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..explain.explainer import Explainer, Explanation
from . import checks


class _Reference:
    name = "?"

    def __init__(self, explainer: Explainer):
        if not isinstance(explainer, Explainer):
            raise ValueError(f"relfast.eval.{type(self).__name__}: argument 'explainer' must be a relfast.Explainer, "
                             f"got {type(explainer).__name__}")
        checks.classifier(explainer, f"relfast.eval.{type(self).__name__}")  # plain class scores, one stream
        self.explainer, self.family, self.layout, self.model = explainer, explainer.family, explainer.layout, \
            explainer.model

    @property
    def _where(self) -> str:
        return f"relfast.eval.{type(self).__name__}"

    def _check_inputs(self, inputs) -> int:
        """The model's own checks of ``inputs`` before any forward; the batch size."""
        checks.model_inputs(self.family, inputs, "inputs", self._where)
        return self.family.parse(inputs).batch

    def _scores(self, inputs) -> Tensor:
        return self.family.plain_scores(inputs)

    def _explanation(self, scores: Tensor, target: Tensor, relevance: Tensor) -> Explanation:
        return Explanation(scores, target, relevance.float(), self.layout)

    def _target(self, target, batch: int) -> Optional[Tensor]:
        """None, a class, or one class per sample (B,), in the model's classes: checked before any work."""
        if target is None:
            return None
        if checks.is_int(target):
            target = torch.tensor([int(target)] * batch)
        elif isinstance(target, (list, tuple, np.ndarray)):
            try:
                array = np.asarray(target)
            except ValueError:  # ragged lists
                array = None
            if array is not None and array.dtype.kind in "iu":
                target = torch.from_numpy(array.astype(np.int64))
        if not isinstance(target, Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool \
                or target.is_complex() or tuple(target.shape) not in ((), (batch,)):
            raise ValueError(f"{self._where}: argument 'target' must be None, a class index, or one class index per "
                             f"sample ({batch},), got {getattr(target, 'shape', type(target).__name__)}")
        target = target.reshape(-1).expand(batch).clone() if target.dim() == 0 else target
        classes = self.family.num_classes()
        low, high = int(target.min()), int(target.max())
        if low < 0 or (classes is not None and high >= classes):
            raise ValueError(f"{self._where}: argument 'target' holds class {low if low < 0 else high}, outside the "
                             f"model's classes [0, {classes})")
        return target

    @staticmethod
    def _classes(scores: Tensor, target: Optional[Tensor]) -> Tensor:
        return scores.argmax(dim=-1) if target is None else target.to(scores.device)


class RandomMap(_Reference):
    """Relevance drawn uniformly at random: the floor a faithful method must beat. Each sample's
    map depends only on ``seed`` and the sample's values, so it does not change with batching."""

    name = "random"

    def __init__(self, explainer: Explainer, seed: int = 0):
        super().__init__(explainer)
        if not checks.is_int(seed) or seed < 0:
            raise ValueError(f"relfast.eval.RandomMap: argument 'seed' must be an int >= 0, got {seed!r}")
        self.seed = int(seed)

    def __call__(self, inputs, target=None) -> Explanation:
        target = self._target(target, self._check_inputs(inputs))
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
        where = "relfast.eval.Occlusion"
        if self.layout.is_vision:
            if mask_token_id is not None:
                raise ValueError(f"{where}: argument 'mask_token_id' applies to text models; an image model's patches "
                                 "are set to 'baseline'")
            channels = _channels(self.family)
            if baseline is not None and (not isinstance(baseline, Tensor) or not baseline.dtype.is_floating_point
                                         or baseline.dim() > 1
                                         or (baseline.dim() == 1 and baseline.shape[0] != (channels or len(baseline)))
                                         or not bool(torch.isfinite(baseline).all())):
                raise ValueError(f"{where}: argument 'baseline' must be None or a finite float tensor of shape () or "
                                 f"({channels or 'channels'},) (one model-input value per channel), got "
                                 f"{getattr(baseline, 'shape', type(baseline).__name__)}")
        else:
            if baseline is not None:
                raise ValueError(f"{where}: argument 'baseline' applies to image models; a text model's tokens are "
                                 "replaced by 'mask_token_id' or padding")
            vocab = self.family.vocab_size()
            if mask_token_id is not None:
                checks.token_id(mask_token_id, "mask_token_id", where, vocab)
            checks.token_id(pad_token_id, "pad_token_id", where, vocab)
        self.baseline, self.mask_token_id, self.pad_token_id = baseline, mask_token_id, pad_token_id

    def __call__(self, inputs, target=None) -> Explanation:
        target = self._target(target, self._check_inputs(inputs))
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


def _channels(family) -> Optional[int]:
    """The image channels the model takes (None: not known before a call)."""
    model = family.model
    config = getattr(model, "config", None)
    if getattr(config, "num_channels", None) is not None:
        return config.num_channels
    for name in ("patch_embed.proj", "conv_proj"):  # timm, torchvision
        module = model
        for part in name.split("."):
            module = getattr(module, part, None)
        if isinstance(module, torch.nn.Conv2d):
            return module.in_channels
    return None
