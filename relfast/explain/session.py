"""One explanation call, from inputs to relevance, leaving the model as it found it.

    inputs -> family.parse (every check) -> capture on -> forward -> records -> targets ->
    method (backward streamed into the rule, or records replayed) -> relevance

Nothing about the model is changed: no attention switch, no flag, no hook, no ``requires_grad``
(the capture hands parameters to the ops detached). What the call needs lives in the session,
so one ``Explainer`` can serve several threads at once.
"""
import dataclasses
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from .capture import AttentionCapture, AttentionRecord, ProbabilityRecord
from .families import Family, ModelCall
from .lrp import RelevancePass
from .methods import Method, Run
from .targets import Targets, check_class_range


class Session:
    """Runs ``method`` on ``family``'s model for one call.

    Args:
        traced: the call is being traced into a graph (``relfast.export``): attention is computed
            as plain ops, and the checks that read values (NaN/inf, class range) are left to the
            exported file's own input validation.
    """

    def __init__(self, family: Family, method: Method, targets: Targets, traced: bool = False):
        self.family, self.method, self.targets = family, method, targets
        self.traced = traced

    def run(self, inputs: Any) -> Tuple[Tensor, Optional[Tensor], Tensor]:
        """Returns (scores (B, C), explained classes or None, float32 relevance)."""
        _check_eval_mode(self.family.model)
        call = self.family.parse(inputs)
        self.targets.check_batch(call.batch)
        if not self.traced:
            self.family.check_values(call)
        kind = self.family.attention_capture()
        gradients = self.method.needs_gradients
        # LRP-only methods: the relevance forward is the call's only forward
        relevance_only = self.method.uses_relevance_pass and not gradients
        with torch.enable_grad() if gradients or relevance_only else torch.no_grad():
            if gradients or relevance_only:
                call = _graph_inputs(call)
            relevance_pass = None
            if relevance_only:
                relevance_pass = RelevancePass(self.family, call, self.method.conserve)
                output, maps = relevance_pass.forward()
                records = [ProbabilityRecord(m) for m in maps]
            else:
                output, records = self._forward(call, kind)
            num_tokens = self._check_records(records, call)
            call.rows = self.family.layout.explained_rows(call.batch, call.token_mask, num_tokens, _device(call))
            scores = relevance_pass.scores if relevance_only else self.family.scores(output, call)
            if not self.traced:
                _check_finite_scores(scores)
            explained = self.targets.resolve(scores)
            if not self.traced and explained is not None:  # families that know no class count before the forward
                check_class_range(explained, scores.shape[-1])
            run = Run(records, call.rows, call.token_mask, self.family.layout, scores, explained, self.targets)
            if self.method.uses_relevance_pass:  # a second forward, run when the method first asks
                run.relevance_pass = relevance_pass or RelevancePass(self.family, call, self.method.conserve,
                                                                     len(records))
            try:
                relevance = self.method.relevance(run).detach().float()
            except ValueError as error:  # a relfast op refused overflowing gradients: say it as the explainer
                if _is_op_overflow(error):
                    raise _relevance_overflow() from error
                raise
        if not self.traced and not bool(torch.isfinite(relevance).all()):
            raise _relevance_overflow()
        return scores.detach(), explained, relevance

    def _forward(self, call: ModelCall, kind: str) -> Tuple[Any, List[AttentionRecord]]:
        """The model's forward under the attention capture: (output, one record per site)."""
        capture = AttentionCapture(softmax=self.family.softmax_capture and kind == "sdpa", explicit=self.traced)
        with capture:
            output, attentions = self.family.forward(call, output_attentions=kind == "eager")
        records = capture.records
        if kind == "eager":
            if records:
                raise ValueError(f"relfast.Explainer: the {type(self.family.model).__name__} model is configured "
                                 "for eager attention but ran scaled_dot_product_attention in some layers; load it "
                                 "with one attention implementation")
            records = [ProbabilityRecord(a) for a in attentions or () if a is not None]
        return output, records

    def _check_records(self, records: List[AttentionRecord], call: ModelCall) -> int:
        """Every site seen, all of one (B, H, N, N) self-attention shape; returns N."""
        model = type(self.family.model).__name__
        expected = self.family.attention_sites()
        if not records:
            raise ValueError(f"relfast.Explainer: no attention was seen while the {model} model ran: its attention must "
                             "go through torch's scaled_dot_product_attention, nn.MultiheadAttention or a softmax "
                             "(HuggingFace models: attn_implementation 'sdpa' or 'eager')")
        if expected is not None and len(records) != expected:
            raise ValueError(f"relfast.Explainer: the {model} model has {expected} attention layers but {len(records)} "
                             "attention maps were seen in its forward (layers with another attention implementation?)")
        shapes = []  # distinct shapes; a list, as traced (symbolic) sizes cannot be hashed
        for record in records:
            if tuple(record.shape) not in shapes:
                shapes.append(tuple(record.shape))
        shape = records[0].shape
        n = shape[-1]
        if len(shapes) != 1 or len(shape) != 4 or shape[0] != call.batch or shape[-2] != n:
            raise ValueError(f"relfast.Explainer: the attention sites of the {model} model have shapes "
                             f"{shapes}; relfast explains single-stream self-attention of shape (B={call.batch}, "
                             "heads, N, N)")
        if call.num_tokens is not None and n != call.num_tokens:
            raise ValueError(f"relfast.Explainer: the attention covers {n} tokens but the input has {call.num_tokens}")
        layout = self.family.layout
        if layout.num_tokens is not None and n != layout.num_tokens:
            raise ValueError(f"relfast.Explainer: the layout describes {layout.num_tokens} tokens ({layout.prefix_tokens} "
                             f"prefix + {layout.patch_grid[0]}x{layout.patch_grid[1]} patches) but the model's attention "
                             f"covers {n}")
        return n


def _check_eval_mode(model: torch.nn.Module) -> None:
    """Dropout and other training behaviour would make each call's explanation different."""
    training = [name or type(model).__name__ for name, module in model.named_modules() if module.training]
    if training:
        raise ValueError(f"relfast.Explainer: the model is in training mode ({len(training)} modules, e.g. "
                         f"'{training[0]}'); explanations need the deterministic model: call model.eval() first")


def _check_finite_scores(scores: Tensor) -> None:
    """Finite inputs can still overflow in the forward (huge weights or pixel values)."""
    if not bool(torch.isfinite(scores.detach()).all()):
        raise ValueError("relfast.Explainer: the model's output holds NaN or infinite values for these inputs (overflow "
                         "in the model's arithmetic: inputs or weights too large for its dtype?); there is nothing "
                         "meaningful to explain")


def _relevance_overflow() -> ValueError:
    return ValueError("relfast.Explainer: the relevance overflowed to NaN or infinite values (the gradients of the "
                      "explained output are too large for the model's dtype); explain it in float32 or float64")


def _is_op_overflow(error: ValueError) -> bool:
    """The relfast ops' own refusal of non-finite or overflowing values (see csrc/checks.cpp)."""
    message = str(error)
    return message.startswith("relfast.") and not message.startswith("relfast.Explainer") and (
        "the result overflowed" in message or "must be finite" in message)


def _device(call: ModelCall):
    for value in list(call.args) + list(call.kwargs.values()):
        if isinstance(value, Tensor):
            return value.device
    return torch.device("cpu")


def _graph_inputs(call: ModelCall) -> ModelCall:
    """Floating-point inputs become fresh leaves that require grad (the user's tensors are not
    touched); integer inputs reach the graph through the embeddings (see the capture)."""
    def leaf(value):
        if isinstance(value, Tensor) and value.dtype.is_floating_point:
            return value.detach().requires_grad_()
        return value

    return dataclasses.replace(call, kwargs={k: leaf(v) for k, v in call.kwargs.items()},
                               args=tuple(leaf(a) for a in call.args))
