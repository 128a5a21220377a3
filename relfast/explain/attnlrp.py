"""AttnLRP (Achtibat et al., ICML 2024) on unmodified models, as gradient modifications: the
model's forward runs once under :class:`AttnLrpCapture` (a ``TorchFunctionMode`` of this thread,
for this forward only), which computes every value exactly as the model does but gives some
ops another backward; one ordinary backward of the explained logit then yields, at the input
embeddings ``x``, a gradient whose product ``x ⊙ ∇x`` is the AttnLRP relevance.

The rules, each as the backward it needs (relevance is implicit: ``R = input ⊙ modified gradient``):

- linear layers, convolutions, sums, means, data moves, rotary embeddings and CLIP's logit scale
  (products with constants): their own gradient, i.e. the epsilon rule (ε → 0) written as
  gradient × input. A constant operand (a bias, a position table, a mask) takes its share of the relevance with it.
- LayerNorm / RMSNorm: the identity rule of the normalisation: the standard deviation (rms) is
  held constant in the backward, which then treats the layer as linear (mean removal and the
  scale by ``weight`` kept). Hand-written RMSNorm (HF Llama, Qwen2, Mistral): the square root of
  an activation (``rsqrt``, ``sqrt``, ``x ** ±0.5``) is taken as a normaliser and held constant
  (the statistic under it, ``mean(x²)``, then never joins the graph).
- L2 normalisation (CLIP's cosine similarity ``img / ‖img‖``, written by HF as
  ``sum(x ** 2) ** 0.5``; ``Tensor.norm``, ``torch.linalg.vector_norm``, ``F.normalize``): the same
  identity rule, the norm held constant: the division is then a product with a constant.
- element-wise non-linearities (GELU in any form, tanh-GELU written out as HF's ``gelu_new``,
  CLIP's QuickGELU ``x·σ(1.702x)``, SiLU, ReLU, tanh, sigmoid, ...): the identity rule,
  ``∇x = ∇y ⊙ f(x)/x`` (0 where ``x = 0``), so ``x ⊙ ∇x = f(x) ⊙ ∇y``: relevance passes unchanged. A chain of element-wise ops on one tensor
  (``0.5·x·(1 + tanh(c·(x + 0.044715·x³)))``) is one such ``f``: it is computed without a graph and
  joined to it through one identity node where a non-element-wise op first reads it.
- a product of two activations (a gated MLP's ``act(gate) · up``, the eager attention's ``q·kᵀ``
  and ``A·V``; CLIP's similarity ``⟨img, txt⟩`` of its two towers' normalised embeddings): the
  uniform rule, each factor's gradient halved. CLIP's image and text maps so each sum to half the
  pair's logit (together: the logit).
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
patch-embedding convolution's output (per patch; prefix tokens, being parameters, get 0); a module
given token embeddings (a float (B, N, D) input), that input (per token). CLIP: the image tower's
patch embedding and the text tower's lookups, both from the one backward of the pair's logit. The
causal mask and the EOT pooling (a gather) move data; the mask is a constant.

Per-layer relevance (``layers=True``): the hidden states entering each transformer block, found in
the graph without touching the model: at each attention site, the first sum of two activations
after it of which one operand descends from the site's output and the other is an ancestor of the
site (``x + attention(norm(x))``; BERT's ``norm(dense(context) + x)``) has ``x``, the block's input.
``x ⊙ ∇x`` there, summed over the width, comes from the same backward as the input relevance (the
gradient of those graph tensors is requested with the input's). Without additive constants, block
l's relevance sums to the logit less the softmax terms of the sites from l on.

An op with activations in and out and no rule here (and that is not a pure data move or a linear
op) is refused by name: its gradient is no relevance rule.
"""
import collections
import contextlib
import contextvars
import inspect
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .capture.mode import _bind_sdpa, detached_parameters, training_error
from .capture.records import attention_probabilities, expand_groups, group_size
from .families import Family, ModelCall
from .lrp.mode import _DATA_MOVES, _op_name
from .streams import Stream

__all__ = ["AttnLrpCapture", "AttnLrpPass", "SUPPORTED", "check_family", "written_out_attention"]

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
_ROW_STATISTICS = {torch.mean, T.mean, torch.sum, T.sum}  # of a non-linear chain: deferred (see _Entry)
_NORMALISER = {torch.rsqrt, T.rsqrt, torch.sqrt, T.sqrt, torch.norm, T.norm, torch.linalg.vector_norm,
               torch.linalg.norm}
_POW = {torch.pow, T.pow, T.__pow__}  # x ** ±0.5 of an activation: a normaliser too
_MOVES = _DATA_MOVES | {T.t, torch.t}  # data moves (the LRP mode's list and what AttnLRP's families add)
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
    """``y = f(x)`` given as its value: the gradient ``∇y ⊙ y/x`` (0 where ``x = 0``). The ratio is
    formed here and kept, not ``x`` and ``y``: ``y`` is often not kept by anything else (a linear
    layer reading it keeps only its weight)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor):
        xd = x.detach()
        ratio = (y / xd).masked_fill_(xd == 0, 0)  # y ⊇ x's shape: f(x, constants)
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


class _UniformProduct(torch.autograd.Function):
    """``u * v`` of two activations: the uniform rule, each factor's gradient halved (one node
    instead of a product and two scalings)."""

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor):
        ctx.save_for_backward(u, v)
        return u * v

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, v = ctx.saved_tensors
        half = grad * 0.5
        grad_u, grad_v = half * v, half * u
        if grad_u.shape != u.shape:
            grad_u = grad_u.sum_to_size(u.shape)
        if grad_v.shape != v.shape:
            grad_v = grad_v.sum_to_size(v.shape)
        return grad_u, grad_v


class _LayerNormRule(torch.autograd.Function):
    """``F.layer_norm`` with the standard deviation held constant in the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, shape, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
        # the layer's own kernel gives 1/std with its output (no second pass over x for it)
        output, _, inverse_std = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(inverse_std, weight)
        ctx.dims, ctx.dtype = tuple(range(-len(shape), 0)), x.dtype
        return output

    @staticmethod
    def backward(ctx, grad: Tensor):
        inverse_std, weight = ctx.saved_tensors
        g = grad * weight if weight is not None else grad
        return ((g - g.mean(dim=ctx.dims, keepdim=True)) * inverse_std).to(ctx.dtype), None, None, None, None


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
    otherwise it is an affine function of ``root`` computed in the graph as usual.

    ``replay``: a value computed without a graph that is no element-wise function of an
    activation (a row statistic of a non-linear chain, such as RMSNorm's ``mean(x²)``, and what
    is computed from it element-wise): where it joins the graph, its ops are replayed on the
    joined operands; where only a normaliser reads it (held constant), it never joins. Its
    ``root`` is None: it is its own."""

    __slots__ = ("ref", "root", "nonlinear", "sealed", "replay")

    def __init__(self, ref: "weakref.ref", root: Optional[Tensor], nonlinear: bool,
                 replay: Optional[Callable[[], Tensor]] = None):
        self.ref, self.root, self.nonlinear, self.sealed, self.replay = ref, root, nonlinear, None, replay


def _forget(table: Dict[int, _Entry], key: int):
    return lambda _ref: table.pop(key, None)


class AttnLrpCapture(TorchFunctionMode):
    """One AttnLRP forward.

    Args:
        embedding_weight: the model's input-embedding matrix (text): its lookups are where
            relevance is read. None for images.
        pixels: the float input leaf (images): the convolution reading it is the patch embedding.
        layers: also find the hidden states entering each attention site's block (``residuals``).

    Attributes:
        inputs: the tensors relevance is read at (graph tensors), in order.
        kinds: "image" (a patch embedding) or "text" (a lookup) for each of ``inputs``.
        sites: (B, H, N_q, N_k) of each attention site seen, in order.
        residuals: (``layers``) per site, the hidden states entering its block (a graph tensor), or
            None where no residual sum was found after it.
        unsupported: names of ops on activations that have no rule.
    """

    def __init__(self, embedding_weight: Optional[Tensor] = None, pixels: Optional[Tensor] = None,
                 layers: bool = False):
        super().__init__()
        self.embedding_weight, self.pixels, self.layers = embedding_weight, pixels, layers
        self.inputs: List[Tensor] = []
        self.kinds: List[str] = []
        self.sites: List[Tuple[int, int, int, int]] = []
        self.residuals: List[Optional[Tensor]] = []
        self.unsupported: List[str] = []
        self._entries: Dict[int, _Entry] = {}
        self._open: List[Tuple[int, Any]] = []  # (site, its output's autograd node) awaiting their residual sum

    def close(self) -> None:
        """Forget the element-wise bookkeeping (its references to activations)."""
        self._entries.clear()
        self._open.clear()
        self.embedding_weight = self.pixels = None

    def _site(self, output: Tensor) -> None:
        """The attention site just recorded (``sites[-1]``) and its output, for ``layers``."""
        if self.layers:
            self.residuals.append(None)
            self._open.append((len(self.sites) - 1, output.grad_fn))

    def _residual_sum(self, operands: List[Tensor]) -> None:
        """``a + b`` after an open site: the block's input, if one operand comes from the site's
        output and the other goes into the site (the residual connection around it)."""
        for i, (site, node) in enumerate(self._open):
            for branch, residual in (operands, operands[::-1]):
                if _reaches(branch.grad_fn, lambda n: n is node) and _reaches(node, _node_of(residual)):
                    self.residuals[site] = residual
                    del self._open[i]
                    return

    # -- bookkeeping of element-wise chains --

    def _entry(self, value: Any) -> Optional[_Entry]:
        if not isinstance(value, Tensor):
            return None
        entry = self._entries.get(id(value))
        return entry if entry is not None and entry.ref() is value else None

    def _track(self, tensor: Tensor, root: Optional[Tensor], nonlinear: bool,
               replay: Optional[Callable[[], Tensor]] = None) -> Tensor:
        key = id(tensor)  # the entry leaves the table when its tensor dies (and all at close())
        self._entries[key] = _Entry(weakref.ref(tensor, _forget(self._entries, key)), root, nonlinear, replay)
        return tensor

    def _replay(self, func, args: Tuple, kwargs: Dict[str, Any]) -> Callable[[], Tensor]:
        return lambda: func(*self._seal(args), **{k: self._seal(v) for k, v in kwargs.items()})

    def _deferred_statistic(self, func, args: Tuple, kwargs: Dict[str, Any]) -> Optional[Tensor]:
        """``mean``/``sum`` of a value without graph (a non-linear chain): computed as a value too,
        joined to the graph only if something other than a normaliser reads it."""
        entry = self._entry(args[0]) if args else None
        if entry is None or not (entry.nonlinear or entry.replay is not None):
            return None
        with torch.no_grad():
            value = func(*(_value(a) for a in args), **{k: _value(v) for k, v in kwargs.items()})
        return self._track(value, None, True, self._replay(func, args, kwargs))

    def _seal(self, value: Any) -> Any:
        """A value as a graph tensor: a non-linear chain joins the graph through the identity rule."""
        if isinstance(value, (list, tuple)):
            return type(value)(self._seal(v) for v in value)
        entry = self._entry(value)
        if entry is None or not entry.nonlinear:
            return value
        if entry.sealed is None:
            entry.sealed = entry.replay() if entry.replay is not None else _IdentityRule.apply(entry.root, value)
        return entry.sealed

    def _root(self, value: Any) -> Optional[Tensor]:
        entry = self._entry(value)
        if entry is not None:
            return entry.root if entry.root is not None else value
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
        if func in _POW and _half_power(args, kwargs) and self._involved(args, kwargs):
            with torch.no_grad():  # the square root (or its inverse) of an activation: a normaliser, constant
                return func(*(_value(a) for a in args), **{k: _value(v) for k, v in kwargs.items()})
        if func in _NORMALISER and self._involved(args, kwargs):  # a hand-written norm's normaliser: a constant
            with torch.no_grad():
                return func(*(_value(a) for a in args), **{k: _value(v) for k, v in kwargs.items()})
        if func in _POINTWISE and self._involved(args, kwargs):
            return self._pointwise(func, args, kwargs)
        if func in _ROW_STATISTICS:
            deferred = self._deferred_statistic(func, args, kwargs)
            if deferred is not None:
                return deferred
        args, kwargs = self._seal(args), {k: self._seal(v) for k, v in kwargs.items()}
        if not self._graph(args, kwargs):
            return func(*args, **kwargs)
        if func is F.layer_norm:
            return self._layer_norm(*args, **kwargs)
        if func is F.rms_norm:
            return self._rms_norm(*args, **kwargs)
        if func is F.normalize:
            return self._normalize(*args, **kwargs)
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
                self._site(result)
            else:
                self.unsupported.append(_op_name(func) + " (not over the keys of a (B, H, N, N) attention)")
        elif func is F.conv2d or func is torch.conv2d:
            if self.pixels is not None and (args[0] if args else kwargs.get("input")) is self.pixels:
                self.inputs.append(result)
                self.kinds.append("image")
        elif func not in _MOVES and func not in _LINEAR and _any_graph_result(result):
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
            self.kinds.append("text")
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
                if not isinstance(result, Tensor):
                    return result
                if any(e is not None and e.replay is not None for e in entries):  # of a deferred statistic
                    return self._track(result, None, True, self._replay(func, args, kwargs))
                return self._track(result, root, True)
            result = func(*args, **kwargs)
            return self._track(result, root, False) if isinstance(result, Tensor) else result
        # operands from different activations
        args, kwargs = self._seal(args), {k: self._seal(v) for k, v in kwargs.items()}
        graph = [a for a in list(args) + list(kwargs.values()) if _requires_grad(a)]
        if func in _MUL and len(graph) == 2:  # a product of two activations: the uniform rule
            if len(args) == 2 and not kwargs:
                return _UniformProduct.apply(*args)
            args = tuple(scaled(a, 0.5) for a in args)
            kwargs = {k: scaled(v, 0.5) for k, v in kwargs.items()}
            return func(*args, **kwargs)
        if func in (_ADD | _SUB | _RSUB):
            result = func(*args, **kwargs)
            if self._open and func in _ADD and len(graph) == 2:
                self._residual_sum(graph)
            return result
        self.unsupported.append(_op_name(func) + " (of two different activations)")
        return func(*args, **kwargs)

    def _layer_norm(self, input, normalized_shape, weight=None, bias=None, eps=1e-5):
        return _LayerNormRule.apply(input, tuple(normalized_shape), weight, bias, eps)

    def _rms_norm(self, input, normalized_shape, weight=None, eps=None):
        return _RmsNormRule.apply(input, tuple(normalized_shape), weight, eps)

    def _normalize(self, input, p=2.0, dim=1, eps=1e-12, out=None):
        """``F.normalize``: the division by a norm held constant."""
        if out is not None:
            self.unsupported.append("torch.nn.functional.normalize (out=)")
        with torch.no_grad():
            norm = torch.linalg.vector_norm(input, p, dim, keepdim=True).clamp_min(eps)
        return input / norm

    def _sdpa(self, query, key, value, **options):
        if options.get("dropout_p", 0.0) > 0:
            raise training_error("scaled_dot_product_attention")
        self.sites.append(_site_shape(query, key))
        if _WRITTEN_OUT.get():  # relfast.export: the same values and gradients as plain ops
            out = _written_out_sdpa(query, key, value, **options)
        else:  # the fused kernel, forward and backward; A·V and q·kᵀ are uniform rules: ½ · ½ for q and k, ½ for v
            out = F.scaled_dot_product_attention(scaled(query, 0.25), scaled(key, 0.25), scaled(value, 0.5), **options)
        self._site(out)
        return out

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


def _half_power(args: Tuple, kwargs: Dict[str, Any]) -> bool:
    """``pow(x, e)`` with e = ±0.5 (a square root, or its inverse)."""
    exponent = kwargs.get("exponent", args[1] if len(args) > 1 else None)
    return isinstance(exponent, (int, float)) and not isinstance(exponent, bool) and abs(exponent) == 0.5


def _node_of(tensor: Tensor):
    """A test for the autograd node that produces ``tensor`` (a leaf: its AccumulateGrad)."""
    node = tensor.grad_fn
    if node is not None:
        return lambda n: n is node
    return lambda n: getattr(n, "variable", None) is tensor


def _reaches(start, found, limit: int = 4096) -> bool:
    """Whether going back through the autograd graph from node ``start`` meets a node for which
    ``found`` holds (breadth first, at most ``limit`` nodes)."""
    if start is None:
        return False
    seen = {id(start): start}  # the nodes are kept alive while their ids are in use
    queue = collections.deque([start])
    while queue:
        node = queue.popleft()
        if found(node):
            return True
        for parent, _ in node.next_functions:
            if parent is not None and id(parent) not in seen and len(seen) < limit:
                seen[id(parent)] = parent
                queue.append(parent)
    return False


def _any_graph_result(result: Any) -> bool:
    if isinstance(result, (list, tuple)):
        return any(_requires_grad(r) for r in result)
    return _requires_grad(result)


def _site_shape(query: Tensor, key: Tensor) -> Tuple[int, int, int, int]:
    heads = query.shape[-3] if query.dim() >= 4 else 1
    return (query.shape[0], heads, query.shape[-2], key.shape[-2])


# Set while relfast.export traces a call (``written_out_attention``); per thread and context.
_WRITTEN_OUT = contextvars.ContextVar("relfast_attnlrp_written_out_attention", default=False)


@contextlib.contextmanager
def written_out_attention():
    """Within it, AttnLRP computes ``scaled_dot_product_attention`` as ``A = softmax(q·kᵀ·s + mask)``,
    ``A·v`` with the uniform rule on each factor of both products (½ each: the gradient reaching
    ``q`` and ``k`` is ¼, ``v`` ½, as around the fused kernel) instead of the fused kernel. Used by
    ``relfast.export``: a traced graph then holds plain ops only (no device-specific fused
    attention, whose backward ONNX cannot express)."""
    token = _WRITTEN_OUT.set(True)
    try:
        yield
    finally:
        _WRITTEN_OUT.reset(token)


def _written_out_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                      dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                      enable_gqa: bool = False) -> Tensor:
    repeats = group_size(query, key, enable_gqa)
    probabilities = attention_probabilities(scaled(query, 0.5), scaled(expand_groups(key, repeats), 0.5), attn_mask,
                                            is_causal, scale)
    return torch.matmul(scaled(probabilities, 0.5), scaled(expand_groups(value, repeats), 0.5))


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
    from .families.hf_clip import HFClip, HFClipText, HFClipVision
    from .families.hf_vit import HFVisionTransformer
    from .families.sdpa_module import AnyAttentionModule
    from .families.timm_vit import TimmVisionTransformer
    from .families.torchvision_vit import TorchvisionVisionTransformer

    return (HFCausalLM, HFBertFamily, HFVisionTransformer, TimmVisionTransformer, TorchvisionVisionTransformer,
            HFClip, HFClipVision, HFClipText, AnyAttentionModule)


SUPPORTED = ("HuggingFace causal LMs (GPT-2, Llama, Qwen2, Mistral), BERT-family classifiers, ViT/DeiT, CLIP "
             "(CLIPModel and each tower); timm and torchvision ViTs; any module given a layout, where its ops have "
             "rules")


def check_family(family: Family) -> None:
    """Refuse a model family the AttnLRP rules are not written and tested for (a module given a
    layout is taken: its forward refuses, by name, any op without a rule)."""
    if type(family) not in _supported_families():
        raise ValueError(f"relfast.Explainer: method 'attnlrp' has no rules yet for {type(family.model).__name__} "
                         f"(supported: {SUPPORTED}); use 'generic'")


def _token_embedding(model: torch.nn.Module) -> Optional[Tensor]:
    """The embedding matrix whose lookups are the text's tokens (CLIP: its text tower's), or None."""
    for owner in (model, getattr(model, "text_model", None)):
        getter = getattr(owner, "get_input_embeddings", None)
        if getter is None:
            continue
        try:
            module = getter()
        except NotImplementedError:  # HF models without one (CLIPModel)
            continue
        if isinstance(module, torch.nn.Embedding):
            return module.weight
    return None


def _float_input(family: Family, call: ModelCall) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(pixels (B, C, H, W), token embeddings (B, N, D)): the call's float input leaf, if any,
    checked before any work."""
    named = [(name, value) for name, value in list(call.kwargs.items()) +
             [(f"inputs[{i}]", a) for i, a in enumerate(call.args)]
             if isinstance(value, Tensor) and value.requires_grad and not name.endswith("mask")]
    model = type(family.model).__name__
    if len(named) > 1:
        raise ValueError(f"relfast.Explainer: method 'attnlrp' reads relevance at one floating-point input, but the "
                         f"inputs of the {model} model hold {len(named)}: {[name for name, _ in named]}")
    if not named:
        if _token_embedding(family.model) is None:
            raise ValueError(f"relfast.Explainer: method 'attnlrp' reads relevance at a floating-point input of the "
                             f"{model} model (pixels (B, C, H, W) or token embeddings (B, N, D)) and its inputs hold "
                             "none; pass the token embeddings instead of token ids")
        return None, None
    name, value = named[0]
    if value.dim() == 4:
        return value, None
    if value.dim() == 3:
        return None, value
    raise ValueError(f"relfast.Explainer: method 'attnlrp' reads relevance at pixels (B, C, H, W) or token embeddings "
                     f"(B, N, D); argument 'inputs' ('{name}') has shape {tuple(value.shape)}")


class AttnLrpPass:
    """The AttnLRP forward of one call (run once, on first use) and its backward per target. Takes
    the place of :class:`relfast.explain.lrp.RelevancePass` for method ``attnlrp``.

    Args:
        family, call: the call's model and parsed inputs (with their graph leaves).
        layers: also the relevance of the hidden states entering each block (``relevance``).

    Attributes:
        layer_maps: what the method keeps of ``relevance``'s per-layer relevance, by stream name
            (None: a one-stream model).
    """

    def __init__(self, family: Family, call: ModelCall, layers: bool = False):
        check_family(family)
        self.family, self.call, self.layers = family, call, layers
        self._pixels, self._tokens = _float_input(family, call)
        self._capture: Optional[AttnLrpCapture] = None
        self._output: Any = None
        self._scores: Optional[Tensor] = None
        self._readouts: List[Tuple[str, Tensor]] = []  # (kind, tensor): where relevance is read, one per stream
        self._gradients: Dict[int, List[Any]] = {}  # target -> [gradients, streams yet to read them]
        self.layer_maps: Dict[Optional[str], Tensor] = {}

    def forward(self) -> Tuple[Any, List[Tensor]]:
        """Runs the forward once: (the model's output, one shape-only (B, H, N_q, N_k) tensor per
        attention site seen, for the session's checks; no map is formed)."""
        if self._capture is None:
            model = self.family.model
            capture = AttnLrpCapture(_token_embedding(model), self._pixels, layers=self.layers)
            try:
                with torch.enable_grad(), capture:
                    output = self.family.forward(self.call)
            finally:
                capture.close()
            self._check(capture)
            self._readouts = list(zip(capture.kinds, capture.inputs))
            if self._tokens is not None:
                self._readouts.append(("tokens", self._tokens))
            self._capture, self._output = capture, output
        device = self._readouts[0][1].device
        zero = torch.zeros((), device=device)
        return self._output, [zero.expand(*shape) for shape in self._capture.sites]

    def _check(self, capture: AttnLrpCapture) -> None:
        name = type(self.family.model).__name__
        if capture.unsupported:
            names = sorted(set(capture.unsupported))
            raise ValueError(f"relfast.Explainer: the {name} model applies {', '.join(names)} to its activations, "
                             "for which relfast has no AttnLRP rule; use method 'generic'")
        what = {"image": "patch embedding (a convolution of the pixels)", "text": "lookup of its input embeddings"}
        for kind in ("image", "text"):
            count = capture.kinds.count(kind)
            if kind == "image":
                expected = self._pixels is not None
            else:  # text read at its lookups unless the model is given pixels or token embeddings
                expected = self._pixels is None and self._tokens is None
            if count > 1 or (expected and count == 0):
                raise ValueError(f"relfast.Explainer: method 'attnlrp' found {count} {what[kind]} in the {name} "
                                 "model's forward; it reads relevance at exactly one")
        if not self.layers:
            return
        for site, (shape, residual) in enumerate(zip(capture.sites, capture.residuals)):
            if residual is None:
                raise ValueError(f"relfast.Explainer: 'layers=True' found no residual connection around attention "
                                 f"site {site} of the {name} model (a sum x + f(x) whose f runs that attention); it "
                                 "reads each layer's relevance at the hidden states x entering the block")
            if residual.dim() != 3 or tuple(residual.shape[:2]) != (shape[0], shape[2]):
                raise ValueError(f"relfast.Explainer: 'layers=True' found the hidden states entering attention site "
                                 f"{site} of the {name} model with shape {tuple(residual.shape)}; expected (B, N, D) = "
                                 f"({shape[0]}, {shape[2]}, D)")

    @property
    def scores(self) -> Tensor:
        if self._scores is None:
            output, _ = self.forward()
            self._scores = self.family.scores(output, self.call)
        return self._scores

    def relevance(self, k: int, scalar: Callable[[], Tensor], stream: Optional[Stream], token_mask: Optional[Tensor],
                  prefix_tokens: int, retain_graph: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """The k-th target's AttnLRP relevance on one stream (None: the call's one stream): (the
        input's (B, N), ``x ⊙ ∇x`` summed over the width, images per patch with prefix tokens 0;
        with ``layers``, (B, L, N) at the hidden states entering each of the stream's L blocks,
        else None). ``scalar()`` is the explained values summed over the batch; one backward per
        target serves every stream."""
        index = self._readout(stream)
        gradients = self._backward(k, scalar, retain_graph)
        leaf, grad = self._readouts[index][1], gradients[index]
        relevance = leaf.detach() * (grad if grad is not None else torch.zeros_like(leaf))
        sites = stream.sites if stream is not None else list(range(len(self._capture.sites)))
        if leaf.dim() == 4:  # patch embedding (B, D, h, w) -> (B, h·w), prefix tokens first
            per_patch = relevance.sum(dim=1).flatten(1)
            relevance = torch.cat([per_patch.new_zeros(per_patch.shape[0], prefix_tokens), per_patch], dim=1)
        else:
            relevance = relevance.sum(dim=-1)
            tokens = self._capture.sites[sites[0]][2] if sites else relevance.shape[1]
            if relevance.shape[1] != tokens and relevance.shape[1] + prefix_tokens == tokens:
                relevance = torch.cat([relevance.new_zeros(relevance.shape[0], prefix_tokens), relevance], dim=1)
            elif relevance.shape[1] != tokens:
                raise ValueError(f"relfast.Explainer: the {type(self.family.model).__name__} model's attention covers "
                                 f"{tokens} tokens but its input embeddings hold {relevance.shape[1]} (and the layout "
                                 f"{prefix_tokens} prefix tokens)")
        layers = None
        if self.layers:
            first = len(self._readouts)
            layers = torch.stack([(self._capture.residuals[s].detach() * _or_zeros(gradients[first + s],
                                                                                    self._capture.residuals[s]))
                                  .sum(dim=-1) for s in sites], dim=1)
        if token_mask is not None:
            mask = token_mask.to(relevance.device, relevance.dtype)
            relevance = relevance * mask
            layers = layers * mask[:, None] if layers is not None else None
        return relevance, layers

    def _readout(self, stream: Optional[Stream]) -> int:
        """The index of the stream's readout (CLIP's "image" and "text"; one-stream models: the one)."""
        if stream is None:
            return 0
        for i, (kind, _) in enumerate(self._readouts):
            if kind == stream.name or (stream.name == "text" and kind == "tokens"):
                return i
        raise ValueError(f"relfast.Explainer: method 'attnlrp' found no input of the {stream.name} stream in the "
                         f"{type(self.family.model).__name__} model's forward")

    def readout(self, stream: Optional[Stream] = None) -> Tensor:
        """The graph tensor (after ``forward``) whose ``x ⊙ ∇x`` is the stream's relevance, for
        callers that take its gradients themselves (``relfast.explain.generate``: batched targets)."""
        return self._readouts[self._readout(stream)][1]

    def _backward(self, k: int, scalar: Callable[[], Tensor], retain_graph: bool) -> Tuple[Optional[Tensor], ...]:
        """Target k's gradients at every readout (then, with ``layers``, every site's block
        input): one backward, kept until each stream has read it."""
        entry = self._gradients.get(k)
        if entry is None:
            wanted = [tensor for _, tensor in self._readouts] + (list(self._capture.residuals) if self.layers else [])
            gradients = torch.autograd.grad(scalar(), wanted, retain_graph=retain_graph, allow_unused=True)
            entry = self._gradients[k] = [gradients, len(self._readouts)]
        entry[1] -= 1
        if entry[1] <= 0:
            del self._gradients[k]
        return entry[0]


def _or_zeros(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return grad if grad is not None else torch.zeros_like(like)
