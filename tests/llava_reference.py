"""Tiny random LLaVA models and a float64 reference of their maps, written apart from relfast.

The reference runs one unpadded sample through an eager copy of the model with
``output_attentions=True``, keeps the gradients of every attention map (vision tower and language
model) of the target logit, and forms the papers' matrices explicitly:

    Ā_l = mean_h (∇A_l ⊙ A_l)^+          (Ā_l = 0 where no gradient reached layer l)
    R_t = (I + Ā_L) ··· (I + Ā_1)         over the LM's N tokens  -> text row r = R_t[N - 1]
    R_v = (I + Ā_Lv) ··· (I + Ā_1)        over the vision tower's 1 + h·w tokens
    image = (r[placeholders] · P · R_v)[1:] as (h, w)

where P (F × (1 + h·w)) puts image feature j on the vision token it was made from (the patches
for the "default" select strategy, the class token then the patches for "full").
"""
import copy

import torch
import transformers

VOCAB, IMAGE_TOKEN = 64, 63
TEXT_IDS = (1, 60)  # prompt and generated words are drawn from [1, 60): never the image token


def build(strategy="default", feature_layer=-2, vision_layers=3, image=32, patch=8, text_layers=2, seed=0,
          dtype=torch.float64, language="Llama"):
    """A tiny LLaVA: CLIP vision tower (hidden 16, 2 heads) and a Llama (or ``language="Qwen2"``)
    LM (hidden 32, 4 heads, 2 key/value heads), weights drawn larger than HF's default so
    attention is far from uniform."""
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(image_size=image, patch_size=patch, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=vision_layers, num_attention_heads=2,
                                           initializer_factor=4.0)
    text = getattr(transformers, language + "Config")(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=text_layers, num_attention_heads=4,
                                                       num_key_value_heads=2, max_position_embeddings=128,
                                                       bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                                       initializer_range=0.15)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                      vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy)
    return transformers.LlavaForConditionalGeneration(config).to(dtype).eval()


def features(model) -> int:
    vision = model.config.vision_config
    grid = (vision.image_size // vision.patch_size) ** 2
    return grid + (1 if model.config.vision_feature_select_strategy == "full" else 0)


def prompts(model, shapes=((3, 4), (1, 2), (0, 1)), seed=1):
    """One prompt per (words before, words after) the image: its placeholders between them, padded
    on the left to the longest; one random image per prompt."""
    g = torch.Generator().manual_seed(seed)
    count = features(model)
    rows = [torch.cat([torch.randint(*TEXT_IDS, (before,), generator=g), torch.full((count,), IMAGE_TOKEN),
                       torch.randint(*TEXT_IDS, (after,), generator=g)]) for before, after in shapes]
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, n - len(row):] = row
        mask[b, n - len(row):] = 1
    vision = model.config.vision_config
    dtype = next(model.parameters()).dtype
    pixels = torch.randn(len(rows), 3, vision.image_size, vision.image_size, generator=g, dtype=torch.float64)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels.to(dtype)}


def eager_twin(model):
    """A float64 copy running eager attention (its maps are tensors of the graph)."""
    twin = copy.deepcopy(model).double()
    twin.set_attn_implementation("eager")
    return twin


def _head_mean(attention, grad):
    if grad is None:  # a layer the explained logit does not depend on
        return torch.zeros(attention.shape[-2:], dtype=attention.dtype)
    return (grad[0] * attention[0]).clamp(min=0).mean(0)


def _product(attentions, grads):
    n = attentions[0].shape[-1]
    R = torch.eye(n, dtype=torch.float64)
    for a, g in zip(attentions, grads):
        R = R + _head_mean(a, g) @ R
    return R


def reference_maps(twin, input_ids, pixel_values, target=None):
    """One unpadded sample: input_ids (n,), pixel_values (C, H, W). Returns (text row (n,), image
    map (h, w), logits at the last token (V,), the target explained)."""
    out = twin(input_ids=input_ids[None], pixel_values=pixel_values[None].double(), output_attentions=True,
               use_cache=False)
    text_maps, vision_maps = list(out.attentions), list(out.image_outputs.attentions)
    logits = out.logits[0, -1]
    target = int(logits.argmax()) if target is None else int(target)
    grads = torch.autograd.grad(logits[target], text_maps + vision_maps, allow_unused=True)
    R_t = _product(text_maps, grads[:len(text_maps)])
    R_v = _product(vision_maps, grads[len(text_maps):])
    r = R_t[-1]
    placeholders = (input_ids == twin.config.image_token_id).nonzero().flatten()
    first = 1 if twin.config.vision_feature_select_strategy == "default" else 0
    P = torch.zeros(len(placeholders), R_v.shape[0], dtype=torch.float64)
    P[torch.arange(len(placeholders)), first + torch.arange(len(placeholders))] = 1
    vision = twin.config.vision_config
    side = vision.image_size // vision.patch_size
    image = (r[placeholders] @ P @ R_v)[1:].reshape(side, side)
    return r.detach(), image.detach(), logits.detach(), target
