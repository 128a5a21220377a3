"""Reference input relevance from lxt 2.1's efficient AttnLRP (Achtibat et al., ICML 2024), for
tests/test_attnlrp_lxt.py. Runs in lxt's own environment (torch 2.13 CPU, transformers < 4.54,
lxt 2.1; built by scripts/make_lxt_env.sh), never in relfast's.

    /work/lxt-env/bin/python scripts/lxt_reference.py --out tests/lxt_reference

For each family lxt 2.1 patches (Llama, Qwen2, GPT-2, BERT, torchvision ViT) it builds a tiny
seeded float64 model, saves it (``save_pretrained``; torchvision: its ``state_dict`` and the
constructor's arguments), a padded batch of 3 inputs of different lengths (causal LMs padded on
the left, BERT on the right), and, for each sample alone and unpadded, the explained logit's
index (the argmax; causal LMs: of the next-token logits at the last token) and lxt's relevance,
computed as lxt's README does: ``lxt.efficient.monkey_patch`` of the family's module, one forward
from the input embeddings (leaf), backward of the explained logit, ``(x * x.grad).sum(-1)``.
Images: at the patch embedding's output (``conv_proj``), summed over the channels, one value per
patch in row-major order (where relfast reads image relevance; lxt's README goes on to the pixels
with zennit rules, which are not AttnLRP).

Variants, each in a fresh process (lxt patches classes of the process, for good):
  attnlrp  lxt's ``attnLRP`` map (``get_default_map``) for the HF families. torchvision: lxt 2.1's
           only map for it is ``cp_LRP`` (CP-LRP inside the attention: no relevance through the
           softmax); the variant ``attnlrp`` uses that map's LayerNorm and GELU patches and
           replaces its attention patch by AttnLRP's, written here with lxt's own rule
           (``lxt.efficient.rules.divide_gradient``: q, k gradients / 4, v / 2, exactly what lxt's
           ``patch_attention`` does for HF attention).
  cp_lrp   lxt's ``cp_LRP`` map where lxt has one (Llama, Qwen2, GPT-2, torchvision; BERT has
           none): the test uses it to show that its tolerance tells AttnLRP from CP-LRP.

Files, under --out, per family: the model (config.json + model.safetensors, or torchvision.pt +
torchvision.json), reference.pt (inputs, targets, per-sample logits, versions) and lxt_<variant>.pt
(a list of per-sample relevance tensors). Every file is small (a few KB to ~20 KB).
"""
import argparse
import json
import os
import subprocess
import sys

import torch

FAMILIES = ("llama", "qwen2", "gpt2", "bert", "torchvision_vit")
VARIANTS = {"llama": ("attnlrp", "cp_lrp"), "qwen2": ("attnlrp", "cp_lrp"), "gpt2": ("attnlrp", "cp_lrp"),
            "bert": ("attnlrp",), "torchvision_vit": ("attnlrp", "cp_lrp")}
CAUSAL_LMS = ("llama", "qwen2", "gpt2")
VOCAB, HIDDEN, HEADS, LAYERS, INTERMEDIATE, CLASSES = 32, 8, 2, 2, 16, 3
LENGTHS = (8, 5, 3)  # batch of 3, different lengths
VIT = dict(image_size=16, patch_size=4, num_layers=LAYERS, num_heads=HEADS, hidden_dim=HIDDEN, mlp_dim=INTERMEDIATE,
           num_classes=CLASSES)


def import_torchvision():
    """torchvision 0.28 from PyPI is a CUDA build: with the CPU torch its C ops do not load, which
    it tolerates except for two fake-kernel registrations (nms, qnms) that it makes unchecked. With
    those two schemas defined first, the pure-Python models (the ViT) import and run."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_torchvision.library = library  # keep the definitions alive
        import torchvision  # noqa: F401


import_torchvision()
import transformers  # noqa: E402  (after the torchvision fix: transformers imports torchvision)


# ---- models and inputs ----

def randomise(model, seed):
    """Every parameter drawn again, larger than the default initialisation, so the attention is far
    from uniform and every bias and norm weight is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() == 1 and bool((p == 1).all()):  # a norm's weight
                p.copy_(1 + 0.1 * noise)
            elif p.dim() == 1:  # a bias
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.3 * noise)
    return model


def build(family):
    torch.manual_seed(0)
    if family in ("llama", "qwen2"):
        config_class = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
        model_class = transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen2ForCausalLM
        config = config_class(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                              num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=1,
                              max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                              tie_word_embeddings=False)
        model = model_class(config)
    elif family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                         n_inner=INTERMEDIATE, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    elif family == "bert":
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                         num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
                                         max_position_embeddings=16, num_labels=CLASSES, pad_token_id=0)
        model = transformers.BertForSequenceClassification(config)
    else:
        from torchvision.models.vision_transformer import VisionTransformer
        model = VisionTransformer(**VIT)
    return randomise(model.double().eval(), seed=1)


def batch_inputs(family):
    """The padded batch (what relfast explains at once) as a dict of tensors."""
    g = torch.Generator().manual_seed(2)
    if family == "torchvision_vit":
        return {"pixels": torch.randn(len(LENGTHS), 3, VIT["image_size"], VIT["image_size"], generator=g,
                                      dtype=torch.float64)}
    n = max(LENGTHS)
    ids = torch.randint(1, VOCAB, (len(LENGTHS), n), generator=g)
    mask = torch.zeros(len(LENGTHS), n, dtype=torch.long)
    for b, length in enumerate(LENGTHS):
        if family in CAUSAL_LMS:
            mask[b, n - length:] = 1  # left padding
        else:
            mask[b, :length] = 1
    ids = ids * mask  # pad id 0
    return {"input_ids": ids, "attention_mask": mask}


def samples(family, inputs):
    """Each sample alone, unpadded: (1, n) ids or (1, 3, H, W) pixels."""
    if family == "torchvision_vit":
        return [inputs["pixels"][b:b + 1] for b in range(inputs["pixels"].shape[0])]
    return [inputs["input_ids"][b:b + 1, inputs["attention_mask"][b].bool()] for b in range(len(LENGTHS))]


def versions():
    from importlib.metadata import version
    return {name: version(name) for name in ("lxt", "torch", "transformers", "torchvision")}


# ---- stage 1 (no lxt patches in this process): models, inputs, targets, logits ----

def explained_logits(family, model, sample):
    if family == "torchvision_vit":
        return model(sample)[0]
    if family in CAUSAL_LMS:
        return model(input_ids=sample, use_cache=False).logits[0, -1]
    return model(input_ids=sample).logits[0]


def write_models(out):
    for family in FAMILIES:
        folder = os.path.join(out, family)
        os.makedirs(folder, exist_ok=True)
        model = build(family)
        if family == "torchvision_vit":
            torch.save(model.state_dict(), os.path.join(folder, "torchvision.pt"))
            with open(os.path.join(folder, "torchvision.json"), "w") as f:
                json.dump(VIT, f, indent=1)
        else:
            model.save_pretrained(folder, safe_serialization=True)
        inputs = batch_inputs(family)
        with torch.no_grad():
            logits = torch.stack([explained_logits(family, model, s) for s in samples(family, inputs)])
        reference = {"family": family, "inputs": inputs, "targets": logits.argmax(-1), "logits": logits,
                     "versions": versions()}
        torch.save(reference, os.path.join(folder, "reference.pt"))


# ---- stage 2 (a fresh process per family and variant): lxt's relevance ----

def attnlrp_multi_head_attention_forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                                         attn_mask=None, average_attn_weights=True, is_causal=False):
    """AttnLRP in ``nn.MultiheadAttention`` (torchvision's ViT: batch-first self-attention, packed
    in-projection, no masks): SDPA with lxt's uniform rule on both products, as lxt's
    ``patch_attention`` applies it to HF attention (q, k: gradient / 4; v: / 2)."""
    from lxt.efficient.rules import divide_gradient
    import torch.nn.functional as F

    assert self.batch_first and self._qkv_same_embed_dim and key_padding_mask is None and attn_mask is None
    assert query is key and key is value and not is_causal
    b, n, d = query.shape
    h = self.num_heads
    q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, h, d // h).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2))
    return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), None


def patched(family, variant):
    """lxt's patches for the family and variant (applied to this process's classes); returns the
    module whose model classes to use."""
    from lxt.efficient import monkey_patch
    from lxt.efficient.models import get_default_map

    if family == "torchvision_vit":
        from functools import partial
        from torchvision.models import vision_transformer
        import lxt.efficient.models.vit_torch as vit_torch
        from lxt.efficient.patches import patch_method

        assert get_default_map(vision_transformer) is vit_torch.cp_LRP  # lxt 2.1 has only CP-LRP for it
        patch_map = dict(vit_torch.cp_LRP)
        if variant == "attnlrp":
            patch_map[vision_transformer.nn.MultiheadAttention] = partial(patch_method,
                                                                         attnlrp_multi_head_attention_forward)
        monkey_patch(vision_transformer, patch_map)
        return vision_transformer
    module = {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2", "bert": "bert"}[family]
    hf_module = sys.modules.get(f"transformers.models.{module}.modeling_{module}")
    if hf_module is None:
        hf_module = __import__(f"transformers.models.{module}.modeling_{module}", fromlist=["_"])
    lxt_module = __import__(f"lxt.efficient.models.{module}", fromlist=["_"])
    if variant == "attnlrp":
        assert get_default_map(hf_module) is lxt_module.attnLRP
        monkey_patch(hf_module)  # lxt's default: its attnLRP map
    else:
        monkey_patch(hf_module, lxt_module.cp_LRP)
    return hf_module


def load_patched(family, variant, folder):
    module = patched(family, variant)
    if family == "torchvision_vit":
        with open(os.path.join(folder, "torchvision.json")) as f:
            model = module.VisionTransformer(**json.load(f)).double()  # float64 before the weights go in
        model.load_state_dict(torch.load(os.path.join(folder, "torchvision.pt"), weights_only=True))
        return model.eval()
    name = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel",
            "bert": "BertForSequenceClassification"}[family]
    return getattr(module, name).from_pretrained(folder, torch_dtype=torch.float64).eval()


def lxt_relevance(family, model, sample, target):
    """lxt's README recipe for one unpadded sample: (relevance (n,) or (patches,), the logit)."""
    if family == "torchvision_vit":
        kept = []

        def keep(module, args, output):
            output.retain_grad()
            kept.append(output)

        handle = model.conv_proj.register_forward_hook(keep)
        logit = model(sample.clone().requires_grad_())[0, target]
        handle.remove()
        logit.backward()
        x = kept[0]
        return (x * x.grad).sum(1).flatten().detach(), logit.detach()
    embeddings = model.get_input_embeddings()(sample).detach().requires_grad_()
    if family in CAUSAL_LMS:
        logit = model(inputs_embeds=embeddings, use_cache=False).logits[0, -1, target]
    else:
        logit = model(inputs_embeds=embeddings).logits[0, target]
    logit.backward()
    return (embeddings * embeddings.grad).sum(-1)[0].detach(), logit.detach()


def explain(out, family, variant):
    folder = os.path.join(out, family)
    reference = torch.load(os.path.join(folder, "reference.pt"), weights_only=True)
    model = load_patched(family, variant, folder)
    relevance = []
    for b, sample in enumerate(samples(family, reference["inputs"])):
        target = int(reference["targets"][b])
        r, logit = lxt_relevance(family, model, sample, target)
        # the patched forward computes the model's own value (the weights loaded, the patches exact)
        want = reference["logits"][b, target]
        assert abs(float(logit - want)) <= 1e-9 * (1 + abs(float(want))), (family, variant, float(logit),
                                                                            float(want))
        relevance.append(r)
    torch.save(relevance, os.path.join(folder, f"lxt_{variant}.pt"))
    print(f"{family:16s} {variant:8s} max |R| per sample: " + ", ".join(f"{float(r.abs().max()):.3g}" for r in relevance))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "lxt_reference"))
    parser.add_argument("--family", choices=FAMILIES, help="(internal) stage 2 for one family")
    parser.add_argument("--variant", choices=("attnlrp", "cp_lrp"), help="(internal) stage 2 variant")
    args = parser.parse_args()
    if args.family:
        explain(args.out, args.family, args.variant)
        return
    write_models(args.out)
    for family in FAMILIES:
        for variant in VARIANTS[family]:
            subprocess.run([sys.executable, __file__, "--out", args.out, "--family", family, "--variant", variant],
                           check=True)
    print("versions:", versions())
    print("written:", os.path.abspath(args.out))


if __name__ == "__main__":
    main()
