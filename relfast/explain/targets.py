"""What is explained: target parsing and range checks (once, before any work), the explained
scalar per sample, and ready-made callable targets."""
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

TargetSpec = Union[None, int, Sequence[int], Sequence[Sequence[int]], Tensor, Callable[[Tensor], Tensor]]


@dataclass(frozen=True)
class Targets:
    """A parsed ``target=`` argument.

    Forms: ``None`` (argmax per sample), one class for every sample, one per sample (B,), K per
    sample (B, K) or the same K for every sample (1, K), a callable (output -> (B,) scalars), or an
    exported graph's target tensor (``-1`` = the predicted class, per sample).
    """

    fixed: Optional[Tensor] = None  # int64: () one class, (B,), (1, K) or (B, K)
    function: Optional[Callable[[Tensor], Tensor]] = None
    graph_tensor: Optional[Tensor] = None  # (B,) int64, -1 = argmax (relfast.export)

    @staticmethod
    def parse(target: TargetSpec, num_classes: Optional[int], where: str = "relfast.Explainer") -> "Targets":
        """Validates ``target`` against a model with ``num_classes`` outputs (None: unknown)."""
        if target is None:
            return Targets()
        if callable(target) and not isinstance(target, Tensor):
            return Targets(function=target)
        fixed = _as_index_tensor(target, where)
        if num_classes is not None:
            check_class_range(fixed, num_classes, where)
        return Targets(fixed=fixed)

    @property
    def count(self) -> int:
        """Targets per sample (K): 1 unless a (.., K) form was given."""
        return 1 if self.fixed is None or self.fixed.dim() < 2 else self.fixed.shape[1]

    @property
    def per_sample_k(self) -> bool:
        return self.fixed is not None and self.fixed.dim() == 2

    def check_batch(self, batch: int, where: str = "relfast.Explainer") -> None:
        if self.fixed is not None and self.fixed.dim() >= 1 and self.fixed.shape[0] not in (1, batch):
            raise ValueError(f"{where}: argument 'target' holds {self.fixed.shape[0]} rows but the batch has "
                             f"{batch} samples")

    def resolve(self, scores: Tensor) -> Optional[Tensor]:
        """The classes explained: (B,) or (B, K) int64, or None for a callable target."""
        batch = scores.shape[0]
        if self.function is not None:
            return None
        if self.graph_tensor is not None:
            return torch.where(self.graph_tensor < 0, scores.argmax(dim=-1), self.graph_tensor)
        if self.fixed is None:
            return scores.detach().argmax(dim=-1)
        fixed = self.fixed.to(scores.device)
        if fixed.dim() == 0:
            return fixed.expand(batch).clone()
        return fixed.expand(batch, *fixed.shape[1:]).clone()

    def scalar(self, scores: Tensor, explained: Optional[Tensor], k: int = 0) -> Tensor:
        """The sum over samples of each sample's explained scalar (the raw target logit, or the
        callable's value): samples are independent, so one backward serves the whole batch."""
        if self.function is not None:
            values = self.function(scores)
            if not isinstance(values, Tensor) or tuple(values.shape) != (scores.shape[0],):
                raise ValueError(f"relfast.Explainer: a callable 'target' must return one scalar per sample, shape "
                                 f"({scores.shape[0]},), got {getattr(values, 'shape', type(values).__name__)}")
            if not values.requires_grad:
                raise ValueError("relfast.Explainer: the callable 'target' returned values that do not depend on the "
                                 "model's output (detached or constant); it must be computed from its argument")
            return values.sum()
        classes = explained if explained.dim() == 1 else explained[:, k]
        return scores.gather(1, classes.view(-1, 1)).sum()


def check_class_range(classes: Tensor, num_classes: int, where: str = "relfast.Explainer",
                      what: str = "argument 'target'", unit: str = "class") -> None:
    """The one range check of explained classes (or a causal LM's token ids, ``unit="token"``):
    every entry in [0, num_classes). Used by the engine and the command line."""
    if classes.numel() == 0:
        return
    low, high = int(classes.min()), int(classes.max())
    if low < 0 or high >= num_classes:
        plural = {"class": "classes", "query": "queries"}.get(unit, unit + "s")
        raise ValueError(f"{where}: {what} holds {unit} {low if low < 0 else high}, out of range for a model with "
                         f"{num_classes} {plural} [0, {num_classes})")


def _as_index_tensor(target, where: str) -> Tensor:
    if isinstance(target, bool):
        raise ValueError(f"{where}: argument 'target' must be a class index, got a bool")
    if type(target).__module__ == "numpy":  # numpy integers and arrays, as the ONNX runtime takes them
        target = torch.as_tensor(target)
    if isinstance(target, int):
        return torch.tensor(target)
    if isinstance(target, Tensor):
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise ValueError(f"{where}: argument 'target' must hold integer class indices, got {target.dtype}")
        if target.dim() > 2:
            raise ValueError(f"{where}: argument 'target' must be an int, (B,) or (B, K), got shape "
                             f"{tuple(target.shape)}")
        if target.dim() == 2 and target.shape[1] == 0:
            raise ValueError(f"{where}: argument 'target' of shape {tuple(target.shape)} holds no classes per sample")
        return target.detach().long().cpu()
    if isinstance(target, (list, tuple)) and target and all(isinstance(x, int) and not isinstance(x, bool) for x in target):
        return torch.tensor([list(target)])  # the same K classes for every sample: (1, K)
    if isinstance(target, (list, tuple)) and target and all(isinstance(x, (list, tuple)) for x in target):
        lengths = {len(x) for x in target}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"{where}: argument 'target' as a list of lists must hold the same number (>= 1) of "
                             "classes for every sample")
        return torch.tensor([list(x) for x in target])
    if isinstance(target, (list, tuple)) and not target:
        raise ValueError(f"{where}: argument 'target' is an empty list")
    raise ValueError(f"{where}: argument 'target' must be None, an int, a (B,) or (B, K) tensor, a list of class "
                     f"indices, a list of lists, or a callable; got {type(target).__name__}")


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token embeddings over the real (unmasked) tokens: (B, N, D) -> (B, D)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def mean_pooled_cosine(model: torch.nn.Module, explained: Mapping[str, Tensor],
                       reference: Mapping[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """Target for sentence encoders (sentence-transformers style): the cosine similarity between
    each explained sentence's mean-pooled embedding and the matching reference sentence's.
    ``explained``/``reference`` are tokenizer outputs with the same batch size."""
    with torch.no_grad():
        reference_embedding = mean_pool(model(**reference).last_hidden_state, reference["attention_mask"])

    def similarity(hidden: Tensor) -> Tensor:
        pooled = mean_pool(hidden, explained["attention_mask"])
        return torch.nn.functional.cosine_similarity(pooled, reference_embedding, dim=-1)

    return similarity
