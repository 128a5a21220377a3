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
  ``conserve`` (the CVPR method's rules; plain LRP keeps the doubled sum of Lemma 1);
- sums (skip connections, embeddings + positions): the z-rule per operand, then with ``conserve``
  Eq. 9 of seed 000, which rescales each operand's share per sample so that their sums add up to
  the output's (Lemma 2). An operand that is a constant (a position table, a mask) takes its share
  out of the propagated relevance;
- mean over tokens (average pooling): the z-rule;
- element-wise products of two activations (a gated MLP's ``act(gate) * up``): as for the
  attention products, the z-rule per operand, which gives each operand the whole relevance of the
  product; halved when ``conserve`` (a uniform split);
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
"""
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-9
HALF = (torch.float16, torch.bfloat16)


def widened(t: Optional[Tensor]) -> Optional[Tensor]:
    """A half-precision tensor in float32; anything else as it is."""
    return t.float() if isinstance(t, Tensor) and t.dtype in HALF else t


def _cast(t: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    return t.to(like.dtype) if t is not None and t.dtype != like.dtype else t


def safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    shifted = denominator + torch.where(denominator >= 0, EPS, -EPS).to(denominator.dtype)
    return torch.where(denominator == 0, torch.zeros_like(numerator), numerator / shifted)


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
    softmax, dropout, scaling by a constant). ``rest`` are constants."""

    @staticmethod
    def forward(ctx, compute: Callable[..., Tensor], x: Tensor, *rest):
        ctx.like = (x.shape, x.dtype)
        return compute(x, *rest)

    @staticmethod
    def backward(ctx, relevance: Tensor):
        shape, dtype = ctx.like
        if relevance.shape != shape:
            relevance = relevance.sum_to_size(shape)
        return (None, relevance.to(dtype)) + (None,) * (len(ctx.needs_input_grad) - 2)


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
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]):
        ctx.save_for_backward(x, weight)
        x = widened(x)
        return F.linear(x, _cast(weight, x), _cast(bias, x))

    @staticmethod
    def backward(ctx, relevance: Tensor):
        x, weight = ctx.saved_tensors
        x = widened(x)
        r = _alpha_beta(x, relevance.to(x.dtype), F.linear, lambda s, w: s @ w, _cast(weight, x))
        return r, None, None


class Conv2dRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation, groups)
        x = widened(x)
        return F.conv2d(x, _cast(weight, x), _cast(bias, x), stride, padding, dilation, groups)

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
    """``u @ v`` of two activations: the z-rule per operand, halved when ``conserve``."""

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, conserve: bool):
        ctx.save_for_backward(u, v)
        ctx.conserve = conserve
        return torch.matmul(widened(u), widened(v))

    @staticmethod
    def backward(ctx, relevance: Tensor):
        u, v = (widened(t) for t in ctx.saved_tensors)
        s = safe_divide(relevance.to(u.dtype), torch.matmul(u, v))
        r_u = u * torch.matmul(s, v.transpose(-1, -2))
        r_v = v * torch.matmul(u.transpose(-1, -2), s)
        if ctx.conserve:
            r_u, r_v = r_u / 2, r_v / 2
        return _to_shape(r_u, u), _to_shape(r_v, v), None


class AddRule(torch.autograd.Function):
    """``u + v``: the z-rule per operand; with ``conserve``, seed 000 Eq. 9 per sample. A constant
    operand (``v`` without grad) gets no relevance; its share is removed."""

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, conserve: bool):
        ctx.save_for_backward(u, v)
        ctx.conserve = conserve
        return widened(u) + widened(v)

    @staticmethod
    def backward(ctx, relevance: Tensor):
        u, v = ctx.saved_tensors
        like = (u, v)  # the operands' own dtypes, for the relevance handed back
        u, v = widened(u), widened(v)
        s = safe_divide(relevance.to(u.dtype), u + v)
        r_u, r_v = u * s, v * s  # both in the output's (broadcast) shape
        if ctx.conserve:
            sum_u, sum_v, total = _per_sample_sum(r_u), _per_sample_sum(r_v), _per_sample_sum(relevance.to(u.dtype))
            share = sum_u.abs() + sum_v.abs()
            r_u = r_u * safe_divide(safe_divide(sum_u.abs(), share) * total, sum_u)
            r_v = r_v * safe_divide(safe_divide(sum_v.abs(), share) * total, sum_v)
        return (_to_shape(r_u, like[0]) if ctx.needs_input_grad[0] else None,
                _to_shape(r_v, like[1]) if ctx.needs_input_grad[1] else None, None)


class ProductRule(torch.autograd.Function):
    """``u * v`` element-wise, two activations (a gated MLP's ``act(gate) * up``): the z-rule per
    operand as for ``MatMulRule``, ``R_u = R_v = u·v · R/(u·v)`` (each operand the whole relevance
    of its product), halved when ``conserve``."""

    @staticmethod
    def forward(ctx, u: Tensor, v: Tensor, conserve: bool):
        ctx.save_for_backward(u, v)
        ctx.conserve = conserve
        return widened(u) * widened(v)

    @staticmethod
    def backward(ctx, relevance: Tensor):
        u, v = ctx.saved_tensors
        like = (u, v)
        u, v = widened(u), widened(v)
        z = u * v
        r = z * safe_divide(relevance.to(z.dtype), z)
        if ctx.conserve:
            r = r / 2
        return _to_shape(r, like[0]), _to_shape(r, like[1]), None


class MeanRule(torch.autograd.Function):
    """``x.mean(dims, keepdim)`` (average pooling of tokens): the z-rule, ``R_j = x_j / Σx · R``."""

    @staticmethod
    def forward(ctx, x: Tensor, dims: Tuple[int, ...], keepdim: bool):
        ctx.save_for_backward(x)
        ctx.dims, ctx.keepdim = dims, keepdim
        return widened(x).mean(dim=dims, keepdim=keepdim)

    @staticmethod
    def backward(ctx, relevance: Tensor):
        x = widened(ctx.saved_tensors[0])
        total = x.sum(dim=ctx.dims, keepdim=True)
        if not ctx.keepdim:
            for d in sorted(d % x.dim() for d in ctx.dims):
                relevance = relevance.unsqueeze(d)
        return x * safe_divide(relevance.to(x.dtype), total), None, None


def pass_through(compute: Callable[..., Tensor], x: Tensor, *rest) -> Tensor:
    return PassThrough.apply(compute, x, *rest)


def dims_of(dim: Optional[Sequence[int]], rank: int) -> Tuple[int, ...]:
    if dim is None:
        return tuple(range(rank))
    return tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)
