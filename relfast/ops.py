"""Documented wrappers over the ``torch.ops.relfast`` operators, and their fake kernels.

Every op takes a leading batch dimension, works on CPU (OpenMP C++) and CUDA (when built with it),
accepts float16/bfloat16/float32/float64 (half types accumulate in float32), any strides, and
returns a new tensor in the input dtype. Arguments are validated before any kernel runs: a wrong
rank, shape, dtype or device, or NaN/inf values, raise ``ValueError`` naming the argument; a
result that overflows its dtype (e.g. float16 products beyond 65504) raises ``ValueError`` too,
never returns inf. Arguments that are not tensors (e.g. numpy arrays) raise ``TypeError``. The
definitions are in ``relfast.reference``; the math in ``docs/METHODS.md``.

The wrappers are TorchScript-compatible; the ops work under ``torch.compile(fullgraph=True)`` and
``torch.export`` (the fake kernels below give their output shapes). They are not differentiable.
"""
from typing import List, Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the library registers the relfast:: operators)

__all__ = [
    "head_mean_grad_attn",
    "relevance_update",
    "relevance_update_",
    "row_relevance_update",
    "sdpa_row_relevance_update",
    "normalize_residual",
    "bimodal_update",
    "rollout",
    "built_with_cuda",
]


def head_mean_grad_attn(grad: Tensor, attn: Tensor) -> Tensor:
    """[P2] rule 5, head averaging: ``Ā = E_h[(grad ⊙ attn)^+]``.

    Args:
        grad: (B, H, Nq, Nk) gradient of the explained scalar w.r.t. the attention map.
        attn: (B, H, Nq, Nk) attention probabilities (or their LRP relevance, for the "with LRP"
            variant).

    Returns:
        (B, Nq, Nk). The clamp is applied per element, before the mean over heads.
    """
    if not torch.jit.is_scripting():
        _check_tensors("head_mean_grad_attn", ("grad", grad), ("attn", attn))
    return torch.ops.relfast.head_mean_grad_attn(grad, attn)


def relevance_update(R: Tensor, abar: Tensor, aggregate: bool = True) -> Tensor:
    """[P2] rules 6/7: ``R + abar @ R`` (``abar @ R`` with ``aggregate=False``, the
    "w/o aggregation" ablation).

    Args:
        R: (B, N, M) relevance map (rule 6: M = N, ``R^ss``; rule 7: ``R^sq``).
        abar: (B, N, N) head-averaged map of the layer, e.g. from :func:`head_mean_grad_attn`.
    """
    if not torch.jit.is_scripting():
        _check_tensors("relevance_update", ("R", R), ("abar", abar))
    return torch.ops.relfast.relevance_update(R, abar, aggregate=aggregate)


def relevance_update_(R: Tensor, abar: Tensor, aggregate: bool = True) -> Tensor:
    """In-place :func:`relevance_update`: writes the result into ``R`` and returns ``R``."""
    if not torch.jit.is_scripting():
        _check_tensors("relevance_update_", ("R", R), ("abar", abar))
    torch.ops.relfast.relevance_update_(R, abar, aggregate=aggregate)
    return R


def row_relevance_update(v: Tensor, grad: Tensor, attn: Tensor, aggregate: bool = True) -> Tensor:
    """Streaming rule 6 on K rows of R: ``v + v @ E_h[(grad ⊙ attn)^+]``.

    One pass over ``grad`` and ``attn`` that never materialises ``Ā`` (for K up to 8; more
    rows materialise ``Ā`` once and use a GEMM). Applied for layers L..1 starting from
    ``v = e_0ᵀ`` it yields row 0 of ``(I + Ā_L) ··· (I + Ā_1)``.

    Args:
        v: (B, K, N) the rows being propagated.
        grad, attn: (B, H, N, N) as in :func:`head_mean_grad_attn`.
        aggregate: False gives ``v @ Ā`` (the "w/o aggregation" ablation).
    """
    if not torch.jit.is_scripting():
        _check_tensors("row_relevance_update", ("v", v), ("grad", grad), ("attn", attn))
    return torch.ops.relfast.row_relevance_update(v, grad, attn, aggregate=aggregate)


def sdpa_row_relevance_update(v: Tensor, query: Tensor, key: Tensor, value: Tensor, grad_out: Tensor,
                              logsumexp: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                              scale: Optional[float] = None, aggregate: bool = True) -> Tensor:
    """:func:`row_relevance_update` for a fused (SDPA / flash) attention layer, from the tensors its
    backward keeps: ``v + v @ E_h[(∇A ⊙ A)^+]`` with ``A = softmax(scale·q·kᵀ + mask)``
    recomputed from the row log-sum-exp and ``∇A = grad_out · valueᵀ``, tile by tile; neither
    ``A`` nor ``∇A`` is formed as an (N, N) matrix per head.

    Args:
        v: (B, K, Nq) the rows being propagated.
        query: (B, H, Nq, D); key: (B, H_kv, Nk, D); value: (B, H_kv, Nk, Dv), with H a multiple
            of H_kv (grouped-query attention: query head h uses key/value head h // (H / H_kv)).
        grad_out: (B, H, Nq, Dv) gradient of the explained scalar w.r.t. the attention's output.
        logsumexp: (B, H, Nq) ``log Σ_j exp(scale·q·kᵀ + mask)`` per row, as the fused forward
            returns it (any float dtype; -inf for a fully masked row, whose A is then 0).
        attn_mask: optional bool (True = attend) or additive float mask broadcastable to
            (B, H, Nq, Nk). is_causal: keys j ≤ i only (top-left aligned, as SDPA).
        scale: the softmax scale (default 1/sqrt(D)). aggregate: False gives ``v @ Ā``.

    Returns:
        (B, K, Nk) in the dtype of ``v`` (half types accumulate in float32).
    """
    if not torch.jit.is_scripting():
        _check_tensors("sdpa_row_relevance_update", ("v", v), ("query", query), ("key", key), ("value", value),
                       ("grad_out", grad_out), ("logsumexp", logsumexp))
        if attn_mask is not None:
            _check_tensors("sdpa_row_relevance_update", ("attn_mask", attn_mask))
    return torch.ops.relfast.sdpa_row_relevance_update(v, query, key, value, grad_out, logsumexp, attn_mask,
                                                       is_causal=is_causal, scale=scale, aggregate=aggregate)


def normalize_residual(R: Tensor) -> Tensor:
    """[P2] rules 8-9 (``handle_residual``): ``R̄ = (R - I) / rowsum(R - I) + I``.

    Args:
        R: (B, N, N) a self-attention relevance map.

    A row of ``R - I`` that sums to exactly 0 (e.g. a token nothing has attended to yet) is
    scaled by 0, so it becomes the identity row; the reference code returns NaN there.
    """
    if not torch.jit.is_scripting():
        _check_tensors("normalize_residual", ("R", R))
    return torch.ops.relfast.normalize_residual(R)


def bimodal_update(R_sq: Tensor, R_ss: Tensor, abar: Tensor, R_qq: Tensor, normalize: bool = True) -> Tensor:
    """[P2] rule 10, co-attention of s attending to q: ``R_sq + R̄_ssᵀ · Ā · R̄_qq``.

    Args:
        R_sq: (B, S, Q) cross relevance. R_ss: (B, S, S), R_qq: (B, Q, Q) self relevance maps.
        abar: (B, S, Q) head-averaged co-attention map.
        normalize: False uses ``R_ss``/``R_qq`` as they are (the "w/o norm." ablation).
    """
    if not torch.jit.is_scripting():
        _check_tensors("bimodal_update", ("R_sq", R_sq), ("R_ss", R_ss), ("abar", abar), ("R_qq", R_qq))
    return torch.ops.relfast.bimodal_update(R_sq, R_ss, abar, R_qq, normalize=normalize)


def rollout(attentions: List[Tensor], start_layer: int = 0) -> Tensor:
    """[P1] attention rollout (supplement Eq. 16): ``Â_L ··· Â_s``, ``Â_l`` the
    row-normalised ``E_h A_l + I``.

    Args:
        attentions: per-layer attention probabilities, each (B, H, N, N), first layer first
            (e.g. a HuggingFace model's ``outputs.attentions``).
        start_layer: first layer of the product; negative values count from the end.

    Returns:
        (B, N, N); row 0 is the CLS token's rollout.
    """
    if not torch.jit.is_scripting():
        if not isinstance(attentions, (list, tuple)):
            raise TypeError("relfast.rollout: argument 'attentions' must be a list of (B, H, N, N) tensors, got "
                            + type(attentions).__name__)
        _check_tensors("rollout", *[(f"attentions[{i}]", a) for i, a in enumerate(attentions)])
    if len(attentions) == 0:  # no tensor to pick a backend from: the dispatcher can't get to the op's own check
        raise ValueError("relfast.rollout: argument 'attentions' must hold at least one layer's attention tensor "
                         "(B, H, N, N), got an empty list")
    return torch.ops.relfast.rollout(attentions, start_layer)


def _check_tensors(op, *named_values):
    """Non-tensors (numpy arrays, lists) would reach the dispatcher's generic type error."""
    for name, value in named_values:
        if not isinstance(value, Tensor):
            hint = " (convert it with torch.from_numpy)" if type(value).__module__ == "numpy" else ""
            raise TypeError(f"relfast.{op}: argument '{name}' must be a torch.Tensor, got "
                            f"{type(value).__module__}.{type(value).__qualname__}{hint}")


def built_with_cuda() -> bool:
    """Whether this build of relfast contains the CUDA kernels."""
    return torch.ops.relfast._built_with_cuda()


# ---- fake kernels: output metadata for torch.compile / torch.export (values are not computed;
# the real kernels validate again at run time) ----

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_rank(t: Tensor, rank: int, op: str, name: str, layout: str, like: Tensor = None) -> None:
    torch._check_value(t.dtype in _FLOAT_DTYPES, lambda: f"relfast.{op}: argument '{name}' must be float16, "
                                                        f"bfloat16, float32 or float64, got {t.dtype}")
    torch._check_value(t.dim() == rank, lambda: f"relfast.{op}: argument '{name}' must be a {rank}-D tensor of "
                                               f"shape {layout}, got shape {tuple(t.shape)}")
    if like is not None:
        torch._check_value(t.dtype == like.dtype and t.device == like.device,
                           lambda: f"relfast.{op}: argument '{name}' ({t.dtype}, {t.device}) must have the dtype "
                                   f"and device of the first argument ({like.dtype}, {like.device})")


def _check_dim(t: Tensor, d: int, expected, op: str, name: str) -> None:
    torch._check_value(t.shape[d] == expected, lambda: f"relfast.{op}: argument '{name}' has shape "
                                                       f"{tuple(t.shape)} but its dimension {d} must be {expected}")


@torch.library.register_fake("relfast::head_mean_grad_attn")
def _head_mean_grad_attn_fake(grad, attn):
    for name, t in (("grad", grad), ("attn", attn)):
        _check_rank(t, 4, "head_mean_grad_attn", name, "(B, H, Nq, Nk)", like=grad)
    for d in range(4):
        _check_dim(attn, d, grad.shape[d], "head_mean_grad_attn", "attn")
    return grad.new_empty((grad.shape[0], grad.shape[2], grad.shape[3]))


def _check_relevance_update(R, abar):
    _check_rank(R, 3, "relevance_update", "R", "(B, N, M)")
    _check_rank(abar, 3, "relevance_update", "abar", "(B, N, N)", like=R)
    for d, expected in ((0, R.shape[0]), (1, R.shape[1]), (2, R.shape[1])):
        _check_dim(abar, d, expected, "relevance_update", "abar")


@torch.library.register_fake("relfast::relevance_update")
def _relevance_update_fake(R, abar, *, aggregate=True):
    _check_relevance_update(R, abar)
    return torch.empty_like(R, memory_format=torch.contiguous_format)


@torch.library.register_fake("relfast::relevance_update_")
def _relevance_update_inplace_fake(R, abar, *, aggregate=True):
    _check_relevance_update(R, abar)


@torch.library.register_fake("relfast::row_relevance_update")
def _row_relevance_update_fake(v, grad, attn, *, aggregate=True):
    op = "row_relevance_update"
    _check_rank(v, 3, op, "v", "(B, K, N)")
    for name, t in (("grad", grad), ("attn", attn)):
        _check_rank(t, 4, op, name, "(B, H, N, N)", like=v)
        for d, expected in ((0, v.shape[0]), (1, grad.shape[1]), (2, v.shape[2]), (3, v.shape[2])):
            _check_dim(t, d, expected, op, name)
    return torch.empty_like(v, memory_format=torch.contiguous_format)


@torch.library.register_fake("relfast::sdpa_row_relevance_update")
def _sdpa_row_relevance_update_fake(v, query, key, value, grad_out, logsumexp, attn_mask=None, *, is_causal=False,
                                    scale=None, aggregate=True):
    op = "sdpa_row_relevance_update"
    _check_rank(v, 3, op, "v", "(B, K, Nq)")
    for name, t, layout in (("query", query, "(B, H, Nq, D)"), ("key", key, "(B, H_kv, Nk, D)"),
                            ("value", value, "(B, H_kv, Nk, Dv)"), ("grad_out", grad_out, "(B, H, Nq, Dv)")):
        _check_rank(t, 4, op, name, layout, like=v)
    _check_rank(logsumexp, 3, op, "logsumexp", "(B, H, Nq)")
    B, Nq, H = v.shape[0], v.shape[2], query.shape[1]
    for name, t, dims in (("query", query, {0: B, 2: Nq}), ("key", key, {0: B, 3: query.shape[3]}),
                          ("value", value, {0: B, 1: key.shape[1], 2: key.shape[2]}),
                          ("grad_out", grad_out, {0: B, 1: H, 2: Nq, 3: value.shape[3]}),
                          ("logsumexp", logsumexp, {0: B, 1: H, 2: Nq})):
        for d, expected in dims.items():
            _check_dim(t, d, expected, op, name)
    torch._check_value(H % key.shape[1] == 0, lambda: f"relfast.{op}: the {H} query heads must be a multiple of the "
                                                       f"{key.shape[1]} key/value heads")
    torch._check_value(not aggregate or key.shape[2] == Nq,
                       lambda: f"relfast.{op}: with aggregate=True the attention must be self-attention (Nk == Nq)")
    return v.new_empty((B, v.shape[1], key.shape[2]))


@torch.library.register_fake("relfast::normalize_residual")
def _normalize_residual_fake(R):
    _check_rank(R, 3, "normalize_residual", "R", "(B, N, N)")
    _check_dim(R, 2, R.shape[1], "normalize_residual", "R")
    return torch.empty_like(R, memory_format=torch.contiguous_format)


@torch.library.register_fake("relfast::bimodal_update")
def _bimodal_update_fake(R_sq, R_ss, abar, R_qq, *, normalize=True):
    op = "bimodal_update"
    B, S, Q = R_sq.shape if R_sq.dim() == 3 else (None, None, None)
    _check_rank(R_sq, 3, op, "R_sq", "(B, S, Q)")
    for name, t, shape in (("R_ss", R_ss, (B, S, S)), ("abar", abar, (B, S, Q)), ("R_qq", R_qq, (B, Q, Q))):
        _check_rank(t, 3, op, name, str(shape), like=R_sq)
        for d in range(3):
            _check_dim(t, d, shape[d], op, name)
    return torch.empty_like(R_sq, memory_format=torch.contiguous_format)


@torch.library.register_fake("relfast::rollout")
def _rollout_fake(attentions, start_layer=0):
    torch._check_value(len(attentions) > 0, lambda: "relfast.rollout: argument 'attentions' must not be empty")
    first = attentions[0]
    _check_rank(first, 4, "rollout", "attentions[0]", "(B, H, N, N)")
    for i, attn in enumerate(attentions):
        _check_rank(attn, 4, "rollout", f"attentions[{i}]", "(B, H, N, N)", like=first)
        for d in range(4):
            _check_dim(attn, d, first.shape[d], "rollout", f"attentions[{i}]")
    torch._check_value(-len(attentions) <= start_layer < len(attentions),
                 lambda: f"relfast.rollout: argument 'start_layer' must lie in [{-len(attentions)}, {len(attentions)})")
    return first.new_empty((first.shape[0], first.shape[2], first.shape[3]))
