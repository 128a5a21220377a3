"""Times lxt 2.1's efficient AttnLRP (the authors' library) on the shapes of
benchmarks/bench_attnlrp.py, in lxt's own environment (torch 2.13 CPU, transformers < 4.54;
built by scripts/make_lxt_env.sh), never in relfast's.

Models (float32, eval, parameters frozen; ``SPECS`` below, shared with bench_attnlrp.py):

* ``llama``: a Llama-3.2-1B-shaped ``LlamaForCausalLM`` cut to fit a 2-core CPU (hidden 2048,
  MLP 8192, 32 heads, 8 KV heads, as the 1B model; 4 layers of its 16; vocabulary 32000, tied),
  one prompt of 512 tokens, explaining the predicted next token;
* ``vitb16``: torchvision's ViT-B/16 (224 px, 1000 classes), batch 8, explaining each image's
  predicted class;
* ``gpt2s``: a GPT-2-small-shaped ``GPT2LMHeadModel`` at 4096 tokens (memory).

Variants (one per process: lxt patches the classes of the process for good):

* ``lxt``: lxt's README recipe: ``lxt.efficient.monkey_patch`` of the family's module with its
  default map (``attnLRP``), one forward from the input embeddings (a leaf), one backward of the
  explained logits, ``(x * x.grad).sum(-1)``. torchvision's ViT: lxt 2.1's LayerNorm and GELU
  patches with AttnLRP's attention rule written with lxt's ``divide_gradient`` (as
  scripts/lxt_reference.py does: lxt 2.1 has only CP-LRP for that family). Images: relevance at
  the patch embedding's output, summed over channels.
* ``floor``: the same call on the unpatched model: one forward plus one input-gradient backward,
  under this environment's torch.

    # standalone: the model from the seed, 1 memory run + --rounds timed calls, JSON on stdout
    /work/lxt-env/bin/python scripts/bench_lxt.py --model llama --variant lxt --rounds 3
    # as benchmarks/bench_attnlrp.py drives it: weights saved by relfast's side, commands on stdin
    /work/lxt-env/bin/python scripts/bench_lxt.py --model llama --variant lxt --weights W.pt --serve

Serve protocol (one line each way; all other output goes to stderr): ``run`` -> ``ok``;
``memory`` -> the bytes of peak working memory of one call; ``relevance PATH`` -> ``ok`` (the
relevance of one call saved with torch.save); ``quit``.

Memory: the peak resident set during one call above the resident set before it (free heap
returned with malloc_trim, VmHWM reset through /proc/self/clear_refs, glibc's mmap threshold
fixed), exactly as benchmarks/bench_scaling.py measures relfast.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when bench_attnlrp.py imports this file
from side_memory import working_memory  # noqa: E402 (scripts/side_memory.py, beside this file)

HERE = os.path.dirname(os.path.abspath(__file__))

# The models, built the same way in both environments (transformers 5 on relfast's side, 4.53
# here): the config from these arguments, then the weights relfast's side saved.
SPECS = {
    "llama": dict(config=dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=4,
                              num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                              tie_word_embeddings=True),
                  batch=1, tokens=512),
    "gpt2s": dict(config=dict(n_positions=4096), batch=1, tokens=4096),
    "vitb16": dict(config=dict(image_size=224, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768,
                               mlp_dim=3072, num_classes=1000),
                   batch=8, tokens=197),
}


def make_inputs(name):
    """The seeded inputs: (B, N) token ids or (B, 3, 224, 224) pixels (same values under both torches)."""
    spec = SPECS[name]
    g = torch.Generator().manual_seed(0)
    if name == "vitb16":
        size = spec["config"]["image_size"]
        return torch.randn(spec["batch"], 3, size, size, generator=g)
    vocab = spec["config"].get("vocab_size", 50257)
    return torch.randint(0, vocab, (spec["batch"], spec["tokens"]), generator=g)


def init_head(name, model):
    """torchvision's ViT starts its head at zero (every input gradient 0): drawn here instead,
    N(0, 0.02) from seed 1, on both sides."""
    if name == "vitb16":
        with torch.no_grad():
            model.heads.head.weight.copy_(torch.randn(model.heads.head.weight.shape,
                                                      generator=torch.Generator().manual_seed(1)) * 0.02)
    return model


# ---- models ----

def build(name, variant, weights=None):
    """The model of ``name`` (float32, eval, parameters frozen), lxt's patches applied first for
    ``variant == "lxt"``; weights from ``weights`` (a state_dict saved by torch.save) or the seed."""
    sys.path.insert(0, HERE)
    import lxt_reference  # noqa: F401  (imports torchvision the way the CPU torch allows)

    family = {"llama": "llama", "gpt2s": "gpt2", "vitb16": "torchvision_vit"}[name]
    if variant == "lxt":
        module = lxt_reference.patched(family, "attnlrp")
    elif family == "torchvision_vit":
        from torchvision.models import vision_transformer as module
    else:
        module = __import__(f"transformers.models.{family}.modeling_{family}", fromlist=["_"])
    torch.manual_seed(0)
    config = SPECS[name]["config"]
    if name == "vitb16":
        model = init_head(name, module.VisionTransformer(**config))
    elif name == "llama":
        import transformers
        model = module.LlamaForCausalLM(transformers.LlamaConfig(**config))
    else:
        import transformers
        model = module.GPT2LMHeadModel(transformers.GPT2Config(**config))
    if weights is not None:
        state = torch.load(weights, weights_only=True, mmap=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # HF: a tied head is saved once (either name) and buffers may differ between versions
        missing = [k for k in missing if not k.endswith(("lm_head.weight", "rotary_emb.inv_freq", "attn.bias",
                                                         "attn.masked_bias"))]
        assert not missing and not unexpected, (missing, unexpected)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        del state
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def explain_call(name, model, inputs):
    """One explanation (lxt's recipe; on the unpatched model, the floor): -> (B, N) relevance."""
    if name == "vitb16":
        kept = []

        def leaf(module, args, output):
            output = output.detach().requires_grad_()
            kept.append(output)
            return output

        handle = model.conv_proj.register_forward_hook(leaf)
        try:
            with torch.enable_grad():
                logits = model(inputs)
        finally:
            handle.remove()
        x = kept[0]
    else:
        with torch.enable_grad():
            x = model.get_input_embeddings()(inputs).detach().requires_grad_()
            logits = model(inputs_embeds=x, use_cache=False).logits[:, -1]
    y = logits.gather(1, logits.detach().argmax(dim=-1, keepdim=True)).sum()
    (grad,) = torch.autograd.grad(y, x)
    relevance = x.detach() * grad
    return relevance.sum(1).flatten(1) if name == "vitb16" else relevance.sum(-1)


# ---- entry points ----

def serve(name, variant, weights):
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # everything else printed goes to stderr
    model = build(name, variant, weights)
    inputs = make_inputs(name)
    call = lambda: explain_call(name, model, inputs)  # noqa: E731
    protocol.write("ready\n")
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "run":
            call()
            protocol.write("ok\n")
        elif command == "memory":
            protocol.write(f"{working_memory(call)}\n")
        elif command == "relevance":
            torch.save(call(), argument)
            protocol.write("ok\n")
        elif command == "quit":
            break
        else:
            protocol.write(f"error unknown command {command!r}\n")


def standalone(name, variant, weights, rounds):
    model = build(name, variant, weights)
    inputs = make_inputs(name)
    call = lambda: explain_call(name, model, inputs)  # noqa: E731
    memory = working_memory(call)  # also the warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    from importlib.metadata import version
    print(json.dumps({"model": name, "variant": variant, "median_s": statistics.median(times) if times else None,
                      "times_s": times, "memory_bytes": memory, "torch": torch.__version__,
                      "lxt": version("lxt"), "transformers": version("transformers"),
                      "threads": torch.get_num_threads()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=tuple(SPECS), required=True)
    parser.add_argument("--variant", choices=("lxt", "floor"), default="lxt")
    parser.add_argument("--weights", help="state_dict saved by torch.save (default: the seed's weights)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help="take commands on stdin (bench_attnlrp.py)")
    args = parser.parse_args()
    if args.serve:
        serve(args.model, args.variant, args.weights)
    else:
        standalone(args.model, args.variant, args.weights, args.rounds)


if __name__ == "__main__":
    main()
