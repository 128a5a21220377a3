"""Attributes every generated token of an answer with captum 0.9 (``LLMGradientAttribution`` over
``LayerGradientXActivation`` at the input embedding layer), the peer of relfast's
``Explainer.generate`` in benchmarks/bench_generate.py. Runs in captum's own environment
(torch 2.13 CPU, transformers, captum 0.9; built by scripts/make_captum_env.sh), never in
relfast's: it does not import relfast.

Input: one file (torch.save) written by the benchmark:

    {"config": GPT2Config.to_dict(), "attn_implementation": "sdpa", "state_dict": {...},
     "sequences": (B, N) int64, "attention_mask": (B, N) int64, "prompt_length": P,
     "tokens": (B, T) int64}

the model's weights and relfast's generated answer (prompts padded on the left, then the T
generated tokens). What a captum user does for a generated answer, sample after sample (captum
takes batch size 1):

    prompt = the sample's real prompt tokens (its left padding removed)
    inp = TextTokenInput(text of the prompt, tokenizer)
    LLMGradientAttribution(LayerGradientXActivation(model, model.get_input_embeddings()),
                           tokenizer).attribute(inp, target=<the sample's answer tokens>)

``attribute`` loops over the answer's tokens itself: for token t, one forward over the prompt and
the answer's first t tokens and one backward of token t's log-probability, gradient x activation
at the embedding layer's output, summed over the width; kept for the prompt's tokens only. Result
per sample: ``token_attr``, (T, P_b) (P_b: the sample's real prompt length). The model is used as
loaded (``eval()``, parameters left requiring grad as ``from_pretrained`` leaves them).

The tokenizer is an offline stand-in (nothing may download): a ``tokenizers`` WordLevel model
whose token ``t<i>`` is id ``i`` (whitespace split), wrapped in ``PreTrainedTokenizerFast``; its
text of an id list encodes back to the same ids, which is checked.

Memory: the peak resident set during one call above the resident set before it (free heap
returned with malloc_trim, VmHWM reset through /proc/self/clear_refs, glibc's mmap threshold
fixed), the way benchmarks/bench_scaling.py's ``working_memory`` measures relfast (the same idea
written here; relfast is not importable in this environment).

    # standalone: one memory run, then --rounds timed runs, one JSON line on stdout;
    # --out writes the per-sample (T, P_b) attribution matrices (a list, torch.save)
    /work/captum-env/bin/python scripts/captum_generate.py --case CASE.pt --rounds 1 --out ATTR.pt
    # as benchmarks/bench_generate.py drives it
    /work/captum-env/bin/python scripts/captum_generate.py --case CASE.pt --serve

Before any measured run, a small attribution (a few prompt tokens, two answer tokens) pays
what a fresh process pays once. Serve protocol (one line each way; everything else goes to
stderr): after loading and that warm-up, the script writes ``ready``; ``memory`` -> the bytes
of peak working memory of one run of all samples; ``run`` -> a JSON object with the run's
in-process ``time`` (s); ``attributions PATH`` -> ``ok``, the last run's matrices saved there;
``info`` -> a JSON object of the versions; ``quit``.

scripts/inseq_generate.py reuses the helpers here (case loading, tokenizer, memory, serving).
"""
import argparse
import importlib.metadata
import json
import statistics
import sys
import time

import torch

from side_memory import working_memory  # noqa: E402 (scripts/, beside this file)

def versions(*names):
    return {name: importlib.metadata.version(name) for name in names}


def word_level_tokenizer(vocab_size):
    """An offline tokenizer over ids 0..vocab_size-1: token ``t<i>`` is id ``i``, whitespace split."""
    import tokenizers
    import transformers
    from tokenizers import models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    core = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t0")


def text_of(ids):
    return " ".join(f"t{int(i)}" for i in ids)


def load_case(path):
    """The model (eval, weights loaded, same attention implementation) and the answer of each
    sample: [(prompt ids without padding, answer tokens)] ."""
    import transformers

    case = torch.load(path, weights_only=False)
    config = transformers.GPT2Config.from_dict(case["config"])
    model = transformers.GPT2LMHeadModel(config)
    model.load_state_dict(case["state_dict"], strict=True)
    impl = case.get("attn_implementation")
    if impl and model.config._attn_implementation != impl:
        model.set_attn_implementation(impl)
    model = model.float().eval()
    p = int(case["prompt_length"])
    samples = []
    for seq, mask, tokens in zip(case["sequences"], case["attention_mask"], case["tokens"]):
        prompt = seq[:p][mask[:p].bool()]
        answer = tokens[mask[p:].bool()]  # the tokens the sample generated (all: no end token)
        samples.append((prompt.clone(), answer.clone()))
    return model, samples


class CaptumRunner:
    """One run = captum's attribution of every sample's answer, one sample after another."""

    name = "captum"
    packages = ("captum", "torch", "transformers")

    def __init__(self, model, samples):
        from captum.attr import LayerGradientXActivation, LLMGradientAttribution

        self.model, self.samples = model, samples
        self.tokenizer = word_level_tokenizer(model.config.vocab_size)
        for prompt, _ in samples:  # the stand-in tokenizer gives back the prompt's ids
            ids = self.tokenizer.encode(text_of(prompt), return_tensors="pt")[0]
            if not torch.equal(ids, prompt):
                raise RuntimeError("captum_generate.py: the stand-in tokenizer does not round-trip the prompt")
        self.attribution = LLMGradientAttribution(LayerGradientXActivation(model, model.get_input_embeddings()),
                                                  self.tokenizer)
        self.last = None

    def warm_up(self):
        """A small attribution (the first sample's first prompt tokens, two answer tokens): what a
        process pays once (lazy imports, first autograd) is paid before the measured runs."""
        from captum.attr import TextTokenInput

        prompt, answer = self.samples[0]
        self.attribution.attribute(TextTokenInput(text_of(prompt[:4]), self.tokenizer), target=answer[:2])

    def __call__(self):
        from captum.attr import TextTokenInput

        results = []
        for prompt, answer in self.samples:
            inp = TextTokenInput(text_of(prompt), self.tokenizer)
            results.append(self.attribution.attribute(inp, target=answer))
        self.last = results
        return results

    def attributions(self):
        """The last run's (T, P_b) matrices, one per sample."""
        return [result.token_attr.detach().float() for result in self.last]


def serve(runner, out):
    """The line protocol of the module docstring: commands on stdin, replies on ``out``."""
    print("ready", file=out, flush=True)
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "memory":
            reply = str(working_memory(runner))
        elif command == "run":
            start = time.perf_counter()
            runner()
            reply = json.dumps({"time": time.perf_counter() - start})
        elif command == "attributions":
            torch.save(runner.attributions(), argument)
            reply = "ok"
        elif command == "info":
            reply = json.dumps(versions(*runner.packages))
        elif command == "quit":
            break
        else:
            reply = f"error: unknown command {command!r}"
        print(reply, file=out, flush=True)


def main(runner_class=CaptumRunner):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", required=True, help="the file bench_generate.py wrote (torch.save)")
    parser.add_argument("--serve", action="store_true", help="commands on stdin (see the docstring)")
    parser.add_argument("--rounds", type=int, default=1, help="standalone: timed runs after the memory run")
    parser.add_argument("--out", help="standalone: write the attribution matrices here (torch.save)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = sys.stdout
    if args.serve:
        sys.stdout = sys.stderr  # what the libraries print never reaches the protocol
    model, samples = load_case(args.case)
    runner = runner_class(model, samples)
    runner.warm_up()
    if args.serve:
        return serve(runner, protocol)
    memory = working_memory(runner)  # also the warm-up
    if args.out:
        torch.save(runner.attributions(), args.out)
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        runner()
        times.append(time.perf_counter() - start)
    print(json.dumps({"impl": runner.name, **versions(*runner.packages), "samples": len(samples),
                      "tokens": [int(a.numel()) for _, a in samples], "time": statistics.median(times),
                      "times": times, "memory": memory}), flush=True)


if __name__ == "__main__":
    main()
