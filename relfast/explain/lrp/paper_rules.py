"""The rule sets of the relevance pass (:class:`RuleSet`), and the rules that only the papers'
code's set uses.

relfast knows three rule sets:

- ``"transformer_attribution"``: the CVPR method's own ([P1]; seed 000): LRP-αβ (α=1, β=0) with
  one denominator ``Z = W⁺x⁺ + W⁻x⁻`` in linear layers and convolutions, each operand of a
  product of two activations halved, sums rescaled per sample by seed 000 Eq. 9.
- ``"paper"``: what the papers' public code (Transformer-Explainability, ``ViT_orig_LRP.py`` with
  ``modules/layers_lrp.py``) computes for its ``lrp`` and ``partial_lrp`` baselines, the default
  of those two methods: αβ with *separate* denominators (:class:`SeparateLinearRule`,
  :class:`SeparateConv2dRule`), the zᴮ rule at the pixel layer (:class:`PixelZBoxConv2dRule`),
  products halved, sums by the plain z-rule.
- ``"textbook"``: one-denominator αβ everywhere (the pixel layer too), products not halved, sums
  by the plain z-rule: relfast's plain LRP before the papers' code was matched.

The rules here compute what ``rules.LinearRule`` and ``rules.Conv2dRule`` compute, forward (and in a
backward run for gradients, ``rules.PassState``); only their relevance backward differs. Half-
precision operands are computed in float32, as in ``rules.py``.
"""
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .rules import (EPS, Conv2dRule, LinearRule, _cast, _gradients, _keep_state, _output_padding, conv_forward,
                    safe_divide, widened)

__all__ = ["RuleSet", "RULE_SET_NAMES", "SeparateLinearRule", "SeparateConv2dRule", "PixelZBoxConv2dRule", "conv_rule",
           "linear_rule"]

RULE_SET_NAMES = ("transformer_attribution", "paper", "textbook")


@dataclass(frozen=True)
class RuleSet:
    """The rule choices of one relevance pass.

    Attributes:
        halve_products: each operand of a product of two activations (``q·kᵀ``, ``A·V``, a gated
            MLP's ``act(gate)·up``) gets half of its z-rule relevance.
        normalise_sums: sums of two activations rescale their operands' shares per sample (seed
            000 Eq. 9); else the plain z-rule ``R_u = u ⊙ R/(u + v)``.
        separate_alpha_beta: linear layers and convolutions divide the positive and the negative
            contributions each by their own sum; else by their joint sum.
        pixel_zbox: the convolution whose input is the call's image takes the zᴮ rule, bounded by
            each image's smallest and largest value.
    """

    halve_products: bool
    normalise_sums: bool
    separate_alpha_beta: bool
    pixel_zbox: bool

    @classmethod
    def transformer_attribution(cls) -> "RuleSet":
        return cls(halve_products=True, normalise_sums=True, separate_alpha_beta=False, pixel_zbox=False)

    @classmethod
    def paper(cls) -> "RuleSet":
        return cls(halve_products=True, normalise_sums=False, separate_alpha_beta=True, pixel_zbox=True)

    @classmethod
    def textbook(cls) -> "RuleSet":
        return cls(halve_products=False, normalise_sums=False, separate_alpha_beta=False, pixel_zbox=False)

    @classmethod
    def of(cls, rules: Union["RuleSet", str, bool]) -> "RuleSet":
        """A rule set, from itself, its name, or the former ``conserve`` flag (True: the CVPR
        method's rules, False: the textbook ones)."""
        if isinstance(rules, RuleSet):
            return rules
        if isinstance(rules, bool):
            return cls.transformer_attribution() if rules else cls.textbook()
        if rules not in RULE_SET_NAMES:
            raise ValueError(f"relfast: a relevance rule set must be one of {', '.join(map(repr, RULE_SET_NAMES))}, "
                             f"got {rules!r}")
        return getattr(cls, rules)()


def _separate_alpha_beta(x: Tensor, relevance: Tensor, forward: Callable[[Tensor, Tensor], Tensor],
                         transposed: Callable[[Tensor, Tensor], Tensor], weight: Tensor) -> Tensor:
    """LRP-αβ (α=1, β=0) as the papers' code computes it: the positive contributions
    ``Z⁺ = W⁺x⁺`` and the negative ones ``Z⁻ = W⁻x⁻`` each pass ``R`` on in proportion to their
    own sum (so a layer hands on up to twice ``ΣR``: not conservative, but what the papers'
    baselines computed)."""
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    s_pos = safe_divide(relevance, forward(x_pos, w_pos))
    s_neg = safe_divide(relevance, forward(x_neg, w_neg))
    return x_pos * transposed(s_pos, w_pos) + x_neg * transposed(s_neg, w_neg)


class SeparateLinearRule(torch.autograd.Function):
    """``F.linear`` with the separate-denominator αβ rule."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]):
        _keep_state(ctx)
        ctx.save_for_backward(x, weight)
        wide = widened(x)
        return F.linear(wide, _cast(weight, wide), _cast(bias, wide))

    @staticmethod
    def backward(ctx, relevance: Tensor):
        x, weight = ctx.saved_tensors
        like = x
        x = widened(x)
        weight = _cast(weight, x)
        relevance = relevance.to(x.dtype)
        if _gradients(ctx):  # a backward for gradients: the vector-Jacobian product
            return (relevance @ weight).to(like.dtype), None, None
        return _separate_alpha_beta(x, relevance, F.linear, lambda s, w: s @ w, weight).to(like.dtype), None, None


def _conv_backward(ctx, relevance: Tensor, rule: Callable[..., Tensor]):
    """The backward of a convolution rule: ``rule(x, weight, relevance, forward, transposed)``
    (``forward``, ``transposed``: the convolution without bias and its input-gradient map), or the
    gradient in a backward for gradients."""
    x, weight = ctx.saved_tensors
    like = x
    x = widened(x)
    weight = _cast(weight, x)
    relevance = relevance.to(x.dtype)
    stride, padding, dilation, groups = ctx.geometry

    def forward(inputs: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(inputs, w, None, stride, padding, dilation, groups)

    def transposed(s: Tensor, w: Tensor) -> Tensor:  # as an op ONNX has
        return F.conv_transpose2d(s, w, None, stride, padding, _output_padding(x, s, w, stride, padding, dilation),
                                  groups, dilation)

    result = transposed(relevance, weight) if _gradients(ctx) else rule(x, weight, relevance, forward, transposed)
    return (result.to(like.dtype),) + (None,) * 6


class SeparateConv2dRule(torch.autograd.Function):
    """``F.conv2d`` (not the pixel layer) with the separate-denominator αβ rule."""

    forward = staticmethod(conv_forward)

    @staticmethod
    def backward(ctx, relevance: Tensor):
        return _conv_backward(ctx, relevance, lambda x, weight, r, forward, transposed: _separate_alpha_beta(
            x, r, forward, transposed, weight))


def _zbox(x: Tensor, weight: Tensor, relevance: Tensor, forward, transposed) -> Tensor:
    dims = tuple(range(1, x.dim()))
    low = x.amin(dim=dims, keepdim=True).expand_as(x)
    high = x.amax(dim=dims, keepdim=True).expand_as(x)
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    z = forward(x, weight) - forward(low, w_pos) - forward(high, w_neg) + EPS
    s = relevance / z
    return x * transposed(s, weight) - low * transposed(s, w_pos) - high * transposed(s, w_neg)


class PixelZBoxConv2dRule(torch.autograd.Function):
    """``F.conv2d`` on the image: the zᴮ rule with the bounds ``L`` and ``H`` the image's smallest
    and largest value (per sample, over channels and pixels):
    ``Z = conv(X, W) − conv(L, W⁺) − conv(H, W⁻) + 1e-9`` (no bias), ``S = R / Z``,
    ``R_X = X ⊙ convᵀ(S, W) − L ⊙ convᵀ(S, W⁺) − H ⊙ convᵀ(S, W⁻)``. ``Z`` is a sum of terms
    ``(x − L)·w⁺ ≥ 0`` and ``(x − H)·w⁻ ≥ 0``, so the papers' plain ``+1e-9`` (no safe division)
    keeps it positive."""

    forward = staticmethod(conv_forward)

    @staticmethod
    def backward(ctx, relevance: Tensor):
        return _conv_backward(ctx, relevance, _zbox)


def conv_rule(rules: RuleSet, pixels: bool):
    """The convolution rule of ``rules`` (``pixels``: the convolution reads the call's image)."""
    if pixels and rules.pixel_zbox:
        return PixelZBoxConv2dRule
    return SeparateConv2dRule if rules.separate_alpha_beta else Conv2dRule


def linear_rule(rules: RuleSet):
    return SeparateLinearRule if rules.separate_alpha_beta else LinearRule
