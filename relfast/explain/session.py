"""One explanation call, from inputs to relevance, leaving the model as it found it.

    inputs -> family.parse (every check) -> capture on -> forward -> records -> targets ->
    method (backward streamed into the rule, or records replayed) -> relevance

Nothing about the model is changed: no attention switch, no flag, no hook, no ``requires_grad``
(the capture hands parameters to the ops detached). What the call needs lives in the session,
so one ``Explainer`` can serve several threads at once.
"""
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .capture import AttentionCapture, AttentionRecord, ProbabilityRecord
from .families import ChainedStreams, Family, ModelCall
from .layout import TokenLayout
from .methods import Method, Run
from .streams import CrossPlan, IndependentStreams
from .targets import Targets, check_class_range


@dataclasses.dataclass
class SessionResult:
    """What one call computed.

    Attributes:
        scores: (B, C) what the target indexed, detached.
        explained: (B,) / (B, K) explained classes, or None (callable target); CLIP: (P,) the text
            index of each explained pair.
        relevance: float32, the explained rows (one-stream models), or the first map.
        maps: float32 relevance per token stream ("image", "text", "queries").
        layouts: the token layout of each map.
        output: the model's output, detached, where the family keeps it (DETR's logits and boxes).
        pairs: CLIP: (P, 2) the (image, text) index of each explained pair; else None.
        layers: attnlrp with ``layers=True``: per-layer relevance by map name; else None.
    """

    scores: Tensor
    explained: Optional[Tensor]
    relevance: Tensor
    maps: Dict[str, Tensor]
    layouts: Dict[str, TokenLayout]
    output: Any = None
    pairs: Optional[Tensor] = None
    layers: Optional[Dict[str, Tensor]] = None


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

    def run(self, inputs: Any) -> SessionResult:
        _check_eval_mode(self.family.model)
        call = self.family.parse(inputs)
        self.family.check_input_types(call)
        call, targets = self.family.prepare(call, self.targets)
        targets.check_batch(call.batch)
        if not self.traced:
            self.family.check_values(call)
        self.family.check_attention_implementation()
        gradients = self.method.needs_gradients
        # LRP methods: the relevance forward is the call's only forward (transformer attribution
        # takes its gradients from that forward's graph too)
        relevance_only = self.method.uses_relevance_pass and (not gradients or
                                                              self.method.gradients_from_relevance_pass)
        with torch.enable_grad() if gradients or relevance_only else torch.no_grad():
            if gradients or relevance_only:
                call = _graph_inputs(call)
            relevance_pass = None
            if relevance_only:
                relevance_pass = self.method.relevance_pass(self.family, call)
                output, maps = relevance_pass.forward()
                records = [ProbabilityRecord(m) for m in maps]
            else:
                output, records = self._forward(call)
            plan = self.family.plan(records, call)
            if plan is None:
                num_tokens = self._check_records(records, call)
                call.rows = self.family.explained_rows(call, num_tokens, _device(call))
            scores = relevance_pass.scores if relevance_only else self.family.scores(output, call)
            if not self.traced:
                _check_finite_scores(scores)
            explained = targets.resolve(scores)
            if not self.traced and explained is not None:  # families that know no class count before the forward
                check_class_range(explained, scores.shape[-1])
            run = Run(records, call.rows, call.token_mask, self.family.layout, scores, explained, targets,
                      row_weights=None if plan is not None else self.family.explained_row_weights(call, _device(call)))
            if self.method.uses_relevance_pass:
                run.relevance_pass = relevance_pass
            try:
                maps, layouts = self._relevance(run, plan, call)
            except ValueError as error:  # a relfast op refused overflowing gradients: say it as the explainer
                if _is_op_overflow(error):
                    raise _relevance_overflow() from error
                raise
        if not self.traced and not all(bool(torch.isfinite(m).all()) for m in maps.values()):
            raise _relevance_overflow()
        kept = _detached(output) if self.family.keeps_output else None
        if call.pairs is not None:  # CLIP: each row's scores are its pair's one similarity; say which text it is
            explained = call.pairs[:, 1]
        layers = self.method.layer_maps(run, maps)  # attnlrp's layers=True (else None)
        return SessionResult(scores.detach(), explained, next(iter(maps.values())), maps, layouts, kept, call.pairs,
                             layers)

    def _relevance(self, run: Run, plan, call: ModelCall):
        """The method on the call's streams: (maps by name, their layouts), float32."""
        if plan is None:
            relevance = self.method.relevance(run).detach().float()
            maps = self.family.split_maps(relevance, call, raw=self.method.raw_maps)
            return maps, {name: self.family.map_layout(name) for name in maps}
        if isinstance(plan, IndependentStreams):
            maps = {}
            for i, stream in enumerate(plan.streams):  # the graph is kept for the streams still to come
                stream_run = run.for_stream(stream, keep_graph=i + 1 < len(plan.streams))
                maps[stream.name] = self.method.relevance(stream_run).detach().float()
        elif isinstance(plan, CrossPlan):
            run.cross_plan = plan
            maps = {name: m.detach().float() for name, m in self.method.relevance(run).items()}
        elif isinstance(plan, ChainedStreams):  # LLaVA: the rows go on from the LM into the vision tower
            maps = {name: m.detach().float() for name, m in self.method.chained_relevance(run, plan).items()}
        else:
            raise TypeError(f"relfast: unknown stream plan {type(plan).__name__}")
        maps = self.family.finish_maps(maps, call, raw=self.method.raw_maps)
        return maps, {stream.name: stream.layout for stream in plan.streams}

    def _forward(self, call: ModelCall) -> Tuple[Any, List[AttentionRecord]]:
        """The model's forward under the attention capture: (output, one record per site).

        Eager attention is seen as its softmax, never through ``output_attentions``: that path
        makes transformers install output-capturing hooks on the model for good."""
        capture = AttentionCapture(softmax=self.family.softmax_capture, explicit=self.traced,
                                   fused_rows=self.method.streams_rows)
        with capture:
            output = self.family.forward(call)
        return output, capture.records

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


def _detached(output: Any) -> Any:
    """An HF ModelOutput (a dataclass dict) without its graph: its tensors detached."""
    return type(output)(**{key: value.detach() if isinstance(value, Tensor) else value
                           for key, value in output.items()})


def _device(call: ModelCall):
    for value in list(call.args) + list(call.kwargs.values()):
        if isinstance(value, Tensor):
            return value.device
    return torch.device("cpu")


def _graph_inputs(call: ModelCall) -> ModelCall:
    """Floating-point inputs become fresh leaves that require grad (the user's tensors are not
    touched); integer inputs reach the graph through the embeddings (see the capture)."""
    def leaf(value):
        if not isinstance(value, Tensor):
            return value
        if value.is_inference():  # made under torch.inference_mode: autograd cannot save it; a normal copy can
            value = value.clone()
        if value.dtype.is_floating_point:
            return value.detach().requires_grad_()
        return value

    return dataclasses.replace(call, kwargs={k: leaf(v) for k, v in call.kwargs.items()},
                               args=tuple(leaf(a) for a in call.args))
