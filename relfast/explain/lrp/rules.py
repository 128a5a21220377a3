"""[P1] relevance propagation rules as autograd functions: the forward is the layer's own
computation, the backward maps the relevance of the output to the relevance of the inputs.

A backward through a graph built from these functions is therefore an LRP pass: seeded with the
one-hot target at the logits, ``torch.autograd.grad`` returns relevance, not gradients. Ops that
only move values (views, permutes, indexing, concatenation, expansion) keep autograd's own
backward, which routes relevance exactly as the values were routed (a tensor used twice sums the
relevance of both uses, LRP's rule for a copy).

Rules (``../shared/SPEC.md``, [P1]; seed 000 §2):
- linear / convolution: LRP-αβ with α=1, β=0: ``Z = W⁺x⁺ + W⁻x⁻`` (no bias),
  ``R_in = x⁺ ⊙ W⁺ᵀ(R/Z) + x⁻ ⊙ W⁻ᵀ(R/Z)``;
- LayerNorm, GELU and other activations, softmax, dropout, scaling by a constant: pass-through;
- products of two activations (the attention matmuls): the z-rule per operand, each halved when
  ``halve`` (the CVPR method's and the papers' code's rules; textbook LRP keeps the doubled sum of
  Lemma 1);
- sums (skip connections, embeddings + positions): the z-rule per operand, then with ``normalise``
  (the CVPR method's rules) Eq. 9 of seed 000, which rescales each operand's share per sample so that their sums add up to
  the output's (Lemma 2). An operand that is a constant (a position table, a mask) takes its share
  out of the propagated relevance;
- mean over tokens (average pooling): the z-rule;
- element-wise products of two activations (a gated MLP's ``act(gate) * up``): as for the
  attention products, the z-rule per operand, which gives each operand the whole relevance of the
  product; halved when ``halve`` (a uniform split);
- causal LMs (``mode.py`` recognises the patterns): GPT-2's ``Conv1D`` (``torch.addmm`` with the
  weight) is the linear rule; element-wise chains of one activation written out (``gelu_new``'s
  ``0.5·x·(1 + tanh(…))``, RMSNorm's ``x·rsqrt(mean(x²) + ε)``) are one activation or one
  normalisation: relevance passes through, as for ``F.gelu`` and LayerNorm (the normaliser is a
  constant); rotary embeddings ``q·cos + rotate_half(q)·sin`` (constants times data moves of one
  activation) are a linear map with constant coefficients: the z-rule of that map (LRP-0, which
  conserves exactly; no αβ since there are no learned weights, no Eq. 9 since the two terms are
  not two activations but one).

Divisions are safe: the denominator is moved 1e-9 away from 0 (keeping its sign), and an exactly
zero denominator gives 0. The batch is dimension 0 of every rule's output (per-sample sums).

Half-precision operands (float16, bfloat16) are computed in float32, forward and backward: the rules
divide by sums that nearly cancel, which half types cannot resolve (the maps of plain LRP came out
unrelated to float64's). Linear and convolution layers keep the model's weights as they are and
cast them per use, so the graph holds no float32 copy of them.

Gradients from the same graph: a pass made for gradients too (:class:`PassState`, the CVPR method,
which needs ``∇A`` besides ``R_A``) runs a backward under ``PassState.computing_gradients()`` as
the ordinary gradient of the model: every rule's backward is then the vector-Jacobian product of
the op its forward computed. So one forward serves the relevance backward and the gradient
backward.
"""
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-9
HALF = (torch.float16, torch.bfloat16)


class PassState:
    """What the rules of one relevance pass share.

    Attributes:
        gradients_possible: the pass may be asked for gradients: its non-linear pass-through rules
            keep what their gradient needs (their input; a softmax its output).
        gradients: the backward now running computes gradients, not relevance.
    """

    def __init__(self, gradients_possible: bool = False):
        self.gradients_possible = gradients_possible
        self.gradients = False

    @contextmanager
    def computing_gradients(self) -> Iterator[None]:
        if not self.gradients_possible:
            raise RuntimeError("relfast: this relevance pass was not made for gradients")
        self.gradients = True
        try:
            yield
        finally:
            self.gradients = False


_ACTIVE = threading.local()  # the pass whose forward runs on this thread, read by the rules' forwards


@contextmanager
def rules_of(state: PassState) -> Iterator[None]:
    """The rules applied on this thread in the block belong to ``state``'s pass."""
    previous = getattr(_ACTIVE, "state", None)
    _ACTIVE.state = state
    try:
        yield
    finally:
        _ACTIVE.state = previous


def _keep_state(ctx) -> Optional[PassState]:
    ctx.state = getattr(_ACTIVE, "state", None)
    return ctx.state


def _gradients(ctx) -> bool:
    return ctx.state is not None and ctx.state.gradients


def widened(t: Optional[Tensor]) -> Optional[Tensor]:
    """A half-precision tensor in float32; anything else as it is."""
    return t.float() if isinstance(t, Tensor) and t.dtype in HALF else t


def _cast(t: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    return t.to(like.dtype) if t is not None and t.dtype != like.dtype else t


def safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / (denominator ± 1e-9)`` (the shift keeps the denominator's sign), 0 where the
    denominator is exactly 0 (its sign is 0 there: the quotient is inf or NaN until filled)."""
    quotient = numerator / denominator.add(denominator.sign(), alpha=EPS)
    return quotient.masked_fill_(denominator == 0, 0)


def _to_shape(relevance: Tensor, like: Tensor) -> Tensor:
    """Relevance of a broadcast operand, summed back to its shape and dtype."""
    if relevance.shape != like.shape:
        relevance = relevance.sum_to_size(like.shape)
    return relevance.to(like.dtype)


def _per_sample_sum(t: Tensor) -> Tensor:
    """(B, ...) -> (B, 1, ..., 1)."""
    return t.sum(dim=tuple(range(1, t.dim())), keepdim=True) if t.dim() > 1 else t


class PassThrough(torch.autograd.Function):
    """``compute(x, *rest)``; relevance reaches ``x`` unchanged (normalisation, activations,
    softmax, dropout, scaling by a constant). ``rest`` are constants. ``kind`` says what the
    gradient needs: "linear" (``compute`` is affine in ``x``: nothing), "softmax" (over the last
    dimension: its output), "nonlinear" (its input, to recompute)."""

    @staticmethod
    def forward(ctx, compute: Callable[..., Tensor], x: Tensor, kind: str, *rest):
        ctx.like = (x.shape, x.dtype, x.device)
        output = compute(x, *rest)
        state = _keep_state(ctx)
        if state is not None and state.gradients_possible:
            ctx.compute, ctx.kind, ctx.rest = compute, kind, rest
            if kind == "softmax":
                ctx.save_for_backward(output)
            elif kind == "nonlinear":
                ctx.save_for_backward(x)
        return output

    @staticmethod
    def backward(ctx, relevance: Tensor):
        shape, dtype, device = ctx.like
        if _gradients(ctx):
            relevance = _pass_through_gradient(ctx, relevance)
        elif relevance.shape != shape:
            relevance = relevance.sum_to_size(shape)
        return (None, relevance.to(dtype), None) + (None,) * (len(ctx.needs_input_grad) - 3)


def _pass_through_gradient(ctx, grad: Tensor) -> Tensor:
    if ctx.kind == "softmax":
        (probabilities,) = ctx.saved_tensors
        grad = grad.to(probabilities.dtype)
        return probabilities * (grad - (grad * probabilities).sum(dim=-1, keepdim=True))
    shape, dtype, device = ctx.like
    if ctx.kind == "linear":  # the Jacobian is the same everywhere: take it at 0
        x = torch.zeros(shape, dtype=dtype, device=device)
    else:
        (x,) = ctx.saved_tensors
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        output = ctx.compute(x, *ctx.rest)
        (grad,) = torch.autograd.grad(output, x, grad.to(output.dtype), allow_unused=True)
    return grad if grad is not None else torch.zeros(shape, dtype=dtype, device=device)


def _alpha_beta(x: Tensor, relevance: Tensor, forward: Callable[[Tensor, Tensor], Tensor],
                transposed: Callable[[Tensor, Tensor], Tensor], weight: Tensor) -> Tensor:
    """LRP-αβ (α=1, β=0) for a layer ``forward(x, W)`` whose input-gradient map is
    ``transposed(S, W)``."""
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    z = forward(x_pos, w_pos) + forward(x_neg, w_neg)
    s = safe_divide(relevance, z)
    return x_pos * transposed(s, w_pos) + x_neg * transposed(s, w_neg)


class LinearRule(torch.autograd.Function):
    """``F.linear`` with LRP-αβ (α=1, β=0). With ``|·|`` element-wise, the rule's two terms are
    ``Z = x⁺W⁺ + x⁻W⁻ = ½(xWᵀ + |x||W|ᵀ)`` and ``x⁺ ⊙ S W⁺ + x⁻ ⊙ S W⁻ = ½(x ⊙ SW + |x| ⊙ S|W|)``:
    the forward's own ``xWᵀ`` (its output less the bias, saved by the ops that read it anyway)
    leaves three matrix products per backward instead of four."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]):
        _keep_state(ctx)
        wide = widened(x)
        output = F.linear(wide, _cast(weight, wide), _cast(bias, wide))
        ctx.save_for_backward(x, weight, bias, output)
        return output

    @staticmethod
    def backward(ctx, relevance: Tensor):
        x, weight, bias, output = ctx.saved_tensors
        like = x
        x = widened(x)
        weight = _cast(weight, x)
        relevance = relevance.to(x.dtype)
        if _gradients(ctx):
            return (relevance @ weight).to(like.dtype), None, None
        width, outputs = x.shape[-1], weight.shape[0]
        x = x.reshape(-1, width)
        magnitude, weight_magnitude = x.abs(), weight.abs()
        # Z = ½(output − bias + |x||W|ᵀ), the product and the sum in one GEMM; Z ≥ 0 exactly, the
        # clamp keeps rounding from making it negative where it is 0
        z = torch.addmm(output.reshape(-1, outputs), magnitude, weight_magnitude.t(), beta=0.5, alpha=0.5)
        if bias is not None:
            z.sub_(_cast(bias, x), alpha=0.5)
        s = safe_divide(relevance.reshape(-1, outputs), z.clamp_(min=0)).mul_(0.5)
        r = (s @ weight).mul_(x).addcmul_(magnitude, s @ weight_magnitude)
        return r.view(like.shape).to(like.dtype), None, None


def conv_forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int):
    """The forward of the convolution rules: the layer's own output; keeps its input and weight."""
    _keep_state(ctx)
    ctx.save_for_backward(x, weight)
    ctx.geometry = (stride, padding, dilation, groups)
    wide = widened(x)
    return F.conv2d(wide, _cast(weight, wide), _cast(bias, wide), stride, padding, dilation, groups)


class Conv2dRule(torch.autograd.Function):
    forward = staticmethod(conv_forward)

    @staticmethod
    def backward(ctx, relevance: Tensor):
        x, weight = ctx.saved_tensors
        x = widened(x)
        weight = _cast(weight, x)
        stride, padding, dilation, groups = ctx.geometry

        def forward(inputs, w):
            return F.conv2d(inputs, w, None, stride, padding, dilation, groups)

        def transposed(s, w):  # the input-gradient map of the convolution, as an op ONNX has
            return F.conv_transpose2d(s, w, None, stride, padding, _output_padding(x, s, w, stride, padding, dilation),
                                      groups, dilation)

        if _gradients(ctx):
            grad = transposed(relevance.to(x.dtype), weight).to(ctx.saved_tensors[0].dtype)
            return (grad,) + (None,) * 6
        return _alpha_beta(x, relevance.to(x.dtype), forward, transposed, weight), None, None, None, None, None, None


def _output_padding(x: Tensor, s: Tensor, weight: Tensor, stride, padding, dilation) -> Tuple[int, int]:
    """What ``conv_transpose2d`` must add to give back ``x``'s size (a strided convolution drops
    the input's trailing rows and columns that do not fill a window)."""
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    return tuple(x.shape[-2 + i] - ((s.shape[-2 + i] - 1) * stride[i] - 2 * padding[i]
                                    + dilation[i] * (weight.shape[-2 + i] - 1) + 1) for i in range(2))


class MatMulRule(torch.autograd.Function):
    """``u @ v`` of two activations: the z-rule per operand, halved when ``halve``."""

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, halve: bool):
        _keep_state(ctx)
        ctx.save_for_backward(u, v)
        ctx.halve = halve
        return torch.matmul(widened(u), widened(v))

    @staticmethod
    def backward(ctx, relevance: Tensor):
        u, v = (widened(t) for t in ctx.saved_tensors)
        if _gradients(ctx):
            grad = relevance.to(u.dtype)
            return (_to_shape(torch.matmul(grad, v.transpose(-1, -2)), ctx.saved_tensors[0]),
                    _to_shape(torch.matmul(u.transpose(-1, -2), grad), ctx.saved_tensors[1]), None)
        s = safe_divide(relevance.to(u.dtype), torch.matmul(u, v))
        r_u = u * torch.matmul(s, v.transpose(-1, -2))
        r_v = v * torch.matmul(u.transpose(-1, -2), s)
        if ctx.halve:
            r_u, r_v = r_u / 2, r_v / 2
        return _to_shape(r_u, u), _to_shape(r_v, v), None


class AddRule(torch.autograd.Function):
    """``u + v``: the z-rule per operand; with ``normalise``, seed 000 Eq. 9 per sample. A constant
    operand (``v`` without grad) gets no relevance; its share is removed."""

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, normalise: bool):
        _keep_state(ctx)
        ctx.save_for_backward(u, v)
        ctx.normalise = normalise
        return widened(u) + widened(v)

    @staticmethod
    def backward(ctx, relevance: Tensor):
        u, v = ctx.saved_tensors
        like = (u, v)  # the operands' own dtypes, for the relevance handed back
        if _gradients(ctx):
            return (_to_shape(relevance, u) if ctx.needs_input_grad[0] else None,
                    _to_shape(relevance, v) if ctx.needs_input_grad[1] else None, None)
        u, v = widened(u), widened(v)
        s = safe_divide(relevance.to(u.dtype), u + v)
        r_u, r_v = u * s, v * s  # both in the output's (broadcast) shape
        if ctx.normalise:
            sum_u, sum_v, total = _per_sample_sum(r_u), _per_sample_sum(r_v), _per_sample_sum(relevance.to(u.dtype))
            share = sum_u.abs() + sum_v.abs()
            r_u = r_u * safe_divide(safe_divide(sum_u.abs(), share) * total, sum_u)
            r_v = r_v * safe_divide(safe_divide(sum_v.abs(), share) * total, sum_v)
        return (_to_shape(r_u, like[0]) if ctx.needs_input_grad[0] else None,
                _to_shape(r_v, like[1]) if ctx.needs_input_grad[1] else None, None)


class ProductRule(torch.autograd.Function):
    """``u * v`` element-wise, two activations (a gated MLP's ``act(gate) * up``): the z-rule per
    operand as for ``MatMulRule``, ``R_u = R_v = u·v · R/(u·v)`` (each operand the whole relevance
    of its product), halved when ``halve``."""

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, halve: bool):
        _keep_state(ctx)
        ctx.save_for_backward(u, v)
        ctx.halve = halve
        return widened(u) * widened(v)

    @staticmethod
    def backward(ctx, relevance: Tensor):
        u, v = ctx.saved_tensors
        like = (u, v)
        u, v = widened(u), widened(v)
        if _gradients(ctx):
            grad = relevance.to(u.dtype)
            return _to_shape(grad * v, like[0]), _to_shape(grad * u, like[1]), None
        z = u * v
        r = z * safe_divide(relevance.to(z.dtype), z)
        if ctx.halve:
            r = r / 2
        return _to_shape(r, like[0]), _to_shape(r, like[1]), None


class MeanRule(torch.autograd.Function):
    """``x.mean(dims, keepdim)`` (average pooling of tokens): the z-rule, ``R_j = x_j / Σx · R``."""

    @staticmethod
    def forward(ctx, x: Tensor, dims: Tuple[int, ...], keepdim: bool):
        _keep_state(ctx)
        ctx.save_for_backward(x)
        ctx.dims, ctx.keepdim = dims, keepdim
        return widened(x).mean(dim=dims, keepdim=keepdim)

    @staticmethod
    def backward(ctx, relevance: Tensor):
        x = widened(ctx.saved_tensors[0])
        if not ctx.keepdim:
            for d in sorted(d % x.dim() for d in ctx.dims):
                relevance = relevance.unsqueeze(d)
        if _gradients(ctx):
            count = 1
            for d in ctx.dims:
                count *= x.shape[d]
            grad = relevance.to(x.dtype).expand_as(x) / count
            return grad.to(ctx.saved_tensors[0].dtype), None, None
        total = x.sum(dim=ctx.dims, keepdim=True)
        return x * safe_divide(relevance.to(x.dtype), total), None, None


class SameSourceProduct(torch.autograd.Function):
    """``u * v`` or ``u / v`` where both are element-wise functions of one activation ``source``
    (``gelu_new`` and RMSNorm written out): one activation or normalisation of ``source``, so
    relevance passes from the result to ``source``. Gradients go through ``u`` and ``v`` (whose own
    rules lead back to ``source``)."""

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, source: Tensor, divide: bool):
        _keep_state(ctx)
        ctx.divide = divide
        ctx.like = (source.shape, source.dtype)
        if ctx.state is not None and ctx.state.gradients_possible:
            ctx.save_for_backward(u, v)
        return u / v if divide else u * v

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not _gradients(ctx):
            shape, dtype = ctx.like
            relevance = grad.sum_to_size(shape) if grad.shape != shape else grad
            return None, None, relevance.to(dtype), None
        u, v = ctx.saved_tensors
        grad = grad.to(u.dtype)
        if ctx.divide:
            return _to_shape(grad / v, u), _to_shape(-grad * u / (v * v), v), None, None
        return _to_shape(grad * v, u), _to_shape(grad * u, v), None, None


def pass_through(compute: Callable[..., Tensor], x: Tensor, *rest, kind: str = "nonlinear") -> Tensor:
    """``compute(x, *rest)`` with the pass-through rule; ``kind``: see :class:`PassThrough`."""
    return PassThrough.apply(compute, x, kind, *rest)


def dims_of(dim: Optional[Sequence[int]], rank: int) -> Tuple[int, ...]:
    if dim is None:
        return tuple(range(rank))
    return tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)
