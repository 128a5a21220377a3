"""AttnLRP (Achtibat et al., ICML 2024) on unmodified models, as gradient modifications: the
model's forward runs once under :class:`AttnLrpCapture` (a ``TorchFunctionMode`` of this thread,
for this forward only), which computes every value exactly as the model does but gives some
ops another backward; one ordinary backward of the explained logit then yields, at the input
embeddings ``x``, a gradient whose product ``x ⊙ ∇x`` is the AttnLRP relevance.

The rules, each as the backward it needs (relevance is implicit: ``R = input ⊙ modified gradient``):

- linear layers, convolutions, sums, means, data moves, rotary embeddings (products with
  constants): their own gradient, i.e. the epsilon rule (ε → 0) written as gradient × input. A
  constant operand (a bias, a position table, a mask) takes its share of the relevance with it.
- LayerNorm / RMSNorm: the identity rule of the normalisation: the standard deviation (rms) is
  held constant in the backward, which then treats the layer as linear (mean removal and the
  scale by ``weight`` kept). Hand-written RMSNorm (HF Llama, Qwen2, Mistral): the square root of
  an activation (``rsqrt``, ``sqrt``) is taken as a normaliser and held constant.
- element-wise non-linearities (GELU in any form, tanh-GELU written out as HF's ``gelu_new``,
  SiLU, ReLU, tanh, sigmoid, ...): the identity rule, ``∇x = ∇y ⊙ f(x)/x`` (0 where ``x = 0``), so
  ``x ⊙ ∇x = f(x) ⊙ ∇y``: relevance passes unchanged. A chain of element-wise ops on one tensor
  (``0.5·x·(1 + tanh(c·(x + 0.044715·x³)))``) is one such ``f``: it is computed without a graph and
  joined to it through one identity node where a non-element-wise op first reads it.
- a product of two activations (a gated MLP's ``act(gate) · up``, the eager attention's ``q·kᵀ``
  and ``A·V``): the uniform rule, each factor's gradient halved.
- softmax: its own gradient (AttnLRP's softmax rule ``R_i = x_i (R_i^out − s_i Σ_j R_j^out)`` is
  exactly gradient × input at the logits).
- ``scaled_dot_product_attention`` stays the fused kernel, forward and backward; the two products
  inside it are uniform rules, so the gradient reaching ``q`` and ``k`` is divided by 4 (½ from
  ``A·V`` times ½ from ``q·kᵀ``) and the one reaching ``v`` by 2.

Not conserved (relevance that leaves with a term that is no input): every additive constant
(linear and LayerNorm biases, position and token-type embeddings, a ViT's class token and
position embeddings, finite attention biases) and the softmax's own bias term: at each attention
row, ``Σ_j s_j g_j (1 − x_j + Σ_i s_i x_i)`` with ``g = ∇A``, ``x`` the logits (AttnLRP Prop. 3.1).
Without those, the relevance at the input embeddings sums to the explained logit.

Where relevance is read: text, the lookups of the input-embedding matrix; images, the
patch-embedding convolution's output (per patch; prefix tokens, being parameters, get 0).

An op with activations in and out and no rule here (and that is not a pure data move or a linear
op) is refused by name: its gradient is no relevance rule.
"""
import inspect
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .capture.mode import _bind_sdpa, detached_parameters, training_error
from .families import Family, ModelCall
from .lrp.mode import _DATA_MOVES, _op_name

__all__ = ["AttnLrpCapture", "AttnLrpPass", "SUPPORTED", "check_family"]

T = torch.Tensor

# ---- what the mode recognises ----

_MUL = {torch.mul, T.mul, T.__mul__, T.__rmul__, torch.multiply, T.multiply}
_DIV = {torch.div, T.div, T.__truediv__, torch.true_divide, T.true_divide, torch.divide, T.divide}
_RDIV = {T.__rtruediv__}
_ADD = {torch.add, T.add, T.__add__, T.__radd__}
_SUB = {torch.sub, T.sub, T.__sub__, torch.subtract, T.subtract}
_RSUB = {T.__rsub__, torch.rsub}
_NEG = {torch.neg, T.neg, T.__neg__, torch.negative, T.negative}
_IN_PLACE = {T.__iadd__: torch.add, T.__isub__: torch.sub, T.__imul__: torch.mul, T.__itruediv__: torch.div}
_AFFINE = _MUL | _DIV | _ADD | _SUB | _RSUB | _NEG  # linear in each activation operand (with constants)
_NONLINEAR = {  # element-wise non-linear functions of their (one) activation operand
    torch.tanh, T.tanh, F.tanh, torch.sigmoid, T.sigmoid, F.sigmoid, torch.erf, T.erf, torch.special.erf,
    torch.exp, T.exp, F.gelu, F.silu, F.relu, torch.relu, T.relu, F.mish, F.softplus, F.elu, F.leaky_relu, F.relu6,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.logsigmoid, F.selu, F.celu, torch.pow, T.pow, T.__pow__, T.__rpow__,
    torch.square, T.square, torch.abs, T.abs, torch.clamp, T.clamp, torch.clip, T.clip, torch.reciprocal,
    T.reciprocal, torch.log, T.log, torch.special.expit,
} | _RDIV
_POINTWISE = _AFFINE | _NONLINEAR
_NORMALISER = {torch.rsqrt, T.rsqrt, torch.sqrt, T.sqrt}
_SOFTMAX = {torch.softmax, F.softmax, T.softmax, torch.special.softmax}
_MATMUL = {torch.matmul, T.matmul, T.__matmul__, T.__rmatmul__, torch.bmm, T.bmm}
_LINEAR = {F.linear, torch.addmm, T.addmm, F.conv2d, torch.conv2d, torch.mean, T.mean, torch.sum, T.sum,
           F.dropout, torch.dropout, torch.where, F.pad, F.embedding}
_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


# ---- the rules, as autograd functions whose forward is the op's own value ----

class _GradScale(torch.autograd.Function):
    """``x`` unchanged; its gradient times ``factor`` (the uniform rule's share of a product)."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def scaled(x: Tensor, factor: float) -> Tensor:
    return _GradScale.apply(x, factor) if isinstance(x, Tensor) and x.requires_grad else x


class _IdentityRule(torch.autograd.Function):
    """``y = f(x)`` given as its value: the gradient ``∇y ⊙ y/x`` (0 where ``x = 0``)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor):
        xd = x.detach()
        ratio = torch.where(xd == 0, torch.zeros((), dtype=y.dtype, device=y.device), y / xd)
        ctx.save_for_backward(ratio)
        ctx.like = (x.shape, x.dtype)
        return y.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (ratio,) = ctx.saved_tensors
        shape, dtype = ctx.like
        g = grad * ratio
        if g.shape != shape:
            g = g.sum_to_size(shape)
        return g.to(dtype), None


class _LayerNormRule(torch.autograd.Function):
    """``F.layer_norm`` with the standard deviation held constant in the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, shape, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
        dims = tuple(range(-len(shape), 0))
        std = torch.sqrt(x.var(dim=dims, unbiased=False, keepdim=True) + eps)
        ctx.save_for_backward(std, weight)
        ctx.dims = dims
        return F.layer_norm(x, shape, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad: Tensor):
        std, weight = ctx.saved_tensors
        g = grad * weight if weight is not None else grad
        return (g - g.mean(dim=ctx.dims, keepdim=True)) / std, None, None, None, None


class _RmsNormRule(torch.autograd.Function):
    """``F.rms_norm`` with the root mean square held constant in the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, shape, weight: Optional[Tensor], eps: Optional[float]):
        dims = tuple(range(-len(shape), 0))
        eps_value = torch.finfo(x.dtype).eps if eps is None else eps
        rms = torch.sqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps_value)
        ctx.save_for_backward(rms, weight)
        return F.rms_norm(x, shape, weight, eps)

    @staticmethod
    def backward(ctx, grad: Tensor):
        rms, weight = ctx.saved_tensors
        g = grad * weight if weight is not None else grad
        return g / rms, None, None, None


# ---- the mode ----

class _Entry:
    """A tensor that is an element-wise function of one activation ``root``. ``nonlinear``: its
    value was computed without a graph and joins it through the identity rule (``seal``);
    otherwise it is an affine function of ``root`` computed in the graph as usual."""

    __slots__ = ("ref", "root", "nonlinear", "sealed")

    def __init__(self, ref: "weakref.ref", root: Tensor, nonlinear: bool):
        self.ref, self.root, self.nonlinear, self.sealed = ref, root, nonlinear, None


def _forget(table: Dict[int, _Entry], key: int):
    return lambda _ref: table.pop(key, None)


class AttnLrpCapture(TorchFunctionMode):
    """One AttnLRP forward.

    Args:
        embedding_weight: the model's input-embedding matrix (text): its lookups are where
            relevance is read. None for images.
        pixels: the float input leaf (images): the convolution reading it is the patch embedding.

    Attributes:
        inputs: the tensors relevance is read at (graph tensors), in order.
        sites: (B, H, N_q, N_k) of each attention site seen, in order.
        unsupported: names of ops on activations that have no rule.
    """

    def __init__(self, embedding_weight: Optional[Tensor] = None, pixels: Optional[Tensor] = None):
        super().__init__()
        self.embedding_weight, self.pixels = embedding_weight, pixels
        self.inputs: List[Tensor] = []
        self.sites: List[Tuple[int, int, int, int]] = []
        self.unsupported: List[str] = []
        self._entries: Dict[int, _Entry] = {}

    def close(self) -> None:
        """Forget the element-wise bookkeeping (its references to activations)."""
        self._entries.clear()
        self.embedding_weight = self.pixels = None

    # -- bookkeeping of element-wise chains --

    def _entry(self, value: Any) -> Optional[_Entry]:
        if not isinstance(value, Tensor):
            return None
        entry = self._entries.get(id(value))
        return entry if entry is not None and entry.ref() is value else None

    def _track(self, tensor: Tensor, root: Tensor, nonlinear: bool) -> Tensor:
        key = id(tensor)  # the entry leaves the table when its tensor dies (and all at close())
        self._entries[key] = _Entry(weakref.ref(tensor, _forget(self._entries, key)), root, nonlinear)
        return tensor

    def _seal(self, value: Any) -> Any:
        """A value as a graph tensor: a non-linear chain joins the graph through the identity rule."""
        if isinstance(value, (list, tuple)):
            return type(value)(self._seal(v) for v in value)
        entry = self._entry(value)
        if entry is None or not entry.nonlinear:
            return value
        if entry.sealed is None:
            entry.sealed = _IdentityRule.apply(entry.root, value)
        return entry.sealed

    def _root(self, value: Any) -> Optional[Tensor]:
        entry = self._entry(value)
        if entry is not None:
            return entry.root
        return value if isinstance(value, Tensor) and value.requires_grad else None

    # -- dispatch --

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__get__":  # .shape, .dtype, .T, ...: metadata and views
            result = func(*args, **kwargs)
            if isinstance(result, Tensor) and self._entry(args[0]) is not None and self._entry(args[0]).nonlinear:
                result = func(self._seal(args[0]))
            return result
        if func is F.embedding:
            return self._embedding(args, kwargs)
        args, kwargs = detached_parameters(args, kwargs)
        if func is F.scaled_dot_product_attention:
            return self._sdpa(**{k: self._seal(v) for k, v in _bind_sdpa(args, kwargs).items()})
        if func is F.multi_head_attention_forward:
            return self._multi_head(args, kwargs)
        if func in _IN_PLACE and self._involved(args, kwargs):
            func = _IN_PLACE[func]  # `a += b` rebinds a to the result: out of place is the same
        if func in _POINTWISE and self._involved(args, kwargs):
            return self._pointwise(func, args, kwargs)
        args, kwargs = self._seal(args), {k: self._seal(v) for k, v in kwargs.items()}
        if not self._graph(args, kwargs):
            return func(*args, **kwargs)
        if func in _NORMALISER:  # the normaliser of a hand-written norm: a constant
            with torch.no_grad():
                return func(*(a.detach() if isinstance(a, Tensor) else a for a in args), **kwargs)
        if func is F.layer_norm:
            return self._layer_norm(*args, **kwargs)
        if func is F.rms_norm:
            return self._rms_norm(*args, **kwargs)
        if func in _MATMUL:
            u, v = args[0], kwargs.get("other", args[1] if len(args) > 1 else None)
            if _requires_grad(u) and _requires_grad(v):  # the uniform rule
                rest = {k: w for k, w in kwargs.items() if k != "other"}
                return func(scaled(u, 0.5), scaled(v, 0.5), *args[2:], **rest)
            return func(*args, **kwargs)
        if func in (F.dropout, torch.dropout) and _dropout_active(func, args, kwargs):
            raise training_error("dropout")
        result = func(*args, **kwargs)
        if func in _SOFTMAX:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if isinstance(result, Tensor) and result.dim() == 4 and dim in (-1, 3):
                self.sites.append(tuple(result.shape))  # eager attention: gradient × input is its rule
            else:
                self.unsupported.append(_op_name(func) + " (not over the keys of a (B, H, N, N) attention)")
        elif func is F.conv2d or func is torch.conv2d:
            if self.pixels is not None and (args[0] if args else kwargs.get("input")) is self.pixels:
                self.inputs.append(result)
        elif func not in _DATA_MOVES and func not in _LINEAR and _any_graph_result(result):
            self.unsupported.append(_op_name(func) + (" (in place)" if _in_place(func) else ""))
        return result

    def _involved(self, args: Tuple, kwargs: Dict[str, Any]) -> bool:
        return any(self._root(a) is not None for a in list(args) + list(kwargs.values()))

    def _graph(self, args: Tuple, kwargs: Dict[str, Any]) -> bool:
        values = list(args) + list(kwargs.values())
        return any(_requires_grad(v) or (isinstance(v, (list, tuple)) and any(_requires_grad(w) for w in v))
                   for v in values)

    def _embedding(self, args: Tuple, kwargs: Dict[str, Any]):
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        args, kwargs = detached_parameters(args, kwargs)
        result = F.embedding(*args, **kwargs)
        if self.embedding_weight is not None and weight is self.embedding_weight and result.is_floating_point():
            result.requires_grad_()  # the graph's leaf: relevance is read here
            self.inputs.append(result)
        return result

    def _pointwise(self, func, args: Tuple, kwargs: Dict[str, Any]):
        operands = list(args) + list(kwargs.values())
        roots = [self._root(a) for a in operands]
        graph_roots = [r for r in roots if r is not None]
        same = all(r is graph_roots[0] for r in graph_roots)
        if same:
            root = graph_roots[0]
            entries = [self._entry(a) for a in operands]
            nonlinear = (func in _NONLINEAR or any(e is not None and e.nonlinear for e in entries)
                         or len(graph_roots) > 1 and func in (_MUL | _DIV)
                         or func in _DIV and len(operands) > 1 and self._root(operands[1]) is not None)
            if nonlinear:  # f(root) as a value; the identity rule joins it to the graph where it is read
                with torch.no_grad():
                    result = func(*(_value(a) for a in args), **{k: _value(v) for k, v in kwargs.items()})
                return self._track(result, root, True) if isinstance(result, Tensor) else result
            result = func(*args, **kwargs)
            return self._track(result, root, False) if isinstance(result, Tensor) else result
        # operands from different activations
        args, kwargs = self._seal(args), {k: self._seal(v) for k, v in kwargs.items()}
        graph = [a for a in list(args) + list(kwargs.values()) if _requires_grad(a)]
        if func in _MUL and len(graph) == 2:  # a product of two activations: the uniform rule
            args = tuple(scaled(a, 0.5) for a in args)
            kwargs = {k: scaled(v, 0.5) for k, v in kwargs.items()}
            return func(*args, **kwargs)
        if func in (_ADD | _SUB | _RSUB):
            return func(*args, **kwargs)
        self.unsupported.append(_op_name(func) + " (of two different activations)")
        return func(*args, **kwargs)

    def _layer_norm(self, input, normalized_shape, weight=None, bias=None, eps=1e-5):
        return _LayerNormRule.apply(input, tuple(normalized_shape), weight, bias, eps)

    def _rms_norm(self, input, normalized_shape, weight=None, eps=None):
        return _RmsNormRule.apply(input, tuple(normalized_shape), weight, eps)

    def _sdpa(self, query, key, value, **options):
        if options.get("dropout_p", 0.0) > 0:
            raise training_error("scaled_dot_product_attention")
        self.sites.append(_site_shape(query, key))
        # the fused kernel, forward and backward; A·V and q·kᵀ are uniform rules: ½ · ½ for q and k, ½ for v
        return F.scaled_dot_product_attention(scaled(query, 0.25), scaled(key, 0.25), scaled(value, 0.5), **options)

    def _multi_head(self, args: Tuple, kwargs: Dict[str, Any]):
        """Self-attention of ``nn.MultiheadAttention`` (packed in-projection, no extra masks or
        biases: torchvision's ViT), written out with SDPA and the rules."""
        call = _MHA_SIGNATURE.bind(*args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        if a["training"] and a["dropout_p"] > 0:
            raise training_error("nn.MultiheadAttention")
        query = self._seal(a["query"])
        extras = [name for name in ("bias_k", "bias_v", "key_padding_mask", "attn_mask", "static_k", "static_v")
                  if a[name] is not None] + [name for name in ("add_zero_attn", "use_separate_proj_weight", "is_causal")
                                             if a[name]]
        if extras or query.dim() != 3 or not (a["key"] is a["query"] and a["value"] is a["query"]):
            self.unsupported.append("multi_head_attention_forward(" + (", ".join(extras) or "cross-attention") + ")")
            return F.multi_head_attention_forward(*args, **kwargs)
        length, batch, width = query.shape
        heads = a["num_heads"]
        # projected batch-first and contiguous: F.linear on the (L, B, E) view torchvision hands over
        # runs as L small GEMMs (a third of a ViT-B/16 call), on (B·L, E) as one
        tokens = query.transpose(0, 1).contiguous()
        q, k, v = F.linear(tokens, a["in_proj_weight"], a["in_proj_bias"]).chunk(3, dim=-1)

        def split(t):  # (B, L, E) -> (B, H, L, d)
            return t.reshape(batch, length, heads, width // heads).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        out = self._sdpa(q, k, v)
        out = F.linear(out.transpose(1, 2).reshape(batch, length, width), a["out_proj_weight"], a["out_proj_bias"])
        out = out.transpose(0, 1)  # (L, B, E), as nn.MultiheadAttention returns it
        if not a["need_weights"]:
            return out, None
        with torch.no_grad():
            weights = torch.softmax(q @ k.transpose(-2, -1) * (width // heads) ** -0.5, dim=-1)
        return out, weights.mean(dim=1) if a["average_attn_weights"] else weights


def _value(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


def _requires_grad(value: Any) -> bool:
    return isinstance(value, Tensor) and value.requires_grad


def _any_graph_result(result: Any) -> bool:
    if isinstance(result, (list, tuple)):
        return any(_requires_grad(r) for r in result)
    return _requires_grad(result)


def _site_shape(query: Tensor, key: Tensor) -> Tuple[int, int, int, int]:
    heads = query.shape[-3] if query.dim() >= 4 else 1
    return (query.shape[0], heads, query.shape[-2], key.shape[-2])


def _in_place(func) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or name == "__setitem__"


def _dropout_active(func, args: Tuple, kwargs: Dict[str, Any]) -> bool:
    names = ("input", "p", "training", "inplace") if func is F.dropout else ("input", "p", "train")
    values = list(args) + [None] * (len(names) - len(args))
    for i, name in enumerate(names):
        if name in kwargs:
            values[i] = kwargs[name]
    p = values[1] if values[1] is not None else 0.5
    training = values[2] if values[2] is not None else func is F.dropout
    return bool(training) and p > 0


# ---- the pass of one call ----

def _supported_families():
    from .families.hf_bert import HFBertFamily
    from .families.hf_causal_lm import HFCausalLM
    from .families.hf_vit import HFVisionTransformer
    from .families.timm_vit import TimmVisionTransformer
    from .families.torchvision_vit import TorchvisionVisionTransformer

    return (HFCausalLM, HFBertFamily, HFVisionTransformer, TimmVisionTransformer, TorchvisionVisionTransformer)


SUPPORTED = ("HuggingFace causal LMs (GPT-2, Llama, Qwen2, Mistral), BERT-family classifiers, ViT/DeiT; timm and "
             "torchvision ViTs")


def check_family(family: Family) -> None:
    """Refuse a model family the AttnLRP rules are not written and tested for."""
    if type(family) not in _supported_families():
        raise ValueError(f"relfast.Explainer: method 'attnlrp' has no rules yet for {type(family.model).__name__} "
                         f"(supported: {SUPPORTED}); use 'generic'")


class AttnLrpPass:
    """The AttnLRP forward of one call (run once, on first use) and its backward per target. Takes
    the place of :class:`relfast.explain.lrp.RelevancePass` for method ``attnlrp``.

    Args:
        family, call: the call's model and parsed inputs (with their graph leaves).
    """

    def __init__(self, family: Family, call: ModelCall):
        check_family(family)
        self.family, self.call = family, call
        self._capture: Optional[AttnLrpCapture] = None
        self._output: Any = None
        self._scores: Optional[Tensor] = None

    def _pixels(self) -> Optional[Tensor]:
        floats = [v for v in list(self.call.args) + list(self.call.kwargs.values())
                  if isinstance(v, Tensor) and v.requires_grad]
        return floats[0] if floats else None

    def forward(self) -> Tuple[Any, List[Tensor]]:
        """Runs the forward once: (the model's output, one shape-only (B, H, N_q, N_k) tensor per
        attention site seen, for the session's checks; no map is formed)."""
        if self._capture is None:
            model = self.family.model
            pixels = self._pixels()
            embeddings = model.get_input_embeddings() if pixels is None and hasattr(model, "get_input_embeddings") else None
            capture = AttnLrpCapture(getattr(embeddings, "weight", None), pixels)
            try:
                with torch.enable_grad(), capture:
                    output = self.family.forward(self.call)
            finally:
                capture.close()
            name = type(model).__name__
            if capture.unsupported:
                names = sorted(set(capture.unsupported))
                raise ValueError(f"relfast.Explainer: the {name} model applies {', '.join(names)} to its activations, "
                                 "for which relfast has no AttnLRP rule; use method 'generic'")
            if len(capture.inputs) != 1:
                what = "patch embedding (a convolution of the pixels)" if pixels is not None else \
                    "lookup of its input embeddings"
                raise ValueError(f"relfast.Explainer: method 'attnlrp' found {len(capture.inputs)} {what} in the "
                                 f"{name} model's forward; it reads relevance at exactly one")
            self._capture, self._output = capture, output
        device = self._capture.inputs[0].device
        zero = torch.zeros((), device=device)
        return self._output, [zero.expand(*shape) for shape in self._capture.sites]

    @property
    def scores(self) -> Tensor:
        if self._scores is None:
            output, _ = self.forward()
            self._scores = self.family.scores(output, self.call)
        return self._scores

    def input_relevance(self, scalar: Tensor, token_mask: Optional[Tensor], prefix_tokens: int,
                        retain_graph: bool = False) -> Tensor:
        """(B, N) AttnLRP relevance of the tokens for ``scalar`` (the explained values summed over
        the batch): ``x ⊙ ∇x`` summed over the width; images: per patch, prefix tokens 0."""
        leaf = self._capture.inputs[0]
        (grad,) = torch.autograd.grad(scalar, leaf, retain_graph=retain_graph, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(leaf)
        relevance = leaf.detach() * grad
        if leaf.dim() == 4:  # patch embedding (B, D, h, w) -> (B, h·w), prefix tokens first
            per_patch = relevance.sum(dim=1).flatten(1)
            prefix = per_patch.new_zeros(per_patch.shape[0], prefix_tokens)
            return torch.cat([prefix, per_patch], dim=1)
        relevance = relevance.sum(dim=-1)
        if token_mask is not None:
            relevance = relevance * token_mask.to(relevance.device, relevance.dtype)
        return relevance
