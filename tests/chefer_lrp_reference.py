"""The LRP and partial-LRP baselines of the papers' public code (hila-chefer/Transformer-
Explainability, ``baselines/ViT/ViT_orig_LRP.py`` with ``modules/layers_lrp.py``), written again
here from their rules, for one image at a time, on explicit tensors. That code could not be run
here; this is an independent implementation of its rules (no autograd, nothing of relfast):

- the model is the papers' ViT (pre-LN blocks; patch embedding, class token, position table;
  final LayerNorm; the class token read by ``index_select``; a linear head), run from the weights
  of a timm, HF or torchvision ViT (:func:`from_timm`, :func:`from_hf`, :func:`from_torchvision`),
  in float64 (``DTYPE``);
- the relevance is seeded with 1 at the target logit; every division is the papers'
  ``safe_divide``;
- linear layers: LRP-αβ (α=1, β=0) with the positive and negative contributions divided each by
  their own sum (the separate-sum version of ``layers_lrp.py``);
- the patch embedding (the pixel layer): the zᴮ rule bounded by the image's smallest and largest
  value, ``+1e-9`` on its denominator (no safe division);
- the two attention products: the z-rule per operand, each operand's share halved; partial LRP
  reads the attention map's share after halving;
- skip connections, the position table, the class-token read and the copies: the z-rule;
- LayerNorm, GELU, softmax: relevance passes unchanged.

``papers_eps=False`` swaps the papers' handling of near-zero denominators for relfast's: its
``safe_divide`` moves a denominator 1e-9 away from zero keeping its sign, where the papers' adds
+1e-9 whatever the sign; its copies and its class-token read route relevance exactly, where the
papers' z-rule multiplies by ``x / (x + 1e-9)``. The algorithm is the same; with those 1e-9 alike
it agrees with relfast to rounding.
"""
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

DTYPE = torch.float64


def safe_divide(a, b):
    """The papers' safe division: the denominator shifted by +1e-9 (either sign), 0 where b is 0."""
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + (den == 0).to(den.dtype) * 1e-9
    return a / den * (b != 0).to(b.dtype)


def signed_divide(a, b):
    """relfast's convention: the denominator moved 1e-9 away from zero, keeping its sign."""
    den = torch.where(b < 0, b - 1e-9, b + 1e-9)
    return torch.where(b == 0, torch.zeros_like(a * b), a / den)


# ---- the model, as explicit weights ----

@dataclass
class Block:
    norm1: Tuple[torch.Tensor, torch.Tensor, float]
    qkv: Tuple[torch.Tensor, torch.Tensor]  # (3D, D): rows q, k, v, each head after head
    proj: Tuple[torch.Tensor, torch.Tensor]
    norm2: Tuple[torch.Tensor, torch.Tensor, float]
    fc1: Tuple[torch.Tensor, torch.Tensor]
    fc2: Tuple[torch.Tensor, torch.Tensor]


@dataclass
class ViT:
    patch: int
    conv: Tuple[torch.Tensor, torch.Tensor]  # (D, C, p, p), (D,)
    cls: torch.Tensor  # (D,)
    pos: torch.Tensor  # (N, D)
    heads: int
    blocks: List[Block]
    norm: Tuple[torch.Tensor, torch.Tensor, float]
    head: Tuple[torch.Tensor, torch.Tensor]


def _own(*tensors):
    return tuple(t.detach().to(DTYPE) for t in tensors)


def _norm(module, eps=None):
    return (*_own(module.weight, module.bias), module.eps if eps is None else eps)


def from_timm(model) -> ViT:
    blocks = [Block(_norm(b.norm1), _own(b.attn.qkv.weight, b.attn.qkv.bias), _own(b.attn.proj.weight, b.attn.proj.bias),
                    _norm(b.norm2), _own(b.mlp.fc1.weight, b.mlp.fc1.bias), _own(b.mlp.fc2.weight, b.mlp.fc2.bias))
              for b in model.blocks]
    conv = model.patch_embed.proj
    return ViT(conv.kernel_size[0], _own(conv.weight, conv.bias), _own(model.cls_token[0, 0])[0],
               _own(model.pos_embed[0])[0], model.blocks[0].attn.num_heads, blocks, _norm(model.norm),
               _own(model.head.weight, model.head.bias))


def from_hf(model) -> ViT:
    body, eps = model.vit, model.config.layer_norm_eps
    blocks = []
    for layer in body.layers:
        att = layer.attention
        projections = (att.q_proj, att.k_proj, att.v_proj)
        qkv = torch.cat([m.weight for m in projections]), torch.cat([m.bias for m in projections])
        blocks.append(Block(_norm(layer.layernorm_before, eps), _own(*qkv), _own(att.o_proj.weight, att.o_proj.bias),
                            _norm(layer.layernorm_after, eps), _own(layer.mlp.fc1.weight, layer.mlp.fc1.bias),
                            _own(layer.mlp.fc2.weight, layer.mlp.fc2.bias)))
    emb = body.embeddings
    conv = emb.patch_embeddings.projection
    return ViT(model.config.patch_size, _own(conv.weight, conv.bias), _own(emb.cls_token[0, 0])[0],
               _own(emb.position_embeddings[0])[0], model.config.num_attention_heads, blocks,
               _norm(body.layernorm, eps), _own(model.classifier.weight, model.classifier.bias))


def from_torchvision(model) -> ViT:
    blocks = []
    for layer in model.encoder.layers:
        att = layer.self_attention
        blocks.append(Block(_norm(layer.ln_1), _own(att.in_proj_weight, att.in_proj_bias),
                            _own(att.out_proj.weight, att.out_proj.bias), _norm(layer.ln_2),
                            _own(layer.mlp[0].weight, layer.mlp[0].bias), _own(layer.mlp[3].weight, layer.mlp[3].bias)))
    conv = model.conv_proj
    return ViT(conv.kernel_size[0], _own(conv.weight, conv.bias), _own(model.class_token[0, 0])[0],
               _own(model.encoder.pos_embedding[0])[0], model.encoder.layers[0].self_attention.num_heads, blocks,
               _norm(model.encoder.ln), _own(model.heads.head.weight, model.heads.head.bias))


# ---- relprop of each layer, one sample ----

def linear_relprop(x, weight, R, divide):
    """x (n, in), weight (out, in), R (n, out): αβ (α=1, β=0), separate sums."""
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), weight.clamp(min=0), weight.clamp(max=0)
    s1 = divide(R, xp @ wp.T)
    s2 = divide(R, xn @ wn.T)
    return xp * (s1 @ wp) + xn * (s2 @ wn)


def add_relprop(u, v, R, divide):
    """u + v: the z-rule, (R_u, R_v)."""
    s = divide(R, u + v)
    return u * s, v * s


def copy_relprop(x, relevances, divide):
    """A tensor used once per entry of ``relevances`` (or read at some entries): the z-rule of the
    copy; ``divide`` None: the exact sum."""
    if divide is None:
        return sum(relevances)
    return x * sum(divide(r, x) for r in relevances)


def product_relprop(u, v, R, divide):
    """u @ v per head (H, n, m) @ (H, m, d): the z-rule per operand, each halved."""
    s = divide(R, u @ v)
    return u * (s @ v.transpose(-1, -2)) / 2, v * (u.transpose(-1, -2) @ s) / 2


def patches_of(image, patch):
    """(C, H, W) -> (h·w, C·p·p), the windows the stride-p convolution reads, and (h, w)."""
    C, H, W = image.shape
    h, w = H // patch, W // patch
    x = image[:, :h * patch, :w * patch].reshape(C, h, patch, w, patch)
    return x.permute(1, 3, 0, 2, 4).reshape(h * w, C * patch * patch), (h, w)


def zbox_relprop(image, weight, patch, R):
    """The zᴮ rule on the patch embedding: image (C, H, W), weight (D, C, p, p), R (h·w, D) ->
    (C, H, W); the bounds are the whole image's extremes; pixels no window reads get 0."""
    C = image.shape[0]
    low, high = image.min(), image.max()
    x, (h, w) = patches_of(image, patch)
    wm = weight.reshape(weight.shape[0], -1)
    wp, wn = wm.clamp(min=0), wm.clamp(max=0)
    ones = torch.ones_like(x)
    z = x @ wm.T - (low * ones) @ wp.T - (high * ones) @ wn.T + 1e-9
    s = R / z
    r = x * (s @ wm) - low * (s @ wp) - high * (s @ wn)
    out = torch.zeros_like(image)
    out[:, :h * patch, :w * patch] = r.reshape(h, w, C, patch, patch).permute(2, 0, 3, 1, 4).reshape(
        C, h * patch, w * patch)
    return out


def layer_norm(x, params):
    weight, bias, eps = params
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


# ---- the forward and the relevance pass ----

def relevance(vit: ViT, image: torch.Tensor, target: int, papers_eps: bool = True) -> Dict[str, torch.Tensor]:
    """One image (C, H, W): ``lrp`` (H, W), the pixel relevance summed over channels, and
    ``partial_lrp`` (N,), the CLS row of the last attention map's relevance (clamped at 0, mean
    over heads; the papers' map is its columns 1:)."""
    divide = safe_divide if papers_eps else signed_divide
    copy_divide = safe_divide if papers_eps else None
    image = image.detach().to(DTYPE)
    weight, bias = vit.conv
    tokens = patches_of(image, vit.patch)[0] @ weight.reshape(weight.shape[0], -1).T + bias  # the convolution
    D, heads = tokens.shape[1], vit.heads
    hd = D // heads
    e0 = torch.cat([vit.cls[None], tokens])
    x = e0 + vit.pos
    n = x.shape[0]
    saved = []
    for block in vit.blocks:
        h = layer_norm(x, block.norm1)
        qkv = h @ block.qkv[0].T + block.qkv[1]
        q, k, v = qkv.reshape(n, 3, heads, hd).permute(1, 2, 0, 3)  # each (H, n, hd)
        A = torch.softmax((q @ k.transpose(-1, -2)) * hd ** -0.5, dim=-1)
        ctx = (A @ v).transpose(0, 1).reshape(n, D)
        o = ctx @ block.proj[0].T + block.proj[1]
        x_mid = x + o
        h2 = layer_norm(x_mid, block.norm2)
        g = F.gelu(h2 @ block.fc1[0].T + block.fc1[1])
        m = g @ block.fc2[0].T + block.fc2[1]
        saved.append(dict(x=x, h=h, q=q, k=k, v=v, A=A, ctx=ctx, o=o, x_mid=x_mid, h2=h2, g=g, m=m))
        x = x_mid + m
    final = layer_norm(x, vit.norm)
    pooled = final[0]
    logits = pooled @ vit.head[0].T + vit.head[1]

    R_logits = torch.zeros_like(logits)
    R_logits[target] = 1
    R_pooled = linear_relprop(pooled[None], vit.head[0], R_logits[None], divide)[0]
    R = torch.zeros_like(final)
    R[0] = copy_relprop(pooled, [R_pooled], copy_divide)  # the class token's row, read by index_select
    attention_relevance = None
    for block, s in zip(reversed(vit.blocks), reversed(saved)):
        R_mid_skip, R_m = add_relprop(s["x_mid"], s["m"], R, divide)
        R_g = linear_relprop(s["g"], block.fc2[0], R_m, divide)
        R_h2 = linear_relprop(s["h2"], block.fc1[0], R_g, divide)  # through GELU
        R_mid = copy_relprop(s["x_mid"], [R_mid_skip, R_h2], copy_divide)  # through norm2
        R_skip, R_o = add_relprop(s["x"], s["o"], R_mid, divide)
        R_ctx = linear_relprop(s["ctx"], block.proj[0], R_o, divide).reshape(n, heads, hd).transpose(0, 1)
        R_A, R_v = product_relprop(s["A"], s["v"], R_ctx, divide)
        if attention_relevance is None:
            attention_relevance = R_A  # the last block's, after halving
        R_q, R_kT = product_relprop(s["q"], s["k"].transpose(-1, -2), R_A, divide)  # softmax, scale pass
        R_qkv = torch.stack([R_q, R_kT.transpose(-1, -2), R_v]).permute(2, 0, 1, 3).reshape(n, 3 * D)
        R_h = linear_relprop(s["h"], block.qkv[0], R_qkv, divide)
        R = copy_relprop(s["x"], [R_skip, R_h], copy_divide)  # through norm1
    R_e0, _ = add_relprop(e0, vit.pos, R, divide)  # the position table takes its share away
    pixels = zbox_relprop(image, weight, vit.patch, R_e0[1:])  # the class token is a parameter: dropped
    return {"lrp": pixels.sum(dim=0), "partial_lrp": attention_relevance.clamp(min=0).mean(dim=0)[0],
            "logits": logits}
