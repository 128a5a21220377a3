"""The relevance forward: a ``TorchFunctionMode`` that runs the user's model with every op on
activations replaced by its [P1] rule (``rules.py``), so that one backward from the one-hot
target yields relevance instead of gradients.

Nothing of the model changes: the mode lives for one forward on the calling thread, parameters
reach the ops detached, and the rule functions compute exactly what the replaced ops compute.
``scaled_dot_product_attention`` and ``nn.MultiheadAttention`` are written out as their two
matmuls and softmax, so their attention map exists and its relevance ``R_A`` can be read. Every
attention map (a softmax over the last dimension of a 4-D tensor) is recorded, in forward order.

An op with activations in and out and no rule (and that is not a pure data move) would carry
gradients where relevance belongs: it is collected in ``unsupported`` and the forward refused.

Causal LMs write some layers out as element-wise ops, which the mode recognises by where the
operands come from (tracked for the forward only):
- the *source* of a tensor is the activation it is an element-wise function of (through
  activations, ``pow``, ``rsqrt``, negation, scaling and shifts by constants, sums and products of
  functions of the same source, and means over the last dimension kept for broadcasting: a
  row statistic). A product or quotient of two functions of one source (``gelu_new`` written out,
  RMSNorm's ``x·rsqrt(mean(x²) + ε)``) is one activation or normalisation of it: relevance passes
  from the result to the source, as for ``F.gelu`` and ``F.layer_norm``; a product of two
  activations of different sources (a gated MLP) takes ``ProductRule``;
- the *linear root* of a tensor is the activation it is a linear image of through data moves,
  negation and scaling by constants. A sum of two linear images of one root (rotary embeddings,
  ``q·cos + rotate_half(q)·sin``) is that linear map: the z-rule, without Eq. 9;
- ``torch.addmm(bias, x, W)`` with constant bias and weight (GPT-2's ``Conv1D``) is a linear layer.

Half-precision models (float16, bfloat16) get their relevance forward in float32: every operand of
a rule is cast (``rules.widened``; weights per use inside the rules), embeddings come out float32,
so the activations and relevance between rules are float32. The model itself is not cast.
"""
import inspect
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..capture.mode import _bind_sdpa, detached_parameters, training_error
from ..capture.records import attention_bias, expand_groups, group_size, sdpa_scale
from .paper_rules import RuleSet, conv_rule, linear_rule
from .rules import (HALF, AddRule, MatMulRule, MeanRule, PassState, ProductRule,
                    SameSourceProduct, dims_of, pass_through, rules_of, widened)

T = torch.Tensor
_SOFTMAX = {torch.softmax, F.softmax, T.softmax, torch.special.softmax}
_PASS_THROUGH = {F.layer_norm, F.group_norm, F.gelu, F.relu, F.silu, F.tanh, torch.tanh, T.tanh, F.dropout,
                 torch.dropout, T.relu, torch.relu, F.rms_norm}
_MATMUL = {torch.matmul, T.matmul, T.__matmul__, torch.bmm, T.bmm}
_ADD = {torch.add, T.add, T.__add__, T.__radd__, T.__iadd__}
_SCALE = {torch.mul, T.mul, T.__mul__, T.__rmul__, T.__imul__, torch.div, T.div, T.__truediv__, T.__itruediv__}
_MEAN = {torch.mean, T.mean}
_POW = {torch.pow, T.pow, T.__pow__}
_RSQRT = {torch.rsqrt, T.rsqrt}
_NEG = {torch.neg, T.neg, T.__neg__, torch.negative, T.negative}
_ADDMM = {torch.addmm, T.addmm}
# element-wise functions of one activation: its source carries over to the result
_ELEMENTWISE = {F.gelu, F.relu, F.silu, F.tanh, torch.tanh, T.tanh, F.dropout, torch.dropout, T.relu, torch.relu}
_OUT_OF_PLACE = {T.__imul__: torch.mul, T.__itruediv__: torch.div, T.__mul__: torch.mul, T.__rmul__: torch.mul,
                 T.mul: torch.mul, T.__truediv__: torch.div, T.div: torch.div}
# Ops that only move, copy or re-type values: autograd's own backward routes relevance as it
# routed the values (indexing, views, concatenation, expansion; a masked_fill drops the filled).
_DATA_MOVES = {
    T.__getitem__, T.view, T.view_as, T.reshape, T.reshape_as, torch.reshape, T.permute, torch.permute, T.transpose,
    torch.transpose, T.contiguous, T.flatten, torch.flatten, T.unflatten, torch.cat, torch.concat, torch.stack,
    T.split, torch.split, T.chunk, torch.chunk, T.unbind, torch.unbind, T.squeeze, torch.squeeze, T.unsqueeze,
    torch.unsqueeze, T.expand, T.expand_as, T.repeat, T.narrow, torch.narrow, T.select, torch.select, T.clone,
    torch.clone, T.to, T.float, T.double, T.half, T.bfloat16, T.type_as, T.movedim, torch.movedim, T.index_select,
    torch.index_select, T.masked_fill, torch.masked_fill, T.__setstate__, T.mT.__get__, T.T.__get__,
    T.requires_grad_, T.detach, T.type,
}
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _graph(value: Any) -> bool:
    return isinstance(value, Tensor) and value.requires_grad


class RelevanceCapture(TorchFunctionMode):
    """One relevance forward under ``rules`` (a :class:`~.paper_rules.RuleSet`, its name, or True
    for the CVPR method's rules and False for the textbook ones). ``state``: the pass the rules
    made in this forward belong to (whether its backwards may compute gradients instead).

    Attributes:
        attention: the attention maps (B, H, N_q, N_k) of the forward, in order (graph tensors).
        embeddings: (indices, leaf) of each embedding lookup, whose outputs start the graph.
        unsupported: names of ops on activations that have no rule.
    """

    def __init__(self, rules: Union[RuleSet, str, bool], state: Optional[PassState] = None):
        super().__init__()
        self.rule_set = RuleSet.of(rules)
        self.state = state if state is not None else PassState()
        self._rules = None
        self.attention: List[Tensor] = []
        self.embeddings: List[Tuple[Tensor, Tensor]] = []
        self.unsupported: List[str] = []
        self._widened: Dict[int, Tuple[Tensor, Tensor]] = {}  # id -> (half graph tensor, its float32 copy)
        self._source: Dict[int, Tuple[Tensor, Tensor]] = {}  # id -> (tensor, the activation it is element-wise of)
        self._root: Dict[int, Tuple[Tensor, Tensor]] = {}  # id -> (tensor, the activation it is a linear image of)

    def __enter__(self):
        self._rules = rules_of(self.state)  # the rule functions made in this forward belong to this pass
        self._rules.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        self._source.clear()  # what the forward tracked is not kept with the pass
        self._root.clear()
        try:
            return super().__exit__(*exc)
        finally:
            self._rules.__exit__(*exc)

    @staticmethod
    def _origin(table: Dict[int, Tuple[Tensor, Tensor]], t: Tensor) -> Tensor:
        kept = table.get(id(t))
        return kept[1] if kept is not None and kept[0] is t else t

    def _track(self, table: Dict[int, Tuple[Tensor, Tensor]], result: Any, operand: Tensor) -> Any:
        """``result`` carries ``operand``'s origin in ``table`` (same shape only)."""
        if isinstance(result, Tensor) and result.shape == operand.shape:
            table[id(result)] = (result, self._origin(table, operand))
        return result

    def _elementwise(self, result: Tensor, operand: Tensor, linear: bool = False) -> Tensor:
        self._track(self._source, result, operand)
        if linear:
            self._track(self._root, result, operand)
        return result

    def float32_copy(self, t: Tensor) -> Tensor:
        """The float32 copy the rules used of the half-precision graph tensor ``t`` (``t`` itself if
        none): relevance read there is not rounded to half."""
        kept = self._widened.get(id(t))
        return kept[1] if kept is not None and kept[0] is t else t

    def _widen(self, value: Any) -> Any:
        """``value`` as a rule's operand: half types in float32. A graph tensor is cast once (its
        uses then share one copy, where ``float32_copy`` finds it)."""
        if not isinstance(value, Tensor) or value.dtype not in HALF:
            return value
        if not value.requires_grad:
            return value.float()
        kept = self._widened.get(id(value))
        if kept is None or kept[0] is not value:
            kept = self._widened[id(value)] = (value, value.float())
        return kept[1]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs = detached_parameters(args, kwargs or {})
        if func is F.scaled_dot_product_attention:
            return self._sdpa(**_bind_sdpa(args, kwargs))
        if func is F.multi_head_attention_forward:
            return self._multi_head(args, kwargs)
        if any(_graph(a) for a in args) or any(_graph(v) for v in kwargs.values()):
            handled, result = self._rule(func, args, kwargs)
            if handled:
                return result
        if func is T.__setitem__ and any(_graph(a) for a in args):
            self.unsupported.append("Tensor.__setitem__ (writing into an activation)")
        if func not in _DATA_MOVES and not _in_place(func) and _mixes_half(args, kwargs):
            # an op without rule meeting float32 activations and the half model's weights: run it
            # in float32, so that the forward goes on and the refusal names every such op
            args, kwargs = tuple(self._widen(a) for a in args), {k: self._widen(v) for k, v in kwargs.items()}
        result = func(*args, **kwargs)
        if func in _DATA_MOVES and _graph_tree(result):
            self._move_root(args, kwargs, result)
        if func is F.embedding and isinstance(result, Tensor) and result.dtype.is_floating_point:
            result = widened(result).requires_grad_()
            self.embeddings.append((args[0] if args else kwargs["input"], result))
        elif _graph(result) and func not in _DATA_MOVES:
            self.unsupported.append(_op_name(func))
        return result

    def _move_root(self, args: Tuple, kwargs: Dict[str, Any], result: Any) -> None:
        """A data move of one activation's linear images is a linear image of it too."""
        roots = {id(self._origin(self._root, t)): self._origin(self._root, t)
                 for t in _tensors(list(args) + list(kwargs.values())) if _graph(t)}
        if len(roots) != 1:
            return
        (root,) = roots.values()
        for t in _tensors([result]):
            if _graph(t):
                self._root[id(t)] = (t, root)

    # ---- the rules ----

    def _rule(self, func, args: Tuple, kwargs: Dict[str, Any]) -> Tuple[bool, Any]:
        if func is F.linear:  # the weights stay as they are: LinearRule casts them per use
            x, weight, bias = _params(args, kwargs, ("input", "weight", "bias"))
            return True, linear_rule(self.rule_set).apply(self._widen(x), weight, bias)
        if func in _ADDMM:  # bias + x·W (GPT-2's Conv1D): the linear rule with the weight transposed
            bias, x, weight, beta, alpha = _params(args, kwargs, ("input", "mat1", "mat2", "beta", "alpha"))
            if (_graph(x) and not _graph(weight) and not _graph(bias) and beta in (None, 1) and alpha in (None, 1)
                    and isinstance(bias, Tensor) and bias.dim() == 1):
                return True, linear_rule(self.rule_set).apply(self._widen(x), weight.transpose(0, 1), bias)
            return False, None
        if func is F.conv2d:
            return True, self._conv2d(*args, **kwargs)
        # The other rules' constant operands are small or transient: all are cast.
        args, kwargs = tuple(self._widen(a) for a in args), {k: self._widen(v) for k, v in kwargs.items()}
        if func in _PASS_THROUGH:
            if func in (F.dropout, torch.dropout) and _dropout_active(func, args, kwargs):
                raise training_error("dropout")
            kind = "linear" if func in (F.dropout, torch.dropout) else "nonlinear"  # dropout: eval only
            result = pass_through(lambda x: func(x, *args[1:], **kwargs), args[0], kind=kind)
            return True, self._elementwise(result, args[0]) if func in _ELEMENTWISE else result
        if func in _POW or func in _RSQRT or func in _NEG:  # element-wise functions of one activation
            exponent = kwargs.get("exponent", args[1] if len(args) > 1 else None)
            if func in _POW and not (isinstance(exponent, (int, float)) and _graph(args[0])):
                return False, None
            result = pass_through(lambda x: func(x, *args[1:], **kwargs), args[0],
                                  kind="linear" if func in _NEG else "nonlinear")
            return True, self._elementwise(result, args[0], linear=func in _NEG)
        if func in _SOFTMAX:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            last = dim in (-1, args[0].dim() - 1)
            probabilities = pass_through(lambda x: func(x, *args[1:], **kwargs), args[0],
                                         kind="softmax" if last else "nonlinear")
            if probabilities.dim() == 4 and dim in (-1, 3):
                self.attention.append(probabilities)
            return True, probabilities
        if func in _MATMUL:
            u, v = args[0], kwargs.get("other", args[1] if len(args) > 1 else None)
            if _graph(u) and _graph(v):
                return True, MatMulRule.apply(u, v, self.rule_set.halve_products)
            return False, None  # a product with a constant matrix: no rule (refused after the call)
        if func in _ADD:
            if kwargs.get("alpha", 1) != 1 or len(args) > 2:
                return False, None
            u, v = args[0], kwargs.get("other", args[1] if len(args) > 1 else None)
            if not isinstance(v, Tensor):  # + a Python number: a shift, relevance passes
                return True, self._elementwise(pass_through(lambda x: torch.add(x, v), u, kind="linear"), u)
            if not isinstance(u, Tensor):
                return True, self._elementwise(pass_through(lambda x: torch.add(x, u), v, kind="linear"), v)
            if not _graph(u):
                u, v = v, u
            if not _graph(v):
                return True, self._elementwise(AddRule.apply(u, v, self.rule_set.normalise_sums), u)
            if self._origin(self._root, u) is self._origin(self._root, v):
                # two linear images of one activation (rotary embeddings): that map's z-rule
                return True, self._elementwise(AddRule.apply(u, v, False), u, linear=True)
            result = AddRule.apply(u, v, self.rule_set.normalise_sums)
            return True, self._elementwise(result, u) if self._same_source(u, v) else result
        if func in _SCALE:
            x, c = args[0], kwargs.get("other", args[1] if len(args) > 1 else None)
            compute = _OUT_OF_PLACE.get(func, func)  # in place, the rule's forward would edit its own input
            options = {k: v for k, v in kwargs.items() if k != "other"}
            if _graph(x) and not _graph(c):
                return True, self._elementwise(pass_through(lambda t: compute(t, c, **options), x, kind="linear"), x,
                                               linear=True)
            if compute is torch.mul and _graph(c) and not _graph(x):
                return True, self._elementwise(pass_through(lambda t: torch.mul(x, t), c, kind="linear"), c,
                                               linear=True)
            if options or not (_graph(x) and _graph(c)):
                return False, None
            source = self._origin(self._source, x)
            if self._same_source(x, c) and torch.broadcast_shapes(x.shape, c.shape) == source.shape:
                # one activation or normalisation written out (gelu_new, RMSNorm): relevance passes
                return True, self._elementwise(SameSourceProduct.apply(x, c, source, compute is torch.div), source)
            if compute is torch.mul:  # a gated MLP's act(gate) * up: the product rule
                return True, ProductRule.apply(x, c, self.rule_set.halve_products)
            return False, None  # a division by another activation: no rule
        if func in _MEAN:
            x = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
            if "dtype" in kwargs:
                return False, None
            dims = dims_of(dim, x.dim())
            result = MeanRule.apply(x, dims, bool(keepdim))
            if keepdim and tuple(d % x.dim() for d in dims) == (x.dim() - 1,):
                self._source[id(result)] = (result, self._origin(self._source, x))  # a row statistic
            return True, result
        return False, None

    def _same_source(self, u: Tensor, v: Tensor) -> bool:
        return self._origin(self._source, u) is self._origin(self._source, v)

    def _conv2d(self, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if isinstance(padding, str):
            if padding != "valid":
                self.unsupported.append(f"conv2d(padding={padding!r})")
                return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
            padding = 0
        # the call's image is a leaf of the graph (activations are not): the pixel layer
        pixels = _graph(input) and input.is_leaf
        return conv_rule(self.rule_set, pixels).apply(self._widen(input), weight, bias, stride, padding, dilation,
                                                      groups)

    def _attention(self, query: Tensor, key: Tensor, value: Tensor, bias: Optional[Tensor], scale: float) -> Tensor:
        """softmax(q·kᵀ·scale + bias)·v with the matmul rule on both products; the map is recorded.
        The mask bias is a constant added to the scores: relevance passes it unchanged."""
        scores = MatMulRule.apply(query, key.transpose(-2, -1), self.rule_set.halve_products)
        logits = pass_through(lambda s: s * scale if bias is None else s * scale + bias, scores, kind="linear")
        probabilities = pass_through(lambda s: torch.softmax(s, dim=-1), logits, kind="softmax")
        self.attention.append(probabilities)
        return MatMulRule.apply(probabilities, value, self.rule_set.halve_products)

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p > 0:
            raise training_error("scaled_dot_product_attention")
        query, key, value, attn_mask = (self._widen(t) for t in (query, key, value, attn_mask))
        repeats = group_size(query, key, enable_gqa)
        bias = attention_bias(attn_mask, is_causal, query.shape[-2], key.shape[-2], query.dtype, query.device)
        return self._attention(query, expand_groups(key, repeats), expand_groups(value, repeats), bias,
                               sdpa_scale(query, scale))

    def _multi_head(self, args: Tuple, kwargs: Dict[str, Any]):
        """Self-attention of ``nn.MultiheadAttention`` (packed in-projection, no extra masks or
        biases: what torchvision's ViT uses), written out with the rules."""
        call = _MHA_SIGNATURE.bind(*args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        if a["training"] and a["dropout_p"] > 0:
            raise training_error("nn.MultiheadAttention")
        query = a["query"]
        extras = [name for name in ("bias_k", "bias_v", "key_padding_mask", "attn_mask", "static_k", "static_v")
                  if a[name] is not None] + [name for name in ("add_zero_attn", "use_separate_proj_weight", "is_causal")
                                             if a[name]]
        if extras or query.dim() != 3 or not (a["key"] is query and a["value"] is query):
            self.unsupported.append("multi_head_attention_forward(" + (", ".join(extras) or "cross-attention") + ")")
            return F.multi_head_attention_forward(*args, **kwargs)
        length, batch, width = query.shape
        heads = a["num_heads"]
        linear = linear_rule(self.rule_set)
        q, k, v = linear.apply(self._widen(query), a["in_proj_weight"], a["in_proj_bias"]).chunk(3, dim=-1)

        def split(t):  # (L, B, E) -> (B, H, L, d)
            return t.reshape(length, batch, heads, width // heads).permute(1, 2, 0, 3)

        out = self._attention(split(q), split(k), split(v), None, (width // heads) ** -0.5)
        out = linear.apply(out.permute(2, 0, 1, 3).reshape(length, batch, width), a["out_proj_weight"],
                               a["out_proj_bias"])
        if not a["need_weights"]:
            return out, None
        weights = self.attention[-1].detach()
        return out, weights.mean(dim=1) if a["average_attn_weights"] else weights


def _graph_tree(value: Any) -> bool:
    return any(_graph(t) for t in _tensors([value]))


def _tensors(values) -> List[Tensor]:
    """The tensors in ``values``, one level of lists and tuples opened (``torch.cat``'s)."""
    found = []
    for value in values:
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, Tensor))
    return found


def _op_name(func) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    qualname = getattr(func, "__qualname__", "")
    if qualname.startswith(("TensorBase.", "Tensor.")):
        return "Tensor." + name
    module = getattr(func, "__module__", None) or ""
    return ("torch.nn.functional." if module.startswith("torch.nn.functional") else "torch.") + name


def _in_place(func) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or name == "__setitem__"


def _mixes_half(args: Tuple, kwargs: Dict[str, Any]) -> bool:
    tensors = [v for v in list(args) + list(kwargs.values()) if isinstance(v, Tensor)]
    return (any(t.dtype in HALF for t in tensors)
            and any(_graph(t) and t.dtype.is_floating_point and t.dtype not in HALF for t in tensors))


def _params(args: Tuple, kwargs: Dict[str, Any], names: Tuple[str, ...]) -> List[Any]:
    values = list(args) + [None] * (len(names) - len(args))
    for i, name in enumerate(names):
        if name in kwargs:
            values[i] = kwargs[name]
    return values


def _dropout_active(func, args: Tuple, kwargs: Dict[str, Any]) -> bool:
    names = ("input", "p", "training", "inplace") if func is F.dropout else ("input", "p", "train")
    values = _params(args, kwargs, names)
    p = values[1] if values[1] is not None else 0.5
    training = values[2] if values[2] is not None else func is F.dropout
    return bool(training) and p > 0
