"""Tiny random-weight HuggingFace models of the four bi-modal / encoder-decoder families and their inputs.

Every builder returns a float64 model in ``.eval()`` built from a small config under a fixed seed (the seed is set
inside ``torch.random.fork_rng``, so building a model leaves the caller's global RNG untouched). Nothing is downloaded.
HF's default init (std 0.02, zero biases) makes these tiny models nearly uniform-attention with gradients ~1e-5 and
some Ā identically zero; VisualBERT, LXMERT and DETR therefore use an init std of 0.2, and DETR also random biases
(its first decoder layer sees zero inputs, so with zero value biases that layer's ∇A would be exactly 0).
Every ``*_inputs(..., seed)`` draws from its own ``torch.Generator``; texts are right-padded and have different
lengths within a batch.

Attention implementation by default (``model.config._attn_implementation`` in transformers 5.23):

- CLIP: ``sdpa`` (``eager`` on request; CLIP's eager path computes the softmax in float32 even for a float64 model).
- VisualBERT: ``eager`` (explicit ``nn.functional.softmax`` in ``VisualBertSelfAttention``; no sdpa support).
- LXMERT: ``eager`` (explicit ``nn.functional.softmax`` in ``LxmertAttention``; no sdpa support).
- DETR: ``sdpa`` (``eager`` on request; eager softmax in the input dtype).
"""
import torch
import transformers

VOCAB = 60

# CLIP text tokens: BOS at position 0, words, then the EOT token, then padding with the EOT id (as CLIP's tokenizer
# pads). The text config's eos_token_id is EOT (!= 2), so HF pools at the FIRST position whose id == EOT.
CLIP_BOS, CLIP_EOT = 1, VOCAB - 1
# BERT-style tokens of VisualBERT and LXMERT.
PAD, CLS, SEP = 0, 1, 2


def _seeded(build, seed=0, bias_std=0.0):
    """``build()`` under ``torch.manual_seed(seed)``, optionally every bias redrawn from N(0, bias_std²)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if bias_std and name.endswith("bias"):
                    parameter.normal_(std=bias_std)
    return model.double().eval()


def _lengths(batch, n, shortest):
    """Different text lengths per sample (the first one unpadded): n, n-2, n-4, ... cycling above ``shortest``."""
    return [n - (2 * b) % (n - shortest + 1) for b in range(batch)]


def _bert_text(batch, n, gen, shortest=3):
    """[CLS] words [SEP] [PAD]...; returns input_ids, attention_mask, token_type_ids (all int64, (batch, n))."""
    ids = torch.full((batch, n), PAD, dtype=torch.int64)
    mask = torch.zeros(batch, n, dtype=torch.int64)
    for b, length in enumerate(_lengths(batch, n, shortest)):
        words = torch.randint(SEP + 1, VOCAB, (length - 2,), generator=gen)
        ids[b, :length] = torch.cat([torch.tensor([CLS]), words, torch.tensor([SEP])])
        mask[b, :length] = 1
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))


# ---- CLIP ----

def clip():
    """``CLIPModel``: ViT 32x32 px / patch 8 (16 patches + CLS = 17 tokens), 2 layers, 4 heads, hidden 32; causal text
    encoder, 2 layers, 4 heads, hidden 32, vocab 60, 16 positions; projection 16.

    CONFIGS: attention is ``sdpa`` by default (``output_attentions=True`` needs ``eager``, whose softmax runs in
    float32). Text pooling (``CLIPTextModel.forward``): ``eos_token_id == 2`` -> ``input_ids.argmax(-1)``; otherwise
    the first position with ``input_ids == eos_token_id``. Here ``eos_token_id = CLIP_EOT = 59``.
    """
    vision = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64)
    text = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       max_position_embeddings=16, intermediate_size=64, bos_token_id=CLIP_BOS,
                                       eos_token_id=CLIP_EOT, pad_token_id=CLIP_EOT)
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    return _seeded(lambda: transformers.CLIPModel(config))


def clip_inputs(batch_images, batch_texts, seed, length=9):
    """pixel_values (Bi, 3, 32, 32) float64; input_ids (Bt, length) = BOS words EOT EOT... with the EOT at a different
    position per text (lengths length, length-2, ...), attention_mask 1 up to and including the first EOT."""
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_images, 3, 32, 32, generator=gen, dtype=torch.float64)
    ids = torch.full((batch_texts, length), CLIP_EOT, dtype=torch.int64)
    mask = torch.zeros(batch_texts, length, dtype=torch.int64)
    for t, n in enumerate(_lengths(batch_texts, length, 3)):
        ids[t, 0] = CLIP_BOS
        ids[t, 1:n - 1] = torch.randint(CLIP_BOS + 1, CLIP_EOT, (n - 2,), generator=gen)
        mask[t, :n] = 1
    return dict(pixel_values=pixel_values, input_ids=ids, attention_mask=mask)


# ---- VisualBERT ----

def visual_bert():
    """``VisualBertForQuestionAnswering``: hidden 32, 2 layers, 4 heads, visual_embedding_dim 12, 5 labels.

    CONFIGS: ``eager`` only (explicit softmax, ``output_attentions`` returns the maps over [text; regions]).
    Pooling (``VisualBertForQuestionAnswering.forward``): ``index_to_gather = attention_mask.sum(1) - 2`` with the
    TEXT attention mask, i.e. the last text token before [SEP] of right-padded text; logits are not log-softmaxed
    unless labels are given.
    """
    config = transformers.VisualBertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, visual_embedding_dim=12, num_labels=5,
                                           max_position_embeddings=40, initializer_range=0.2)
    return _seeded(lambda: transformers.VisualBertForQuestionAnswering(config))


def visual_bert_inputs(batch, seed, length=8, regions=6):
    """input_ids / attention_mask / token_type_ids (batch, length), right-padded text of different lengths;
    visual_embeds (batch, regions, 12) float64; visual_attention_mask ones (batch, regions)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = _bert_text(batch, length, gen)
    inputs["visual_embeds"] = torch.randn(batch, regions, 12, generator=gen, dtype=torch.float64)
    inputs["visual_attention_mask"] = torch.ones(batch, regions, dtype=torch.int64)
    return inputs


# ---- LXMERT ----

def lxmert():
    """``LxmertForQuestionAnswering``: hidden 32, 4 heads, 3 language / 2 vision (r) / 2 cross (x) layers,
    visual_feat_dim 12, visual_pos_dim 4, 5 QA labels.

    CONFIGS: ``eager`` only (explicit softmax in ``LxmertAttention``). ``output_attentions`` returns only the language
    and vision self-attention maps and the cross layers' language->vision maps; the cross layers' vision->language
    maps and their self-attention maps are never returned. The task_* flags only matter to
    ``LxmertForPreTraining``; the QA model always has its answer head (on the pooled language token 0).
    """
    config = transformers.LxmertConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, l_layers=3, r_layers=2,
                                       x_layers=2, visual_feat_dim=12, visual_pos_dim=4, num_qa_labels=5,
                                       intermediate_size=64, initializer_range=0.2)
    return _seeded(lambda: transformers.LxmertForQuestionAnswering(config))


def lxmert_inputs(batch, seed, length=8, regions=7):
    """input_ids / attention_mask / token_type_ids (batch, length), right-padded text of different lengths;
    visual_feats (batch, regions, 12) float64; visual_pos (batch, regions, 4) float64 in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    inputs = _bert_text(batch, length, gen)
    inputs["visual_feats"] = torch.randn(batch, regions, 12, generator=gen, dtype=torch.float64)
    inputs["visual_pos"] = torch.rand(batch, regions, 4, generator=gen, dtype=torch.float64)
    return inputs


# ---- DETR ----

DETR_GRID = (8, 8)  # feature grid (h, w) of a 64x64 image: ResNet stem /4, second stage /2


def detr():
    """``DetrForObjectDetection``: d_model 32, 2 encoder + 2 decoder layers, 4 heads, ffn 64, 6 queries, 4 labels
    (logits (B, 6, 5), the last class is "no object"), on a tiny random HF ``ResNetConfig`` backbone (basic blocks,
    hidden sizes 8/16, output stage2, stride 8): a 64x64 image gives an 8x8 grid, 64 encoder tokens.

    Backbone: ``use_timm_backbone=False`` with an explicit ``backbone_config`` (without a backbone_config and with the
    default ``use_timm_backbone=True``, DetrConfig builds a timm resnet50 backbone config); no pretrained weights.

    CONFIGS: ``sdpa`` by default; ``output_attentions=True`` needs ``eager`` (softmax in the input dtype) and then
    returns encoder_attentions (B, 4, 64, 64) x2, decoder_attentions (B, 4, 6, 6) x2, cross_attentions (B, 4, 6, 64) x2.
    """
    backbone = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                         layer_type="basic", out_features=["stage2"])
    config = transformers.DetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False,
                                     d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=6,
                                     num_labels=4, init_std=0.2)
    return _seeded(lambda: transformers.DetrForObjectDetection(config), bias_std=0.1)


def detr_inputs(batch, seed):
    """pixel_values (batch, 3, 64, 64) float64 (no pixel_mask: the model uses ones)."""
    gen = torch.Generator().manual_seed(seed)
    return dict(pixel_values=torch.randn(batch, 3, 64, 64, generator=gen, dtype=torch.float64))
