"""Method 'attnlrp' on CLIP (the pair model and each tower), on any SDPA module given a layout, and
its per-layer relevance (``layers=True``).

The references are written apart from the engine, in float64, one unpadded sample at a time:

- CLIP, the hand-written ViT and the token encoder below: their forward written out from a deep
  copy's weights with the AttnLRP rules as stop-gradients (LayerNorm's std and the embeddings' L2
  norms detached, ``x · (f(x)/x).detach()`` for GELU / QuickGELU, ``0.5·t + (0.5·t).detach()`` for
  each factor of q·kᵀ, A·V and CLIP's img·txt), explicit softmax attention. Each checks its logit
  against the model's own.
- HF models, timm and torchvision: ``test_attnlrp``'s rules-as-modules copy (timm's and
  torchvision's attention replaced, in the copy, by explicit attention with the uniform rule), the
  block inputs read by forward pre-hooks on the copy's blocks (never the user's model).

relfast runs the batch, padded, with the models' own SDPA.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import transformers

import relfast
import bimodal_models as bm
import engine_models as em
from test_attnlrp import (ConstantStdLayerNorm, IdentityActivation, bias_free, half_gradient, reference_copy)
from test_model_untouched import model_state

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def close(got, want, rtol=1e-6):
    """got (float32 maps) against want (float64), relative to the largest entry; returns the error."""
    got, want = got.double(), want.double()
    scale = float(want.abs().max())
    assert scale > 1e-6  # a map, not zeros
    error = float((got - want).abs().max()) / scale
    assert error <= rtol, error
    return error


def ln(x, norm):
    """LayerNorm with its standard deviation held constant (the identity rule of the normaliser)."""
    std = (x.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt().detach()
    y = (x - x.mean(-1, keepdim=True)) / std * norm.weight
    return y + norm.bias if norm.bias is not None else y


def identity_rule(f, x):
    y = f(x)
    return x * torch.where(x == 0, torch.zeros_like(y), y / torch.where(x == 0, torch.ones_like(x), x)).detach()


def explicit_attention(q, k, v, scale, record, causal=False, key_mask=None):
    """softmax(q·kᵀ·scale + masks)·v with the uniform rule on both products; records (logits before
    the masks, A) for the softmax terms."""
    scores = half_gradient(q) @ half_gradient(k).transpose(-1, -2) * scale
    logits = scores
    n = scores.shape[-1]
    if causal:
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask, float("-inf"))
    attention = logits.softmax(-1)
    record.append((scores, attention))
    return half_gradient(attention) @ half_gradient(v)


def read_out(logit, start, blocks, record, retain_graph=False):
    """(x ⊙ ∇x at ``start``, [x ⊙ ∇x summed over the width at each block input], the relevance each
    layer's softmax absorbs: Σ A⊙∇A − Σ s⊙∇s with s the logits before the masks)."""
    n = len(record)
    grads = torch.autograd.grad(logit, [start] + blocks + [a for _, a in record] + [s for s, _ in record],
                                retain_graph=retain_graph)
    at_start = (start * grads[0]).detach()
    layers = torch.stack([(x * g).sum(-1)[0] for x, g in zip(blocks, grads[1:1 + len(blocks)])]).detach()
    absorbed = [float((a * ga).sum() - (s * gs).sum()) for (s, a), ga, gs in
                zip(record, grads[1 + len(blocks):1 + len(blocks) + n], grads[1 + len(blocks) + n:])]
    return at_start, layers, absorbed


# ---- CLIP ----

def clip_model(zero_biases=False):
    """bimodal_models' CLIP config with livelier weights (initializer_factor 4) and random biases."""
    config = bm.clip().config
    config.initializer_factor = 4.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = transformers.CLIPModel(config).double().eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(std=0.1)
    if zero_biases:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "position_embedding" in name or "class_embedding" in name:
                    p.zero_()
    return model


def clip_block(layer, x, record, causal):
    attn = layer.self_attn
    b, n, d = x.shape
    h = ln(x, layer.layer_norm1)

    def heads(t):
        return t.view(b, n, attn.num_heads, d // attn.num_heads).transpose(1, 2)

    out = explicit_attention(heads(attn.q_proj(h)), heads(attn.k_proj(h)), heads(attn.v_proj(h)), attn.scale, record,
                             causal=causal)
    x = x + attn.out_proj(out.transpose(1, 2).reshape(b, n, d))
    mlp = layer.mlp
    return x + mlp.fc2(identity_rule(lambda t: t * torch.sigmoid(1.702 * t), mlp.fc1(ln(x, layer.layer_norm2))))


def clip_image_tower(twin, pixels, record, blocks):
    vision = twin.vision_model
    embeddings = vision.embeddings
    patches = embeddings.patch_embedding(pixels)  # (1, D, h, w): relevance is read here
    x = patches.flatten(2).transpose(1, 2)
    x = torch.cat([embeddings.class_embedding.expand(1, 1, -1), x], dim=1) + embeddings.position_embedding.weight[None]
    x = ln(x, vision.pre_layrnorm)
    for layer in vision.encoder.layers:
        blocks.append(x)
        x = clip_block(layer, x, record, causal=False)
    return twin.visual_projection(ln(x[:, 0], vision.post_layernorm)), patches


def clip_text_tower(twin, ids, record, blocks):
    text = twin.text_model
    tokens = text.embeddings.token_embedding(ids).detach().requires_grad_()
    x = tokens + text.embeddings.position_embedding.weight[:ids.shape[1]][None]
    for layer in text.encoder.layers:
        blocks.append(x)
        x = clip_block(layer, x, record, causal=True)
    eot = int((ids[0] == bm.CLIP_EOT).nonzero()[0])
    return twin.text_projection(ln(x, text.final_layer_norm)[:, eot]), tokens


def unit(e):
    return e / e.norm(dim=-1, keepdim=True).detach()  # the L2 norm held constant


def clip_reference(model, pixels, ids):
    """One (image, unpadded text) pair: {"image"/"text": (input relevance, per-layer (L, N),
    absorbed per layer)} and the logit."""
    twin = copy.deepcopy(model)
    image_record, image_blocks, text_record, text_blocks = [], [], [], []
    image, patches = clip_image_tower(twin, pixels, image_record, image_blocks)
    text, tokens = clip_text_tower(twin, ids, text_record, text_blocks)
    logit = (half_gradient(unit(image)) * half_gradient(unit(text))).sum() * twin.logit_scale.exp().detach()
    with torch.no_grad():
        assert float(logit) == pytest.approx(float(model(pixel_values=pixels, input_ids=ids).logits_per_image[0, 0]),
                                             rel=1e-10)
    at_patches, image_layers, image_absorbed = read_out(logit, patches, image_blocks, image_record, retain_graph=True)
    image_map = torch.cat([at_patches.new_zeros(1), at_patches.sum(1).flatten()])  # the class token: a parameter
    at_tokens, text_layers, text_absorbed = read_out(logit, tokens, text_blocks, text_record)
    return {"image": (image_map, image_layers, image_absorbed),
            "text": (at_tokens.sum(-1)[0], text_layers, text_absorbed)}, float(logit)


def clip_real_text(inputs, t):
    length = int(inputs["attention_mask"][t].sum())
    return inputs["input_ids"][t:t + 1, :length], length


def test_clip_pairs_batched_padded_equal_the_reference_per_pair():
    """Three images with three right-padded texts, each image explained against another text's
    logit: both maps and both towers' per-layer relevance equal the per-pair reference."""
    model, inputs = clip_model(), bm.clip_inputs(3, 3, seed=4)
    texts = [2, 0, 1]
    out = relfast.Explainer(model, "attnlrp", layers=True)(inputs, target=texts)
    assert out.pairs.tolist() == [[0, 2], [1, 0], [2, 1]] and out.target.tolist() == texts
    assert out.maps["image"].shape == (3, 17) and out.maps["text"].shape == (3, 9) and out.logits.shape == (3, 1)
    assert out.layers["image"].shape == (3, 2, 17) and out.layers["text"].shape == (3, 2, 9)
    generic = relfast.Explainer(model)(inputs, target=texts)  # the same maps, pairs, targets and logits
    assert {k: v.shape for k, v in generic.maps.items()} == {k: v.shape for k, v in out.maps.items()}
    assert torch.equal(generic.pairs, out.pairs) and torch.equal(generic.target, out.target)
    torch.testing.assert_close(generic.logits, out.logits)
    worst = 0.0
    for p, (i, t) in enumerate(out.pairs.tolist()):
        ids, length = clip_real_text(inputs, t)
        want, logit = clip_reference(model, inputs["pixel_values"][i:i + 1], ids)
        assert float(out.logits[p, 0]) == pytest.approx(logit, rel=1e-9)
        worst = max(worst, close(out.maps["image"][p], want["image"][0]),
                    close(out.layers["image"][p], want["image"][1]),
                    close(out.maps["text"][p, :length], want["text"][0]),
                    close(out.layers["text"][p, :, :length], want["text"][1]))
        assert (out.maps["text"][p, length:] == 0).all() and (out.layers["text"][p, :, length:] == 0).all()
        assert out.maps["image"][p, 0] == 0 and (out.layers["image"][p, :, 0] != 0).all()  # CLS: 0 as input only
    print(f"CLIP: max |relfast - reference| / max |reference| = {worst:.1e}")


def test_clip_conservation_each_tower_half_the_logit():
    """Bias-free CLIP (biases, position and class embeddings zeroed): the uniform rule on img·txt
    gives each tower half the logit: its input relevance plus its softmax terms is logit / 2, and
    block l's relevance plus the terms of the sites from l on is too. All pairs of 2 x 3."""
    model, inputs = clip_model(zero_biases=True), bm.clip_inputs(2, 3, seed=5)
    out = relfast.Explainer(model, "attnlrp", layers=True)(inputs, target="all")
    assert out.pairs.shape == (6, 2)
    for p, (i, t) in enumerate(out.pairs.tolist()):
        ids, length = clip_real_text(inputs, t)
        want, logit = clip_reference(model, inputs["pixel_values"][i:i + 1], ids)
        for tower in ("image", "text"):
            absorbed = want[tower][2]
            maps, layers = out.maps[tower][p].double(), out.layers[tower][p].double()
            scale = float(maps.abs().sum()) + abs(logit)
            assert abs(float(maps.sum()) + sum(absorbed) - logit / 2) <= 1e-6 * scale
            for layer in range(len(absorbed)):
                assert abs(float(layers[layer].sum()) + sum(absorbed[layer:]) - logit / 2) <= 1e-6 * scale
            assert abs(sum(absorbed)) > 1e-4 * scale  # the softmax terms matter: the check can fail


def test_clip_towers_alone_give_the_pair_maps():
    """Each tower alone with a callable target, half the similarity to the other tower's fixed
    embedding with its own norm held constant, is the pair's map (the uniform rule's half)."""
    model, inputs = clip_model(), bm.clip_inputs(3, 3, seed=6)
    pair = relfast.Explainer(model, "attnlrp")(inputs)
    config = copy.deepcopy(model.config)
    config.vision_config.projection_dim = config.text_config.projection_dim = config.projection_dim
    vision = transformers.CLIPVisionModelWithProjection(config.vision_config).double().eval()
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    text = transformers.CLIPTextModelWithProjection(config.text_config).double().eval()
    text.text_model.load_state_dict(model.text_model.state_dict())
    text.text_projection.load_state_dict(model.text_projection.state_dict())
    text_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        image_embeds = vision(pixel_values=inputs["pixel_values"]).image_embeds
        text_embeds = text(**text_inputs).text_embeds
    scale = model.logit_scale.exp().detach()

    def half_similarity_to(fixed):
        return lambda embeds: 0.5 * scale * (unit(embeds) * unit(fixed)).sum(-1)

    image_only = relfast.Explainer(vision, "attnlrp")(inputs["pixel_values"], target=half_similarity_to(text_embeds))
    text_only = relfast.Explainer(text, "attnlrp")(text_inputs, target=half_similarity_to(image_embeds))
    assert set(image_only.maps) == {"image"} and set(text_only.maps) == {"text"}
    torch.testing.assert_close(image_only.maps["image"], pair.maps["image"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(text_only.maps["text"], pair.maps["text"], rtol=1e-5, atol=1e-7)


def test_clip_eager_attention_and_lower_precision_follow_float64_sdpa():
    """Eager CLIP attention (softmax in float32, additive causal + padding mask) gives the SDPA
    maps and layers; float32 and half-precision models (weights and inputs cast) the float64 ones
    up to their precision (measured: float32 1e-6, float16 4e-3, bfloat16 2e-2 of the largest entry)."""
    inputs = bm.clip_inputs(3, 3, seed=4)
    want = relfast.Explainer(clip_model(), "attnlrp", layers=True)(inputs)
    eager = clip_model()
    eager.set_attn_implementation("eager")
    cases = [(eager, inputs, 1e-6)]
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)):
        cases.append((clip_model().to(dtype), {k: v.to(dtype) if v.is_floating_point() else v
                                               for k, v in inputs.items()}, tolerance))
    for model, model_inputs, tolerance in cases:
        got = relfast.Explainer(model, "attnlrp", layers=True)(model_inputs)
        for tower in ("image", "text"):
            for name, a, b in (("maps", got.maps[tower], want.maps[tower]), ("layers", got.layers[tower],
                                                                             want.layers[tower])):
                error = float((a.double() - b.double()).abs().max() / b.abs().max())
                assert error <= tolerance, (next(model.parameters()).dtype, tower, name, error)


# ---- any SDPA module given a layout ----

class TokenEncoder(torch.nn.Module):
    """A user's encoder of token embeddings (B, N, D): a class token, pre-LN blocks calling
    scaled_dot_product_attention (padding as a boolean key mask), QuickGELU MLPs, and a cosine
    head on the class token (``norm``: how the head divides by the L2 norm)."""

    def __init__(self, norm="normalize", residual=True, activation=None):
        super().__init__()
        self.norm_form, self.residual = norm, residual
        self.activation = activation or (lambda t: t * torch.sigmoid(1.702 * t))
        self.cls = torch.nn.Parameter(torch.randn(1, 1, em.HIDDEN))
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict(dict(
            norm1=torch.nn.LayerNorm(em.HIDDEN), qkv=torch.nn.Linear(em.HIDDEN, 3 * em.HIDDEN),
            proj=torch.nn.Linear(em.HIDDEN, em.HIDDEN), norm2=torch.nn.LayerNorm(em.HIDDEN),
            fc1=torch.nn.Linear(em.HIDDEN, 64), fc2=torch.nn.Linear(64, em.HIDDEN))) for _ in range(em.LAYERS))
        self.norm = torch.nn.LayerNorm(em.HIDDEN)
        self.classes = torch.nn.Parameter(torch.randn(em.CLASSES, em.HIDDEN))

    def forward(self, embeddings, mask):
        b = embeddings.shape[0]
        x = torch.cat([self.cls.expand(b, -1, -1), embeddings], dim=1)
        keys = torch.cat([mask.new_ones(b, 1), mask], dim=1).bool()[:, None, None, :]
        for block in self.blocks:
            n, d = x.shape[1], x.shape[2]
            q, k, v = block["qkv"](block["norm1"](x)).view(b, n, 3, em.HEADS, d // em.HEADS).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
            out = block["proj"](attended.transpose(1, 2).reshape(b, n, d))
            x = x + out if self.residual else out
            x = x + block["fc2"](self.activation(block["fc1"](block["norm2"](x))))
        pooled = self.norm(x)[:, 0]
        if self.norm_form == "normalize":
            pooled = F.normalize(pooled, dim=-1)
        elif self.norm_form == "norm":
            pooled = pooled / pooled.norm(dim=-1, keepdim=True)
        else:
            pooled = pooled / torch.linalg.vector_norm(pooled, dim=-1, keepdim=True)
        return 10 * pooled @ F.normalize(self.classes, dim=-1).T


def token_encoder(**options):
    torch.manual_seed(0)
    model = TokenEncoder(**options).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model


def token_inputs(seed=1, lengths=(7, 5, 3)):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, :length] = 1
    return {"embeddings": torch.randn(len(lengths), n, em.HIDDEN, generator=g, dtype=torch.float64), "mask": mask}


TOKEN_LAYOUT = relfast.TokenLayout(prefix_tokens=1)


def token_reference(model, embeddings, target):
    twin = copy.deepcopy(model)
    start = embeddings.clone().requires_grad_()
    x = torch.cat([twin.cls, start], dim=1)
    record, blocks = [], []
    for block in twin.blocks:
        blocks.append(x)
        n, d = x.shape[1], x.shape[2]
        q, k, v = block["qkv"](ln(x, block["norm1"])).view(1, n, 3, em.HEADS, d // em.HEADS).permute(2, 0, 3, 1, 4)
        out = explicit_attention(q, k, v, (d // em.HEADS) ** -0.5, record)
        x = x + block["proj"](out.transpose(1, 2).reshape(1, n, d))
        x = x + block["fc2"](identity_rule(lambda t: t * torch.sigmoid(1.702 * t), block["fc1"](ln(x, block["norm2"]))))
    logit = (10 * unit(ln(x, twin.norm)[:, 0]) @ F.normalize(twin.classes, dim=-1).T)[0, target]
    with torch.no_grad():
        assert float(logit) == pytest.approx(float(model(embeddings, torch.ones(1, embeddings.shape[1]))[0, target]),
                                             rel=1e-10)
    at_start, layers, absorbed = read_out(logit, start, blocks, record)
    return torch.cat([at_start.new_zeros(1), at_start.sum(-1)[0]]), layers, float(logit), absorbed


def hand_written_reference(model, pixels, target):
    """engine_models.HandWrittenViT written out with the rules."""
    twin = copy.deepcopy(model)
    patches = twin.patches(pixels)
    x = torch.cat([twin.cls, patches.flatten(2).transpose(1, 2)], dim=1) + twin.pos
    record, blocks = [], []
    for block in twin.blocks:
        blocks.append(x)
        n, d = x.shape[1], x.shape[2]
        q, k, v = block.qkv(ln(x, block.norm1)).view(1, n, 3, em.HEADS, d // em.HEADS).permute(2, 0, 3, 1, 4)
        out = explicit_attention(q, k, v, 1 / math.sqrt(d // em.HEADS), record)
        x = x + block.proj(out.transpose(1, 2).reshape(1, n, d))
        mlp = block.mlp
        x = x + mlp[2](identity_rule(F.gelu, mlp[0](ln(x, block.norm2))))
    logit = twin.head(ln(x, twin.norm)[:, 0])[0, target]
    with torch.no_grad():
        assert float(logit) == pytest.approx(float(model(pixels)[0, target]), rel=1e-10)
    at_patches, layers, absorbed = read_out(logit, patches, blocks, record)
    return torch.cat([at_patches.new_zeros(1), at_patches.sum(1).flatten()]), layers, float(logit), absorbed


TARGETS = [[0, 3], [4, 1], [2, 2]]


def test_token_embedding_module_batched_padded_equals_the_reference():
    """Float (B, N, D) input, padded with a key mask, a class token the layout declares (its input
    relevance 0), F.normalize in the head; K = 2 targets; input and per-layer relevance."""
    model, inputs = token_encoder(), token_inputs()
    out = relfast.Explainer(model, "attnlrp", layout=TOKEN_LAYOUT, layers=True)(inputs, TARGETS)
    assert out.relevance.shape == (3, 2, 8) and out.layers["text"].shape == (3, 2, em.LAYERS, 8)
    worst = 0.0
    for b in range(3):
        length = int(inputs["mask"][b].sum())
        for k, target in enumerate(TARGETS[b]):
            relevance, layers, _, _ = token_reference(model, inputs["embeddings"][b:b + 1, :length], target)
            worst = max(worst, close(out.relevance[b, k, :1 + length], relevance),
                        close(out.layers["text"][b, k, :, :1 + length], layers))
            assert (out.relevance[b, k, 1 + length:] == 0).all()
            assert (out.layers["text"][b, k, :, 1 + length:] == 0).all()
    print(f"token module: max |relfast - reference| / max |reference| = {worst:.1e}")


def test_hand_written_vit_equals_the_reference():
    model, images = em.build("hand-written"), em.inputs_for("hand-written")
    out = relfast.Explainer(model, "attnlrp", layout=relfast.TokenLayout(**em.HAND_WRITTEN_LAYOUT), layers=True)(
        images, TARGETS)
    assert out.layers["image"].shape == (3, 2, em.LAYERS, 1 + em.GRID ** 2)
    assert out.image_map().shape == (3, 2, em.GRID, em.GRID)
    worst = 0.0
    for b in range(3):
        for k, target in enumerate(TARGETS[b]):
            relevance, layers, _, _ = hand_written_reference(model, images[b:b + 1], target)
            worst = max(worst, close(out.relevance[b, k], relevance), close(out.layers["image"][b, k], layers))
    print(f"hand-written ViT: max |relfast - reference| / max |reference| = {worst:.1e}")


@pytest.mark.parametrize("norm", ["norm", "vector_norm"])
def test_every_form_of_the_l2_norm_holds_it_constant(norm):
    inputs = token_inputs()
    want = relfast.Explainer(token_encoder(), "attnlrp", layout=TOKEN_LAYOUT)(inputs).relevance
    got = relfast.Explainer(token_encoder(norm=norm), "attnlrp", layout=TOKEN_LAYOUT)(inputs).relevance
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


# ---- per-layer relevance of the other families ----

BLOCKS = {"gpt2": lambda m: m.transformer.h, "llama": lambda m: m.model.layers,
          "hf-bert": lambda m: m.bert.encoder.layer, "hf-vit": lambda m: m.vit.layers, "timm-vit": lambda m: m.blocks,
          "torchvision-vit": lambda m: m.encoder.layers}


class ReferenceTimmAttention(torch.nn.Module):
    def __init__(self, attn, record):
        super().__init__()
        self.attn, self.record = attn, record

    def forward(self, x, **kwargs):
        b, n, d = x.shape
        a = self.attn
        q, k, v = a.qkv(x).reshape(b, n, 3, a.num_heads, d // a.num_heads).permute(2, 0, 3, 1, 4)
        out = explicit_attention(a.q_norm(q), a.k_norm(k), v, a.scale, self.record)
        return a.proj(a.norm(out.transpose(1, 2).reshape(b, n, d)))


class ReferenceMultiheadAttention(torch.nn.Module):
    def __init__(self, mha, record):
        super().__init__()
        self.mha, self.record = mha, record

    def forward(self, query, key, value, need_weights=False):
        b, n, d = query.shape
        heads = self.mha.num_heads
        q, k, v = (t.view(b, n, heads, d // heads).transpose(1, 2)
                   for t in F.linear(query, self.mha.in_proj_weight, self.mha.in_proj_bias).chunk(3, dim=-1))
        out = explicit_attention(q, k, v, (d // heads) ** -0.5, self.record)
        return self.mha.out_proj(out.transpose(1, 2).reshape(b, n, d)), None


def vision_reference_copy(name, model):
    """timm / torchvision: a copy with constant-std LayerNorms, GELU as the identity rule and
    explicit attention with the uniform rule."""
    twin, record = copy.deepcopy(model), []
    for parent in list(twin.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.LayerNorm):
                setattr(parent, child_name, ConstantStdLayerNorm(child))
            elif isinstance(child, torch.nn.GELU):
                setattr(parent, child_name, IdentityActivation(child))
    for block in BLOCKS[name](twin):
        if name == "timm-vit":
            block.attn = ReferenceTimmAttention(block.attn, record)
        else:
            block.self_attention = ReferenceMultiheadAttention(block.self_attention, record)
    return twin, record


def layer_reference(name, model, single, target):
    """(input relevance (N,), per-layer (L, N), logit, absorbed per layer) of one unpadded sample."""
    if name in ("timm-vit", "torchvision-vit"):
        twin, record = vision_reference_copy(name, model)
    else:
        twin, record = reference_copy(model)
        record = record.layers
    blocks, captured = [], []
    for block in BLOCKS[name](twin):
        block.register_forward_pre_hook(
            lambda module, args, kwargs: blocks.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    if name in em.VISION:
        patch = {"hf-vit": lambda m: m.vit.embeddings.patch_embeddings.projection,
                 "timm-vit": lambda m: m.patch_embed.proj, "torchvision-vit": lambda m: m.conv_proj}[name](twin)
        patch.register_forward_hook(lambda m, i, o: captured.append(o))
        pixels = single if torch.is_tensor(single) else single["pixel_values"]
        logits = twin(pixel_values=pixels).logits if name == "hf-vit" else twin(pixels)
        logit, start = logits[0, target], captured[0]
    else:
        start = twin.get_input_embeddings()(single["input_ids"]).detach().requires_grad_()
        kwargs = {"use_cache": False} if name in em.CAUSAL_LMS else {}
        logits = twin(inputs_embeds=start, **kwargs).logits
        logit = logits[0, -1, target] if name in em.CAUSAL_LMS else logits[0, target]
    if name in ("timm-vit", "torchvision-vit"):
        pairs = record
    else:
        pairs = [(s, a) for s, _, a in record]
    at_start, layers, absorbed = read_out(logit, start, blocks, pairs)
    if name in em.VISION:
        relevance = torch.cat([at_start.new_zeros(1), at_start.sum(1).flatten()])
    else:
        relevance = at_start.sum(-1)[0]
    return relevance, layers, float(logit), absorbed


LAYER_NAMES = ["gpt2", "llama", "hf-bert", "hf-vit", "timm-vit", "torchvision-vit"]


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_layers_batched_k_targets_equal_the_reference(name):
    model, inputs = em.build(name), em.inputs_for(name)
    out = relfast.Explainer(model, "attnlrp", layers=True)(inputs, TARGETS)
    plain = relfast.Explainer(model, "attnlrp")(inputs, TARGETS)
    assert torch.equal(out.relevance, plain.relevance) and plain.layers is None
    stream = "image" if name in em.VISION else "text"
    assert set(out.layers) == {stream} and out.layers[stream].dtype == torch.float32
    assert out.layers[stream].shape == (3, 2, em.LAYERS, out.relevance.shape[-1])
    worst = 0.0
    for b in range(3):
        single, where = em.real_tokens(name, inputs, b)
        for k, target in enumerate(TARGETS[b]):
            relevance, layers, _, _ = layer_reference(name, model, single, target)
            worst = max(worst, close(out.relevance[b, k, where], relevance),
                        close(out.layers[stream][b, k, :, where], layers))
        if name not in em.VISION:
            pad = ~inputs["attention_mask"][b].bool()
            assert (out.layers[stream][b][..., pad] == 0).all()
    print(f"{name} layers: max |relfast - reference| / max |reference| = {worst:.1e}")


@pytest.mark.parametrize("name", ["gpt2", "hf-bert", "timm-vit", "hand-written"])
def test_layer_conservation_without_additive_constants(name):
    """Bias-free copies: block l's relevance plus the softmax terms of the sites from l on is the
    logit (to 1e-6 of Σ|R| + |logit|); at block 0, with nothing but zeroed constants before it,
    the tokens' relevance is the input's."""
    if name == "hand-written":
        model = em.build(name)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("bias") or pname in ("cls", "pos"):
                    p.zero_()
        explainer = relfast.Explainer(model, "attnlrp", layout=relfast.TokenLayout(**em.HAND_WRITTEN_LAYOUT),
                                      layers=True)
    else:
        model = bias_free(name, em.build(name))
        if name == "timm-vit":
            with torch.no_grad():
                model.pos_embed.zero_()
                model.cls_token.zero_()
        explainer = relfast.Explainer(model, "attnlrp", layers=True)
    inputs = em.inputs_for(name)
    out = explainer(inputs)
    stream = next(iter(out.layers))
    for b in range(3):
        single, where = em.real_tokens(name, inputs, b)
        target = int(out.target[b])
        if name == "hand-written":
            _, _, logit, absorbed = hand_written_reference(model, single, target)
        else:
            _, _, logit, absorbed = layer_reference(name, model, single, target)
        layers = out.layers[stream][b].double()
        scale = float(out.relevance[b].double().abs().sum()) + abs(logit)
        for layer in range(em.LAYERS):
            assert abs(float(layers[layer].sum()) + sum(absorbed[layer:]) - logit) <= 1e-6 * scale
        assert abs(sum(absorbed)) > 1e-4 * scale
        if name in ("timm-vit", "hand-written"):
            torch.testing.assert_close(layers[0], out.relevance[b].double(), rtol=1e-6, atol=1e-6 * scale)


# ---- the model untouched, errors ----

@pytest.mark.parametrize("which", ["clip", "token-encoder"])
def test_the_model_is_untouched(which):
    if which == "clip":
        model, inputs, options = clip_model(), bm.clip_inputs(3, 3, seed=4), {}
    else:
        model, inputs, options = token_encoder(), token_inputs(), {"layout": TOKEN_LAYOUT}
    next(model.parameters()).requires_grad_(False)  # a user's frozen parameter
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    before = model_state(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(**inputs)
    out = relfast.Explainer(model, "attnlrp", layers=True, **options)(inputs)
    maps = list(out.maps.values()) + list(out.layers.values())
    assert all(torch.isfinite(m).all() and m.abs().sum() > 0 for m in maps)
    assert model_state(model) == before and len(calls) == 2
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        again = model(**inputs)
    if which == "clip":
        expected, again = expected.logits_per_image, again.logits_per_image
    assert torch.equal(again, expected)


class LogSumExpActivation(torch.nn.Module):
    def forward(self, x):
        return torch.logsumexp(x, dim=-1, keepdim=True).expand_as(x)


def test_errors_are_clear_and_come_before_any_work():
    model = token_encoder()
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    for value in ("yes", 1, None):
        with pytest.raises(ValueError, match=r"argument 'layers' must be True or False"):
            relfast.Explainer(model, "attnlrp", layout=TOKEN_LAYOUT, layers=value)
    for method in ("generic", "rollout", "lrp"):
        with pytest.raises(ValueError, match=rf"argument 'layers' applies to method 'attnlrp' only, not '{method}'"):
            relfast.Explainer(em.build("hf-bert"), method, layers=True)
    explainer = relfast.Explainer(model, "attnlrp", layout=TOKEN_LAYOUT)
    inputs = token_inputs()
    with pytest.raises(ValueError, match=r"reads relevance at one floating-point input.*\['embeddings', 'extra'\]"):
        explainer({**inputs, "extra": inputs["embeddings"]})
    with pytest.raises(ValueError, match=r"reads relevance at pixels \(B, C, H, W\) or token embeddings \(B, N, D\); "
                                         r"argument 'inputs' \('embeddings'\) has shape \(3, 224\)"):
        explainer({**inputs, "embeddings": inputs["embeddings"].flatten(1)})
    with pytest.raises(ValueError, match=r"inputs hold none; pass the token embeddings instead of token ids"):
        explainer({"embeddings": inputs["mask"], "mask": inputs["mask"]})
    assert forwards == []
    with pytest.raises(ValueError, match=r"method 'attnlrp' has no rules yet for VisualBertForQuestionAnswering"):
        relfast.Explainer(bm.visual_bert(), "attnlrp")


def test_an_op_without_a_rule_is_refused_by_name():
    model = token_encoder(activation=LogSumExpActivation())
    with pytest.raises(ValueError, match=r"the TokenEncoder model applies torch\.logsumexp to its activations, for "
                                         r"which relfast has no AttnLRP rule"):
        relfast.Explainer(model, "attnlrp", layout=TOKEN_LAYOUT)(token_inputs())


def test_layers_need_residual_connections():
    model = token_encoder(residual=False)
    explainer = relfast.Explainer(model, "attnlrp", layout=TOKEN_LAYOUT, layers=True)
    with pytest.raises(ValueError, match=r"'layers=True' found no residual connection around attention site 0 of the "
                                         r"TokenEncoder model"):
        explainer(token_inputs())
    assert relfast.Explainer(model, "attnlrp", layout=TOKEN_LAYOUT)(token_inputs()).layers is None  # maps still work
