"""Explaining every generated token (``relfast.Explainer(model).generate``) against generation alone
and against T separate single-position explanations, time and peak working memory, one group per
batch size (``generate-B<batch>``):

* a GPT-2-small-shaped ``GPT2LMHeadModel`` (12 layers, width 768, 12 heads, vocabulary 50257),
  random weights (seed 0), float32, SDPA attention as loaded, CPU;
* prompts of 256 tokens (at batch 4: 256, 224, 192, 160 real tokens, padded on the left), 64
  generated tokens (greedy, no end token: every sample generates 64).

Implementations, in one run:

* ``generation``: ``model.generate`` alone (KV cache), what any explanation of the answer adds to;
* ``relfast``: ``Explainer(model).generate(...)`` (method ``generic``): generation, then one forward
  over prompt + answer and the 64 backwards in batched chunks (``chunk_size`` 8, the default);
* ``relfast-chunk1``: the same with ``chunk_size=1`` (one plain backward per generated token);
* ``single``: 64 single-position calls ``Explainer(model)(cut, target=token)``, the sequence cut
  after the token before each generated token (a forward and a backward each), on the sequences
  ``relfast`` generated: what a per-token tool pays, generation not included.

Before timing, ``relfast``'s rows of the first and the last generated token are compared with the
single-position calls. Memory: the peak resident set of one call above the resident set before it
(``bench_scaling.working_memory``); that call is also the warm-up. A table is printed at the end.

    .venv/bin/python -m pytest benchmarks/bench_generate.py --benchmark-only -q -s

``RELFAST_BENCH_GENERATE_SMOKE=1`` shrinks everything (2 layers, width 64, prompts of 16 tokens,
8 generated) to check that the file runs, in seconds; its numbers mean nothing.
"""
import os
from collections import defaultdict

import pytest
import torch

import relfast
from bench_scaling import working_memory

transformers = pytest.importorskip("transformers")

SMOKE = os.environ.get("RELFAST_BENCH_GENERATE_SMOKE", "") not in ("", "0")
if SMOKE:
    CONFIG = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)
    PROMPT, NEW_TOKENS = 16, 8
else:
    CONFIG = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    PROMPT, NEW_TOKENS = 256, 64
BATCHES = (1, 4)
IMPLS = ("generation", "relfast", "relfast-chunk1", "single")
NO_END = dict(eos_token_id=None, pad_token_id=0, do_sample=False)
CPU = torch.device("cpu")

# batch -> impl -> {"time": median s, "memory": bytes}
GENERATE = defaultdict(dict)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(**CONFIG, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(config).float().eval()


def prompts(batch):
    """``batch`` prompts of PROMPT, PROMPT - 32, ... real tokens (at least 4), padded on the left."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, CONFIG["vocab_size"], (batch, PROMPT), generator=g)
    mask = torch.ones(batch, PROMPT, dtype=torch.long)
    for b in range(batch):
        mask[b, :min(b * PROMPT // 8, PROMPT - 4)] = 0
    return {"input_ids": ids, "attention_mask": mask}


def single_position_calls(explainer, answer):
    """T single-position explanations of ``answer`` (a GenerationExplanation): (B, T, N)."""
    p = answer.prompt_length
    rows = torch.zeros_like(answer.relevance)
    for t in range(answer.tokens.shape[1]):
        cut = {"input_ids": answer.sequences[:, :p + t], "attention_mask": answer.attention_mask[:, :p + t]}
        rows[:, t, :p + t] = explainer(cut, target=answer.tokens[:, t]).relevance
    return rows


def check(answer, explainer):
    """relfast's rows of the first and last generated token against single-position calls."""
    p, last = answer.prompt_length, answer.tokens.shape[1] - 1
    for t in (0, last):
        cut = {"input_ids": answer.sequences[:, :p + t], "attention_mask": answer.attention_mask[:, :p + t]}
        expected = explainer(cut, target=answer.tokens[:, t]).relevance
        torch.testing.assert_close(answer.relevance[:, t, :p + t], expected, rtol=1e-4,
                                   atol=1e-5 * float(expected.abs().max()))
        assert (answer.relevance[:, t, p + t:] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
def test_generate(benchmark, model, batch, impl):
    inputs = prompts(batch)
    explainer = relfast.Explainer(model)
    benchmark.group = f"generate-B{batch}"
    benchmark.extra_info.update(impl=impl, batch=batch, prompt=PROMPT, new_tokens=NEW_TOKENS, smoke=SMOKE, **CONFIG)
    if impl == "generation":
        def run():
            with torch.no_grad():
                return model.generate(**inputs, max_new_tokens=NEW_TOKENS, **NO_END)
    elif impl.startswith("relfast"):
        chunk = 1 if impl == "relfast-chunk1" else None

        def run():
            return explainer.generate(inputs, max_new_tokens=NEW_TOKENS, chunk_size=chunk, **NO_END)
    else:
        answer = explainer.generate(inputs, max_new_tokens=NEW_TOKENS, **NO_END)

        def run():
            return single_position_calls(explainer, answer)
    if impl == "relfast":  # correctness before timing
        answer = run()
        assert answer.tokens.shape == (batch, NEW_TOKENS)
        check(answer, explainer)
    memory = working_memory(run, CPU)  # also the warm-up
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["peak_memory_bytes"] = memory
    if benchmark.stats is not None:
        GENERATE[batch][impl] = dict(time=benchmark.stats.stats.median, memory=memory)


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    if GENERATE:
        print("\n" + "\n".join(generate_table()))


def generate_table():
    """Rows of the printed table: time and peak working memory per implementation; the speed-up
    of relfast's explanation (its time less generation's) over the single-position calls."""
    lines = [f"GPT-2 {CONFIG['n_layer']} layers, width {CONFIG['n_embd']}, prompt {PROMPT}, {NEW_TOKENS} generated, "
             f"CPU float32{' (SMOKE: numbers mean nothing)' if SMOKE else ''}",
             f"{'B':>2} {'impl':<15}{'time s':>9}{'memory MiB':>12}"]
    for batch, results in sorted(GENERATE.items()):
        for impl in IMPLS:
            if impl in results:
                r = results[impl]
                lines.append(f"{batch:>2} {impl:<15}{r['time']:>9.2f}{r['memory'] / 2**20:>12.0f}")
        if {"generation", "relfast", "single"} <= set(results):
            explain = results["relfast"]["time"] - results["generation"]["time"]
            ratio = f"{results['single']['time'] / explain:.2f}x" if explain > 0 else "- (generation took longer)"
            lines.append(f"{batch:>2} single / (relfast - generation) = {ratio}")
    return lines
