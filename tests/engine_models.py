"""Small models of every family the engine explains, their inputs, and float64 per-sample
reference implementations that see the attention probabilities the eager way (explicit softmax
tensors in the autograd graph), written independently of relfast's capture.

A reference returns, for one unpadded sample: the scores (C,) the target indexes, the attention
probabilities per layer [(1, H, N, N)] in the graph, and the explained token's index.
"""
import copy
import math

import torch
import torch.nn.functional as F
import transformers

LAYERS, HEADS, HIDDEN, CLASSES, VOCAB, IMAGE, PATCH = 3, 4, 32, 5, 60, 32, 8
GRID = IMAGE // PATCH


# ---- models, float64, eval, with the attention they are loaded with by default ----

def hf_vit(layers=LAYERS):
    config = transformers.ViTConfig(image_size=IMAGE, patch_size=PATCH, num_channels=3, hidden_size=HIDDEN,
                                    num_hidden_layers=layers, num_attention_heads=HEADS, intermediate_size=64,
                                    num_labels=CLASSES)
    return transformers.ViTForImageClassification(config)


def hf_bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=64, max_position_embeddings=40,
                                     num_labels=CLASSES)
    return transformers.BertForSequenceClassification(config)


def timm_vit(layers=LAYERS):
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=HIDDEN, depth=layers, num_heads=HEADS,
                             mlp_ratio=2.0, num_classes=CLASSES)


def torchvision_vit(layers=LAYERS):
    from torchvision.models.vision_transformer import VisionTransformer
    model = VisionTransformer(image_size=IMAGE, patch_size=PATCH, num_layers=layers, num_heads=HEADS,
                              hidden_dim=HIDDEN, mlp_dim=64, num_classes=CLASSES)
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises the head
    return model


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, bos_token_id=0,
        eos_token_id=0))


def _llama_like(config_cls, model_cls, **extra):
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
        eos_token_id=0, **extra)
    return getattr(transformers, model_cls)(config)


def llama():
    return _llama_like("LlamaConfig", "LlamaForCausalLM")


def qwen2():
    return _llama_like("Qwen2Config", "Qwen2ForCausalLM")


def mistral():
    return _llama_like("MistralConfig", "MistralForCausalLM", sliding_window=None)


class Switch:
    """The reference switch of the hand-written model: explicit attention, kept probabilities."""

    def __init__(self):
        self.explicit, self.attentions = False, []


class HandWrittenBlock(torch.nn.Module):
    def __init__(self, switch):
        super().__init__()
        self.switch = switch
        self.norm1, self.norm2 = torch.nn.LayerNorm(HIDDEN), torch.nn.LayerNorm(HIDDEN)
        self.qkv, self.proj = torch.nn.Linear(HIDDEN, 3 * HIDDEN), torch.nn.Linear(HIDDEN, HIDDEN)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(HIDDEN, 64), torch.nn.GELU(), torch.nn.Linear(64, HIDDEN))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        if self.switch.explicit:  # the reference: probabilities as a tensor of the graph
            attn = (q @ k.transpose(-2, -1) / math.sqrt(d // HEADS)).softmax(dim=-1)
            self.switch.attentions.append(attn)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class HandWrittenViT(torch.nn.Module):
    """A user's own ViT: patches, class token, blocks calling scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.switch = Switch()
        self.patches = torch.nn.Conv2d(3, HIDDEN, PATCH, PATCH)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, HIDDEN) * 0.5)
        self.pos = torch.nn.Parameter(torch.randn(1, 1 + GRID * GRID, HIDDEN) * 0.5)
        self.blocks = torch.nn.ModuleList(HandWrittenBlock(self.switch) for _ in range(LAYERS))
        self.norm, self.head = torch.nn.LayerNorm(HIDDEN), torch.nn.Linear(HIDDEN, CLASSES)

    def forward(self, images):
        x = self.patches(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


BUILDERS = {"hf-vit": hf_vit, "hf-bert": hf_bert, "timm-vit": timm_vit, "torchvision-vit": torchvision_vit,
            "gpt2": gpt2, "llama": llama, "qwen2": qwen2, "mistral": mistral, "hand-written": HandWrittenViT}
VISION = {"hf-vit", "timm-vit", "torchvision-vit", "hand-written"}
CAUSAL_LMS = {"gpt2", "llama", "qwen2", "mistral"}
HAND_WRITTEN_LAYOUT = dict(prefix_tokens=1, patch_grid=(GRID, GRID), patch_size=PATCH)


def build(name, seed=0):
    torch.manual_seed(seed)
    return BUILDERS[name]().double().eval()


def prefix_tokens(name):
    return 0 if name in CAUSAL_LMS else 1


# ---- inputs: B >= 3, text padded (LMs on the left, BERT on the right) ----

def inputs_for(name, batch=3, seed=1, lengths=(9, 6, 4)):
    g = torch.Generator().manual_seed(seed)
    if name in VISION:
        pixels = torch.randn(batch, 3, IMAGE, IMAGE, generator=g, dtype=torch.float64)
        return pixels if name in ("timm-vit", "torchvision-vit", "hand-written") else {"pixel_values": pixels}
    n = max(lengths)
    ids = torch.randint(1, VOCAB, (batch, n), generator=g)
    mask = torch.zeros(batch, n, dtype=torch.long)
    for b in range(batch):
        length = lengths[b % len(lengths)]
        if name in CAUSAL_LMS:
            mask[b, n - length:] = 1  # left padding, as for generation
        else:
            mask[b, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def real_tokens(name, inputs, b):
    """Sample b alone, without its padding: what the reference runs on, and where its tokens sit
    in the padded batch."""
    if name in VISION:
        pixels = inputs if torch.is_tensor(inputs) else inputs["pixel_values"]
        return pixels[b:b + 1], slice(None)
    keep = inputs["attention_mask"][b].bool()
    index = keep.nonzero().flatten()
    return {"input_ids": inputs["input_ids"][b:b + 1, keep]}, slice(int(index[0]), int(index[-1]) + 1)


# ---- references: eager attention, float64, one unpadded sample ----

def _eager_copy(model):
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin


def reference_forward(name, model, single):
    """(scores (C,), attentions [(1, H, N, N)] in the graph, explained token index)."""
    if name in ("hf-vit", "hf-bert"):
        out = _eager_copy(model)(**({"pixel_values": single} if name == "hf-vit" else single), output_attentions=True)
        return out.logits[0], list(out.attentions), 0
    if name in CAUSAL_LMS:
        out = _eager_copy(model)(**single, output_attentions=True, use_cache=False)
        return out.logits[0, -1], list(out.attentions), single["input_ids"].shape[1] - 1
    if name == "timm-vit":
        twin = copy.deepcopy(model)
        captured = []
        for block in twin.blocks:
            block.attn.fused_attn = False
            block.attn.attn_drop.register_forward_hook(lambda m, a, o: captured.append(o))
        return twin(single)[0], captured, 0
    if name == "torchvision-vit":
        return _torchvision_by_hand(model, single)
    twin = copy.deepcopy(model)
    twin.switch.explicit = True
    return twin(single)[0], twin.switch.attentions, 0


def _torchvision_by_hand(model, x):
    """torchvision's encoder written out, attention as an explicit softmax."""
    x = model._process_input(x)
    x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1) + model.encoder.pos_embedding
    attentions = []
    for layer in model.encoder.layers:
        mha = layer.self_attention
        b, n, d = x.shape
        q, k, v = F.linear(layer.ln_1(x), mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, mha.num_heads, d // mha.num_heads).transpose(1, 2) for t in (q, k, v))
        attn = (q @ k.transpose(-2, -1) / math.sqrt(d // mha.num_heads)).softmax(dim=-1)
        attentions.append(attn)
        x = x + mha.out_proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        x = x + layer.mlp(layer.ln_2(x))
    return model.heads(model.encoder.ln(x)[:, 0])[0], attentions, 0


def reference_relevance(name, model, single, method, target=None):
    """The papers' rules for one sample from its eager attention: (explained row (N,), target)."""
    scores, attentions, row = reference_forward(name, model, single)
    target = int(scores.argmax()) if target is None else target
    n = attentions[0].shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    if method == "raw_attention":
        return attentions[-1][0].mean(0)[row].detach(), target
    if method == "rollout":
        joint = eye
        for a in attentions:
            m = a[0].mean(0) + eye
            joint = (m / m.sum(-1, keepdim=True)) @ joint
        return joint[row].detach(), target
    grads = torch.autograd.grad(scores[target], attentions)
    if method == "attn_gradcam":
        g, a = grads[-1][0], attentions[-1][0]
        weights = g[:, row, prefix_tokens(name):].mean(-1)
        return (a[:, row, :] * weights[:, None]).mean(0).clamp(min=0).detach(), target
    R = eye
    for g, a in zip(grads, attentions):
        R = R + (g[0] * a[0]).clamp(min=0).mean(0) @ R
    return R[row].detach(), target
