"""A plain float64, one-sample-at-a-time implementation of the [P1] relevance rules, written apart
from relfast's engine: each model is run by hand from its weights, keeping every intermediate, and
relevance is propagated back with explicit per-layer functions (no autograd tricks). Autograd is
used only for the attention gradients ∇A that transformer attribution weights R_A with.

Rules (SPEC.md, [P1]): αβ (α=1, β=0) for linear and convolution layers; pass-through for
LayerNorm, GELU, softmax and scaling; the z-rule per operand for the two attention products (each
halved with the CVPR rules) and for sums (then Eq. 9 of seed 000 with the CVPR rules). lrp and
partial_lrp take the "textbook" rules here (one αβ sum, nothing halved); the text families also
take ``rules="paper"``, the op-level choices of the papers' code (separate αβ sums, products
halved; its ViT, with the pixel layer's zᴮ rule, is tests/chefer_lrp_reference.py).
"""
import math

import torch
import torch.nn.functional as F

EPS = 1e-9


def divide(a, b):
    den = b + torch.where(b >= 0, torch.full_like(b, EPS), torch.full_like(b, -EPS))
    return torch.where(b == 0, torch.zeros_like(a * b), a / den)


# ---- rules on single samples ----

def linear_relevance(x, weight, R):
    """x (..., in), weight (out, in), R (..., out) -> (..., in)."""
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), weight.clamp(min=0), weight.clamp(max=0)
    z = xp @ wp.T + xn @ wn.T
    s = divide(R, z)
    return xp * (s @ wp) + xn * (s @ wn)


def separate_linear_relevance(x, weight, R):
    """The papers' code's αβ (α=1, β=0): positive and negative contributions each divided by their
    own sum."""
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), weight.clamp(min=0), weight.clamp(max=0)
    return xp * (divide(R, xp @ wp.T) @ wp) + xn * (divide(R, xn @ wn.T) @ wn)


def rule_choices(method, rules):
    """(products halved, the linear rule) of a method's rules: ``rules`` "textbook" or "paper"
    (the papers' code: separate αβ sums, halved products) for lrp and partial_lrp; the CVPR rules
    (halved, one αβ sum; Eq. 9 on sums, by ``conserve``) for transformer attribution."""
    if method == "transformer_attribution":
        return True, linear_relevance
    assert rules in ("textbook", "paper"), rules
    return rules == "paper", separate_linear_relevance if rules == "paper" else linear_relevance


def conv_patch_relevance(pixels, weight, patch, R):
    """Non-overlapping patch embedding (stride = kernel = patch): pixels (C, H, W), weight
    (D, C, p, p), R (D, h, w) -> (C, H, W), as a linear layer on each patch."""
    C, H, W = pixels.shape
    D = weight.shape[0]
    h, w = H // patch, W // patch
    patches = pixels.reshape(C, h, patch, w, patch).permute(1, 3, 0, 2, 4).reshape(h * w, C * patch * patch)
    r = linear_relevance(patches, weight.reshape(D, -1), R.reshape(D, h * w).T)
    return r.reshape(h, w, C, patch, patch).permute(2, 0, 3, 1, 4).reshape(C, H, W)


def sum_relevance(u, v, R, conserve):
    """u + v (v may broadcast) -> (R_u, R_v) in the output's shape."""
    z = u + v
    ru, rv = u * divide(R, z), v * divide(R, z)
    if conserve:
        su, sv, total = ru.sum(), rv.sum(), R.sum()
        ru = ru * divide(divide(su.abs(), su.abs() + sv.abs()) * total, su)
        rv = rv * divide(divide(sv.abs(), su.abs() + sv.abs()) * total, sv)
    return ru, rv


def product_relevance(u, v, R, conserve):
    """u @ v (per head) -> (R_u, R_v)."""
    s = divide(R, u @ v)
    ru, rv = u * (s @ v.transpose(-1, -2)), v * (u.transpose(-1, -2) @ s)
    return (ru / 2, rv / 2) if conserve else (ru, rv)


def layer_norm(x, module):
    return F.layer_norm(x, (x.shape[-1],), module.weight, module.bias, module.eps)


# ---- HF ViT / DeiT ----

def hf_vit_relevance(model, pixels, target, method, start_layer=1):
    """One image (C, H, W) of an HF ViT or DeiT classifier (float64): the CLS-row map over tokens
    (transformer_attribution, partial_lrp) or the pixel map (lrp, (H, W))."""
    conserve = method == "transformer_attribution"
    name = type(model).__name__
    body = model.deit if name.startswith("DeiT") else model.vit
    heads = model.config.num_attention_heads
    patch = model.config.patch_size
    emb = body.embeddings
    conv = emb.patch_embeddings.projection
    pixels = pixels.detach()

    # forward, keeping what the rules need
    tokens = F.conv2d(pixels[None], conv.weight, conv.bias, stride=patch)[0]  # (D, h, w)
    D = tokens.shape[0]
    specials = [emb.cls_token[0]] + ([emb.distillation_token[0]] if name.startswith("DeiT") else [])
    e0 = torch.cat(specials + [tokens.flatten(1).T])  # (N, D)
    pos = emb.position_embeddings[0]
    x = e0 + pos
    saved, attentions = [], []
    for layer in body.layers:
        att = layer.attention
        h = layer_norm(x, layer.layernorm_before)
        q, k, v = (F.linear(h, m.weight, m.bias).reshape(-1, heads, D // heads).transpose(0, 1)
                   for m in (att.q_proj, att.k_proj, att.v_proj))
        scores = q @ k.transpose(-1, -2)
        A = torch.softmax(scores / (D // heads) ** 0.5, dim=-1)
        A.retain_grad()
        ctx = (A @ v).transpose(0, 1).reshape(-1, D)
        o = F.linear(ctx, att.o_proj.weight, att.o_proj.bias)
        x1 = x + o
        h2 = layer_norm(x1, layer.layernorm_after)
        i = F.gelu(F.linear(h2, layer.mlp.fc1.weight, layer.mlp.fc1.bias))
        m = F.linear(i, layer.mlp.fc2.weight, layer.mlp.fc2.bias)
        saved.append(dict(x=x, h=h, q=q, k=k, v=v, A=A, ctx=ctx, o=o, x1=x1, h2=h2, i=i, m=m))
        attentions.append(A)
        x = x1 + m
    final = layer_norm(x, body.layernorm)
    if name == "DeiTForImageClassificationWithTeacher":
        a = F.linear(final[0], model.cls_classifier.weight, model.cls_classifier.bias)
        b = F.linear(final[1], model.distillation_classifier.weight, model.distillation_classifier.bias)
        logits = (a + b) / 2
    else:
        head = model.classifier
        logits = F.linear(final[0], head.weight, head.bias)
    gradients = None
    if method == "transformer_attribution":
        logits[target].backward()
        gradients = [A.grad for A in attentions]

    # relevance, from the one-hot target down
    with torch.no_grad():
        R_logits = torch.zeros_like(logits)
        R_logits[target] = 1
        R_final = torch.zeros_like(final)
        if name == "DeiTForImageClassificationWithTeacher":
            ra, rb = sum_relevance(a, b, R_logits, conserve)  # the /2 is a scaling: relevance passes
            R_final[0] = linear_relevance(final[0], model.cls_classifier.weight, ra)
            R_final[1] = linear_relevance(final[1], model.distillation_classifier.weight, rb)
        else:
            R_final[0] = linear_relevance(final[0], model.classifier.weight, R_logits)
        R = R_final  # through the final LayerNorm
        attention_relevance = [None] * len(saved)
        for l in reversed(range(len(saved))):
            s = saved[l]
            layer = body.layers[l]
            att = layer.attention
            R_x1, R_m = sum_relevance(s["x1"], s["m"], R, conserve)
            R_i = linear_relevance(s["i"], layer.mlp.fc2.weight, R_m)
            R_h2 = linear_relevance(s["h2"], layer.mlp.fc1.weight, R_i)  # through GELU
            R_x1 = R_x1 + R_h2  # through layernorm_after; the residual copy sums both uses
            R_x, R_o = sum_relevance(s["x"], s["o"], R_x1, conserve)
            R_ctx = linear_relevance(s["ctx"], att.o_proj.weight, R_o)
            R_ctx = R_ctx.reshape(-1, heads, D // heads).transpose(0, 1)
            R_A, R_v = product_relevance(s["A"], s["v"], R_ctx, conserve)
            attention_relevance[l] = R_A
            R_q, R_kT = product_relevance(s["q"], s["k"].transpose(-1, -2), R_A, conserve)  # softmax, scale pass
            R_h = sum(linear_relevance(s["h"], m.weight, r.transpose(0, 1).reshape(-1, D))
                      for m, r in ((att.q_proj, R_q), (att.k_proj, R_kT.transpose(-1, -2)), (att.v_proj, R_v)))
            R = R_x + R_h  # through layernorm_before; both uses of x
        if method == "partial_lrp":
            return attention_relevance[-1].clamp(min=0).mean(dim=0)[0]
        if method == "transformer_attribution":
            N = e0.shape[0]
            C = torch.eye(N, dtype=pixels.dtype)
            for l in range(start_layer % len(saved), len(saved)):
                Abar = (gradients[l] * attention_relevance[l]).clamp(min=0).mean(dim=0)
                C = (torch.eye(N, dtype=pixels.dtype) + Abar) @ C
            return C[0]
        # lrp: through the position table (its share leaves), the special tokens, the patch embedding
        R_e0, _ = sum_relevance(e0, pos, R, conserve)
        R_tokens = R_e0[len(specials):].T.reshape(D, *tokens.shape[1:])
        return conv_patch_relevance(pixels, conv.weight, patch, R_tokens).sum(dim=0)


# ---- shared encoder-block propagation (pre-LN ViT-style and post-LN BERT-style) ----

def attention_forward(h, q_lin, k_lin, v_lin, heads, mask_bias=None):
    D = h.shape[-1]
    q, k, v = (F.linear(h, m.weight, m.bias).reshape(-1, heads, D // heads).transpose(0, 1) for m in (q_lin, k_lin, v_lin))
    scores = q @ k.transpose(-1, -2) / (D // heads) ** 0.5
    A = torch.softmax(scores if mask_bias is None else scores + mask_bias, dim=-1)
    A.retain_grad()
    return dict(h=h, q=q, k=k, v=v, A=A, ctx=(A @ v).transpose(0, 1).reshape(-1, D))


def attention_relevance(s, q_w, k_w, v_w, R_ctx, heads, conserve, linear=linear_relevance):
    """From the relevance of the heads' concatenated output to (R of h, R_A); ``conserve``:
    products halved."""
    D = s["h"].shape[-1]
    R_ctx = R_ctx.reshape(-1, heads, D // heads).transpose(0, 1)
    R_A, R_v = product_relevance(s["A"], s["v"], R_ctx, conserve)
    R_q, R_kT = product_relevance(s["q"], s["k"].transpose(-1, -2), R_A, conserve)
    R_h = sum(linear(s["h"], w, r.transpose(0, 1).reshape(-1, D))
              for w, r in ((q_w, R_q), (k_w, R_kT.transpose(-1, -2)), (v_w, R_v)))
    return R_h, R_A


def start(logits, target, method, saved):
    """∇A of every layer (transformer attribution only) and the one-hot relevance of the logits."""
    gradients = None
    if method == "transformer_attribution":
        logits[target].backward()
        gradients = [s["A"].grad for s in saved]
    R_logits = torch.zeros_like(logits).detach()
    R_logits[target] = 1
    return gradients, R_logits


def attribution(gradients, attention_relevance_per_layer, start_layer, n, dtype):
    C = torch.eye(n, dtype=dtype)
    for l in range(start_layer % len(gradients), len(gradients)):
        Abar = (gradients[l] * attention_relevance_per_layer[l]).clamp(min=0).mean(dim=0)
        C = (torch.eye(n, dtype=dtype) + Abar) @ C
    return C[0]


# ---- HF BERT-family classifier (BERT) ----

def hf_bert_relevance(model, input_ids, target, method, start_layer=1, rules="textbook"):
    """One unpadded sequence (N,) of an HF BertForSequenceClassification (float64): the CLS-row map
    (transformer_attribution, partial_lrp) or the word embeddings' relevance (lrp)."""
    conserve = method == "transformer_attribution"  # Eq. 9 on sums
    halve, linear = rule_choices(method, rules)
    bert, heads = model.bert, model.config.num_attention_heads
    emb = bert.embeddings
    n = input_ids.shape[0]
    word = emb.word_embeddings.weight[input_ids]
    kind = emb.token_type_embeddings.weight[torch.zeros(n, dtype=torch.long)]
    position = emb.position_embeddings.weight[:n]
    e1 = word + kind
    x = layer_norm(e1 + position, emb.LayerNorm)
    saved = []
    for layer in bert.encoder.layer:
        a = attention_forward(x, layer.attention.self.query, layer.attention.self.key, layer.attention.self.value, heads)
        o = F.linear(a["ctx"], layer.attention.output.dense.weight, layer.attention.output.dense.bias)
        x1 = layer_norm(o + x, layer.attention.output.LayerNorm)
        i = F.gelu(F.linear(x1, layer.intermediate.dense.weight, layer.intermediate.dense.bias))
        m = F.linear(i, layer.output.dense.weight, layer.output.dense.bias)
        saved.append(dict(a, x=x, o=o, x1=x1, i=i, m=m))
        x = layer_norm(m + x1, layer.output.LayerNorm)
    pooled = torch.tanh(F.linear(x[0], bert.pooler.dense.weight, bert.pooler.dense.bias))
    logits = F.linear(pooled, model.classifier.weight, model.classifier.bias)
    gradients, R_logits = start(logits, target, method, saved)
    with torch.no_grad():
        R_pooled = linear(pooled, model.classifier.weight, R_logits)  # through the dropout
        R = torch.zeros_like(x)
        R[0] = linear(x[0], bert.pooler.dense.weight, R_pooled)  # through tanh
        per_layer = [None] * len(saved)
        for l in reversed(range(len(saved))):
            s, layer = saved[l], bert.encoder.layer[l]
            R_m, R_x1 = sum_relevance(s["m"], s["x1"], R, conserve)  # through output.LayerNorm
            R_i = linear(s["i"], layer.output.dense.weight, R_m)
            R_x1 = R_x1 + linear(s["x1"], layer.intermediate.dense.weight, R_i)
            R_o, R_x = sum_relevance(s["o"], s["x"], R_x1, conserve)  # through attention.output.LayerNorm
            R_ctx = linear(s["ctx"], layer.attention.output.dense.weight, R_o)
            att = layer.attention.self
            R_h, per_layer[l] = attention_relevance(s, att.query.weight, att.key.weight, att.value.weight, R_ctx, heads,
                                                    halve, linear)
            R = R_x + R_h
        if method == "partial_lrp":
            return per_layer[-1].clamp(min=0).mean(dim=0)[0]
        if method == "transformer_attribution":
            return attribution(gradients, per_layer, start_layer, n, x.dtype)
        R_e1, _ = sum_relevance(e1, position, R, conserve)  # through the embeddings' LayerNorm
        R_word, _ = sum_relevance(word, kind, R_e1, conserve)
        return R_word.sum(dim=-1)


# ---- timm VisionTransformer (class token, no register tokens) ----

def timm_vit_relevance(model, pixels, target, method, start_layer=1):
    conserve = method == "transformer_attribution"
    heads = model.blocks[0].attn.num_heads
    conv = model.patch_embed.proj
    patch = conv.kernel_size[0]
    pixels = pixels.detach()
    tokens = F.conv2d(pixels[None], conv.weight, conv.bias, stride=patch)[0]
    D = tokens.shape[0]
    e0 = torch.cat([model.cls_token[0], tokens.flatten(1).T])
    pos = model.pos_embed[0]
    x = e0 + pos
    saved = []
    for block in model.blocks:
        h = layer_norm(x, block.norm1)
        W, b = block.attn.qkv.weight, block.attn.qkv.bias
        lin = [torch.nn.Linear(D, D).double() for _ in range(3)]
        for j, m in enumerate(lin):  # the fused qkv projection, split into its three parts
            m.weight.data, m.bias.data = W[j * D:(j + 1) * D].detach(), b[j * D:(j + 1) * D].detach()
        a = attention_forward(h, *lin, heads)
        o = F.linear(a["ctx"], block.attn.proj.weight, block.attn.proj.bias)
        x1 = x + o
        h2 = layer_norm(x1, block.norm2)
        i = F.gelu(F.linear(h2, block.mlp.fc1.weight, block.mlp.fc1.bias))
        m = F.linear(i, block.mlp.fc2.weight, block.mlp.fc2.bias)
        saved.append(dict(a, x=x, o=o, x1=x1, h2=h2, i=i, m=m, qkv=[l.weight for l in lin]))
        x = x1 + m
    final = layer_norm(x, model.norm)
    logits = F.linear(final[0], model.head.weight, model.head.bias)
    gradients, R_logits = start(logits, target, method, saved)
    with torch.no_grad():
        R = torch.zeros_like(final)
        R[0] = linear_relevance(final[0], model.head.weight, R_logits)
        per_layer = [None] * len(saved)
        for l in reversed(range(len(saved))):
            s, block = saved[l], model.blocks[l]
            R_x1, R_m = sum_relevance(s["x1"], s["m"], R, conserve)
            R_i = linear_relevance(s["i"], block.mlp.fc2.weight, R_m)
            R_x1 = R_x1 + linear_relevance(s["h2"], block.mlp.fc1.weight, R_i)
            R_x, R_o = sum_relevance(s["x"], s["o"], R_x1, conserve)
            R_ctx = linear_relevance(s["ctx"], block.attn.proj.weight, R_o)
            R_h, per_layer[l] = attention_relevance(s, *s["qkv"], R_ctx, heads, conserve)
            R = R_x + R_h
        if method == "partial_lrp":
            return per_layer[-1].clamp(min=0).mean(dim=0)[0]
        if method == "transformer_attribution":
            return attribution(gradients, per_layer, start_layer, e0.shape[0], pixels.dtype)
        R_e0, _ = sum_relevance(e0, pos, R, conserve)
        return conv_patch_relevance(pixels, conv.weight, patch, R_e0[1:].T.reshape(D, *tokens.shape[1:])).sum(dim=0)


# ---- HF causal LMs: GPT-2, and Llama / Qwen2 / Mistral (RMSNorm, rotary, grouped-query heads, gated MLP) ----
#
# Rules beyond the encoders' (relfast/explain/lrp/rules.py states the same choices): GPT-2's Conv1D
# (x·W + b, W (in, out)) is a linear layer (αβ); gelu_new and SiLU are activations and RMSNorm a
# normalisation: relevance passes through (the normaliser a constant, as for LayerNorm); rotary
# embeddings q·cos + rotate_half(q)·sin are a linear map with constant coefficients: its z-rule
# (no Eq. 9); the gated product act(gate)·up takes the z-rule per operand, halved with the CVPR rules.

def causal_attention(q, k, v, scale):
    """q (H, n, d), k and v (H, n, d) (key heads already repeated): softmax with the causal mask."""
    n = q.shape[1]
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2)) * scale
    A = torch.softmax(scores.masked_fill(~mask, torch.finfo(q.dtype).min), dim=-1)
    A.retain_grad()
    return A, A @ v


def causal_attention_relevance(s, R_ctx, heads, conserve):
    """(R_q, R_k, R_v) per head, and R_A, from the relevance of the heads' concatenated output."""
    n, hd = s["q"].shape[1], s["q"].shape[2]
    R_ctx = R_ctx.reshape(n, heads, hd).transpose(0, 1)
    R_A, R_v = product_relevance(s["A"], s["v"], R_ctx, conserve)
    R_q, R_kT = product_relevance(s["q"], s["k"].transpose(-1, -2), R_A, conserve)  # softmax, scale, mask pass
    return R_q, R_kT.transpose(-1, -2), R_v, R_A


def merge_heads(t):
    """(H, n, d) -> (n, H·d)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def lm_result(method, gradients, per_layer, start_layer, R_input, n, dtype):
    """The explained (last) row: partial LRP, transformer attribution, or the input relevance."""
    if method == "partial_lrp":
        return per_layer[-1].clamp(min=0).mean(dim=0)[n - 1]
    if method == "transformer_attribution":
        C = torch.eye(n, dtype=dtype)
        for l in range(start_layer % len(per_layer), len(per_layer)):
            Abar = (gradients[l] * per_layer[l]).clamp(min=0).mean(dim=0)
            C = (torch.eye(n, dtype=dtype) + Abar) @ C
        return C[n - 1]
    return R_input.sum(dim=-1)


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gpt2_relevance(model, input_ids, target, method, start_layer=1, rules="textbook"):
    """One unpadded sequence (n,) of an HF GPT2LMHeadModel (float64): the last token's row
    (transformer_attribution, partial_lrp) or the word embeddings' relevance (lrp), for the
    next-token logit ``target`` at the last token."""
    conserve = method == "transformer_attribution"  # Eq. 9 on sums
    halve, linear = rule_choices(method, rules)
    body, heads = model.transformer, model.config.n_head
    n, D = input_ids.shape[0], model.config.n_embd
    hd, eps = D // heads, model.config.layer_norm_epsilon
    word = body.wte.weight[input_ids]
    position = body.wpe.weight[:n]
    x = word + position
    saved = []
    for block in body.h:
        h = F.layer_norm(x, (D,), block.ln_1.weight, block.ln_1.bias, eps)
        qkv = h @ block.attn.c_attn.weight + block.attn.c_attn.bias
        q, k, v = (t.reshape(n, heads, hd).transpose(0, 1) for t in qkv.split(D, dim=-1))
        A, out = causal_attention(q, k, v, hd ** -0.5)
        ctx = merge_heads(out)
        o = ctx @ block.attn.c_proj.weight + block.attn.c_proj.bias
        x1 = x + o
        h2 = F.layer_norm(x1, (D,), block.ln_2.weight, block.ln_2.bias, eps)
        i = gelu_new(h2 @ block.mlp.c_fc.weight + block.mlp.c_fc.bias)
        m = i @ block.mlp.c_proj.weight + block.mlp.c_proj.bias
        saved.append(dict(x=x, h=h, q=q, k=k, v=v, A=A, ctx=ctx, o=o, x1=x1, h2=h2, i=i, m=m))
        x = x1 + m
    final = F.layer_norm(x, (D,), body.ln_f.weight, body.ln_f.bias, eps)
    logits = final[n - 1] @ model.lm_head.weight.T
    gradients, R_logits = start(logits, target, method, saved)
    with torch.no_grad():
        R = torch.zeros_like(final)
        R[n - 1] = linear(final[n - 1], model.lm_head.weight, R_logits)  # through ln_f
        per_layer = [None] * len(saved)
        for l in reversed(range(len(saved))):
            s, block = saved[l], body.h[l]
            R_x1, R_m = sum_relevance(s["x1"], s["m"], R, conserve)
            R_i = linear(s["i"], block.mlp.c_proj.weight.T, R_m)
            R_x1 = R_x1 + linear(s["h2"], block.mlp.c_fc.weight.T, R_i)  # gelu_new, ln_2 pass
            R_x, R_o = sum_relevance(s["x"], s["o"], R_x1, conserve)
            R_ctx = linear(s["ctx"], block.attn.c_proj.weight.T, R_o)
            R_q, R_k, R_v, per_layer[l] = causal_attention_relevance(s, R_ctx, heads, halve)
            R_qkv = torch.cat([merge_heads(R_q), merge_heads(R_k), merge_heads(R_v)], dim=-1)
            R = R_x + linear(s["h"], block.attn.c_attn.weight.T, R_qkv)  # ln_1 passes
        R_word, _ = sum_relevance(word, position, R, conserve)
        return lm_result(method, gradients, per_layer, start_layer, R_word, n, x.dtype)


def rms_norm(x, module):
    """HF's RMSNorm as Llama, Qwen2 and Mistral compute it (the statistic in float32)."""
    xf = x.to(torch.float32)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return module.weight * normed.to(x.dtype)


def rotate_half(t):
    half = t.shape[-1] // 2
    return torch.cat([-t[..., half:], t[..., :half]], dim=-1)


def rotary(t, cos, sin):
    return t * cos + rotate_half(t) * sin


def rotary_relevance(t, cos, sin, R):
    """The z-rule of the linear map t·cos + rotate_half(t)·sin: each term its share of R, the
    rotated term's relevance moved back to where its values came from."""
    R_direct, R_rotated = sum_relevance(t * cos, rotate_half(t) * sin, R, conserve=False)
    half = t.shape[-1] // 2
    return R_direct + torch.cat([R_rotated[..., half:], R_rotated[..., :half]], dim=-1)


def llama_relevance(model, input_ids, target, method, start_layer=1, rules="textbook"):
    """One unpadded sequence (n,) of an HF LlamaForCausalLM, Qwen2ForCausalLM or
    MistralForCausalLM (float64), as ``gpt2_relevance``."""
    conserve = method == "transformer_attribution"  # Eq. 9 on sums
    halve, linear = rule_choices(method, rules)
    body, config = model.model, model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    group = heads // kv_heads
    n = input_ids.shape[0]
    x0 = body.embed_tokens.weight[input_ids]
    inv_freq = body.rotary_emb.inv_freq.to(torch.float32)
    freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None]  # computed in float32, as HF does
    emb = torch.cat([freqs, freqs], dim=-1)
    cos = (emb.cos() * body.rotary_emb.attention_scaling).to(x0.dtype)
    sin = (emb.sin() * body.rotary_emb.attention_scaling).to(x0.dtype)

    def project(linear, t, count):
        out = t @ linear.weight.T + (linear.bias if linear.bias is not None else 0)
        return out.reshape(n, count, hd).transpose(0, 1)

    x = x0
    saved = []
    for layer in body.layers:
        att = layer.self_attn
        h = rms_norm(x, layer.input_layernorm)
        q, k, v = project(att.q_proj, h, heads), project(att.k_proj, h, kv_heads), project(att.v_proj, h, kv_heads)
        q_r, k_r = rotary(q, cos, sin), rotary(k, cos, sin)
        k_rep, v_rep = k_r.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        A, out = causal_attention(q_r, k_rep, v_rep, hd ** -0.5)
        ctx = merge_heads(out)
        o = ctx @ att.o_proj.weight.T
        x1 = x + o
        h2 = rms_norm(x1, layer.post_attention_layernorm)
        gate = h2 @ layer.mlp.gate_proj.weight.T
        up = h2 @ layer.mlp.up_proj.weight.T
        a = F.silu(gate)
        p = a * up
        m = p @ layer.mlp.down_proj.weight.T
        saved.append(dict(x=x, h=h, q=q, k=k, q_r=q_r, A=A, ctx=ctx, o=o, x1=x1, h2=h2, a=a, up=up, p=p, m=m,
                          v=v_rep, k_rep=k_rep))
        x = x1 + m
    final = rms_norm(x, body.norm)
    logits = final[n - 1] @ model.lm_head.weight.T
    gradients, R_logits = start(logits, target, method, saved)
    with torch.no_grad():
        R = torch.zeros_like(final)
        R[n - 1] = linear(final[n - 1], model.lm_head.weight, R_logits)  # through the final RMSNorm
        per_layer = [None] * len(saved)
        for l in reversed(range(len(saved))):
            s, layer = saved[l], body.layers[l]
            att, mlp = layer.self_attn, layer.mlp
            R_x1, R_m = sum_relevance(s["x1"], s["m"], R, conserve)
            R_p = linear(s["p"], mlp.down_proj.weight, R_m)
            z = s["a"] * s["up"]  # the gated product: the z-rule per operand, halved with ``halve``
            R_each = z * divide(R_p, z) / (2 if halve else 1)
            R_h2 = (linear(s["h2"], mlp.gate_proj.weight, R_each)  # through SiLU
                    + linear(s["h2"], mlp.up_proj.weight, R_each))
            R_x1 = R_x1 + R_h2  # through post_attention_layernorm
            R_x, R_o = sum_relevance(s["x"], s["o"], R_x1, conserve)
            R_ctx = linear(s["ctx"], att.o_proj.weight, R_o)
            attention = dict(q=s["q_r"], k=s["k_rep"], v=s["v"], A=s["A"])
            R_qr, R_krep, R_vrep, per_layer[l] = causal_attention_relevance(attention, R_ctx, heads, halve)
            R_kr = R_krep.reshape(kv_heads, group, n, hd).sum(dim=1)  # a repeated key head sums its copies
            R_v = R_vrep.reshape(kv_heads, group, n, hd).sum(dim=1)
            R_q, R_k = rotary_relevance(s["q"], cos, sin, R_qr), rotary_relevance(s["k"], cos, sin, R_kr)
            R_h = (linear(s["h"], att.q_proj.weight, merge_heads(R_q))
                   + linear(s["h"], att.k_proj.weight, merge_heads(R_k))
                   + linear(s["h"], att.v_proj.weight, merge_heads(R_v)))
            R = R_x + R_h  # through input_layernorm
        return lm_result(method, gradients, per_layer, start_layer, R, n, x.dtype)
