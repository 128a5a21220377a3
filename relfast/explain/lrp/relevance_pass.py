"""The relevance pass of one call: the model's forward under :class:`RelevanceCapture`, run once
on first use, then one backward per target seeded with the one-hot target at the scores."""
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..families import Family, ModelCall
from .mode import RelevanceCapture
from .paper_rules import RuleSet
from .rules import PassState

__all__ = ["RelevancePass"]


class RelevancePass:
    """Args:
        family, call: the call's model and parsed inputs (``call`` with its graph leaves; its
            explained rows are set by the session before the first backward).
        rules: the rule set (a :class:`RuleSet` or its name; True: the CVPR method's, False: the
            textbook one).
        gradients: the call also takes the model's gradients from this pass's graph (backwards run
            under :meth:`computing_gradients`); its rules then keep what gradients need.
    """

    def __init__(self, family: Family, call: ModelCall, rules: Union[RuleSet, str, bool], gradients: bool = False):
        self.family, self.call, self.rules = family, call, RuleSet.of(rules)
        self.state = PassState(gradients_possible=gradients)
        self._forward: Optional[Tuple[RelevanceCapture, Any]] = None
        self._scores: Optional[Tensor] = None

    def forward(self) -> Tuple[Any, List[Tensor]]:
        """Runs the relevance forward once: (the model's output, its attention maps in order)."""
        if self._forward is None:
            capture = RelevanceCapture(self.rules, self.state)
            with torch.enable_grad(), capture:
                output = self.family.forward(self.call)
            model = type(self.family.model).__name__
            if capture.unsupported:
                names = sorted(set(capture.unsupported))
                raise ValueError(f"relfast.Explainer: the {model} model applies {', '.join(names)} to its activations, "
                                 "for which relfast has no LRP rule; use method 'generic' (gradient-weighted "
                                 "attention needs no rule per op)")
            self._forward = (capture, output)
        return self._forward[1], self._forward[0].attention

    @property
    def scores(self) -> Tensor:
        """(B, C) the relevance forward's scores (in its graph)."""
        if self._scores is None:
            output, _ = self.forward()
            self._scores = self.family.scores(output, self.call)
        return self._scores

    def backward(self, explained: Tensor, sites: Sequence[int], inputs: Sequence[Tensor] = (),
                 retain_graph: bool = False) -> List[Tensor]:
        """Relevance of the attention maps ``sites`` (B, H, N, N) and of ``inputs`` (leaves of the
        call) for the classes ``explained`` (B,), from one-hot relevance at the scores."""
        _, maps = self.forward()
        scores = self.scores
        seed = torch.zeros_like(scores)
        seed[torch.arange(scores.shape[0], device=scores.device), explained.to(scores.device)] = 1
        wanted = [maps[i] for i in sites] + list(inputs)
        relevance = torch.autograd.grad(scores, wanted, grad_outputs=seed, retain_graph=retain_graph,
                                        allow_unused=True)
        return [r.detach() if r is not None else torch.zeros_like(w) for r, w in zip(relevance, wanted)]

    def computing_gradients(self):
        """A context in which backwards through this pass's graph compute the model's gradients
        (the vector-Jacobian products of the ops its forward computed), not relevance."""
        return self.state.computing_gradients()

    def input_leaves(self) -> List[Tensor]:
        """The tensors input relevance is read at: the float inputs (pixels; half-precision ones at
        the float32 copy the rules used), else the embedding lookup of the call's ``input_ids`` (or of
        a view of them)."""
        self.forward()
        floats = [v for v in list(self.call.args) + list(self.call.kwargs.values())
                  if isinstance(v, Tensor) and v.requires_grad]
        if floats:
            return [self._forward[0].float32_copy(floats[0])]
        ids = self.call.kwargs.get("input_ids", self.call.args[0] if self.call.args else None)
        return [leaf for indices, leaf in self._forward[0].embeddings if _view_of(indices, ids)][:1]


def _view_of(indices: Any, ids: Any) -> bool:
    """``indices`` are ``ids`` or a view of all of them (GPT-2 looks up ``input_ids.view(-1, N)``)."""
    if indices is ids:
        return True
    return (isinstance(indices, Tensor) and isinstance(ids, Tensor) and indices.numel() == ids.numel() > 0
            and indices.data_ptr() == ids.data_ptr() and indices.dtype == ids.dtype)
