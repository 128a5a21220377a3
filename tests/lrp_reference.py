"""A plain float64, one-sample-at-a-time implementation of the [P1] relevance rules, written apart
from relfast's engine: each model is run by hand from its weights, keeping every intermediate, and
relevance is propagated back with explicit per-layer functions (no autograd tricks). Autograd is
used only for the attention gradients ∇A that transformer attribution weights R_A with.

Rules (SPEC.md, [P1]): αβ (α=1, β=0) for linear and convolution layers; pass-through for
LayerNorm, GELU, softmax and scaling; the z-rule per operand for the two attention products (each
halved with the CVPR rules) and for sums (then Eq. 9 of seed 000 with the CVPR rules).
"""
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


def attention_relevance(s, q_w, k_w, v_w, R_ctx, heads, conserve):
    """From the relevance of the heads' concatenated output to (R of h, R_A)."""
    D = s["h"].shape[-1]
    R_ctx = R_ctx.reshape(-1, heads, D // heads).transpose(0, 1)
    R_A, R_v = product_relevance(s["A"], s["v"], R_ctx, conserve)
    R_q, R_kT = product_relevance(s["q"], s["k"].transpose(-1, -2), R_A, conserve)
    R_h = sum(linear_relevance(s["h"], w, r.transpose(0, 1).reshape(-1, D))
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

def hf_bert_relevance(model, input_ids, target, method, start_layer=1):
    """One unpadded sequence (N,) of an HF BertForSequenceClassification (float64): the CLS-row map
    (transformer_attribution, partial_lrp) or the word embeddings' relevance (lrp)."""
    conserve = method == "transformer_attribution"
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
        R_pooled = linear_relevance(pooled, model.classifier.weight, R_logits)  # through the dropout
        R = torch.zeros_like(x)
        R[0] = linear_relevance(x[0], bert.pooler.dense.weight, R_pooled)  # through tanh
        per_layer = [None] * len(saved)
        for l in reversed(range(len(saved))):
            s, layer = saved[l], bert.encoder.layer[l]
            R_m, R_x1 = sum_relevance(s["m"], s["x1"], R, conserve)  # through output.LayerNorm
            R_i = linear_relevance(s["i"], layer.output.dense.weight, R_m)
            R_x1 = R_x1 + linear_relevance(s["x1"], layer.intermediate.dense.weight, R_i)
            R_o, R_x = sum_relevance(s["o"], s["x"], R_x1, conserve)  # through attention.output.LayerNorm
            R_ctx = linear_relevance(s["ctx"], layer.attention.output.dense.weight, R_o)
            att = layer.attention.self
            R_h, per_layer[l] = attention_relevance(s, att.query.weight, att.key.weight, att.value.weight, R_ctx, heads,
                                                    conserve)
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
