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
  ``relfast`` generated: what a per-token tool pays, generation not included;
* ``single-1``: ONE single-position call on the full sequence (prompt + the 64 generated tokens,
  the model's next token as target), the yardstick of the memory goal (``relfast`` ≤ 2× it);
* ``captum``: captum 0.9's ``LLMGradientAttribution(LayerGradientXActivation(model, <input
  embeddings>), tokenizer).attribute(prompt, target=<the answer's tokens>)`` on ``relfast``'s
  sequences, as a captum user explains a generated answer: one call per sample, the sample's
  left padding removed (captum takes batch size 1; at batch 4 the four samples one after
  another), captum's own loop over the 64 tokens inside (a forward over the prompt and the
  answer so far and a backward of the token's log-probability each), attributions to the prompt;
* ``inseq``: inseq 0.7's ``input_x_gradient`` (constrained attribution of the same answers, one
  ``attribute`` call for all samples; inseq runs them one at a time), its target the token's
  log-probability, attributions to the prompt and the answer so far.

The peers run in their own environment (``$RELFAST_CAPTUM_ENV``, default ``/work/captum-env``:
torch 2.13 CPU, transformers 5.25, captum 0.9.0, inseq 0.7.1; built by
``bash scripts/make_captum_env.sh``), driven by ``scripts/captum_generate.py`` and
``scripts/inseq_generate.py`` over stdin/stdout: the benchmark saves the config, the weights and
relfast's answer to a file the peer's process loads (same weights, same tokens); an offline
tokenizer stand-in maps token ``t<i>`` to id ``i``. Without that environment (or without inseq
in it) their tests skip, saying so.

Before timing, ``relfast``'s rows of the first and the last generated token are compared with the
single-position calls; after it, the peers' attribution matrices (generated token x prompt token)
of the first, middle and last generated token of each sample with gradient x input computed here
on the same weights and tokens (the token's log-probability, the input embeddings' output; max
abs difference over max abs < 1e-4). Each implementation runs once (the slow ones take minutes a
call on 2 cores), warm (the module has generated and explained at that batch size first; the
peers' scripts warm up on loading): that one call is timed by pytest-benchmark and its peak
working memory measured during it, the peak resident set above the resident set before it
(``bench_scaling.working_memory``; the peers' the same way in their own process, under their
torch). The peers' time is the round trip of that call (the model loaded beforehand). A
table is printed at the end: time and memory per implementation, and the ratios of the goals:
the peers' and ``single``'s time over relfast's explanation time (``relfast`` less
``generation``), and ``relfast``'s memory over ``single-1``'s.

    .venv/bin/python -m pytest benchmarks/bench_generate.py --benchmark-only -q -s

``RELFAST_BENCH_GENERATE_SMOKE=1`` shrinks everything (2 layers, width 64, prompts of 16 tokens,
8 generated) to check that the file runs, in seconds; its numbers mean nothing.
"""
import functools
import json
import os
import subprocess
from collections import defaultdict

import pytest
import torch

import relfast
from bench_scaling import working_memory
from side_process import ROOT, SideProcess

transformers = pytest.importorskip("transformers")

SMOKE = os.environ.get("RELFAST_BENCH_GENERATE_SMOKE", "") not in ("", "0")
if SMOKE:
    CONFIG = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)
    PROMPT, NEW_TOKENS = 16, 8
else:
    CONFIG = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    PROMPT, NEW_TOKENS = 256, 64
BATCHES = (1, 4)
IMPLS = ("generation", "relfast", "relfast-chunk1", "single", "single-1", "captum", "inseq")
NO_END = dict(eos_token_id=None, pad_token_id=0, do_sample=False)
CPU = torch.device("cpu")
PEER_ENV = os.environ.get("RELFAST_CAPTUM_ENV", "/work/captum-env")
PEER_PYTHON = os.path.join(PEER_ENV, "bin", "python")
PEER_SCRIPTS = {"captum": os.path.join(ROOT, "scripts", "captum_generate.py"),
                "inseq": os.path.join(ROOT, "scripts", "inseq_generate.py")}
PEER_TOLERANCE = 1e-4  # max abs difference / max abs, against gradient x input computed here

# batch -> impl -> {"time": median s, "memory": bytes} (peers: also "error"), or {"skipped": why}
GENERATE = defaultdict(dict)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(**CONFIG, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(config).float().eval()


@pytest.fixture(scope="module")
def answers(model):
    """batch -> relfast's answer to ``prompts(batch)`` (a GenerationExplanation), made once: the
    sequences ``single``, ``single-1`` and the peers explain."""
    explainer = relfast.Explainer(model)
    made = {}

    def answer(batch):
        if batch not in made:
            made[batch] = explainer.generate(prompts(batch), max_new_tokens=NEW_TOKENS, **NO_END)
        return made[batch]
    return answer


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


# ---- the peers (captum, inseq) in their own environment ----

@functools.lru_cache(maxsize=None)
def peer_missing(impl):
    """Why ``impl``'s peer cannot run here (None if it can)."""
    if not os.path.exists(PEER_PYTHON):
        return f"no captum/inseq environment at {PEER_ENV} (bash scripts/make_captum_env.sh; RELFAST_CAPTUM_ENV)"
    probe = subprocess.run([PEER_PYTHON, "-c", f"import {impl}"], capture_output=True, text=True)
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{impl} does not import in {PEER_ENV} ({why}; bash scripts/make_captum_env.sh)"
    return None


def write_case(path, model, answer):
    """What the peer's script loads: the config, the weights and relfast's answer."""
    torch.save(dict(config=model.config.to_dict(), attn_implementation=model.config._attn_implementation,
                    state_dict=model.state_dict(), sequences=answer.sequences, attention_mask=answer.attention_mask,
                    prompt_length=answer.prompt_length, tokens=answer.tokens), path)


def peer_worker(impl, case):
    """scripts/<peer>_generate.py --serve in the peers' environment, one per test."""
    return SideProcess([PEER_PYTHON, PEER_SCRIPTS[impl], "--case", case, "--serve"],
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


def gradient_x_input(model, prompt, answer, rows):
    """Gradient x input of generated tokens ``rows`` of one sample (its prompt without padding):
    d log p(answer[t] | prompt, answer[:t]) / d(input embeddings' output), times that output,
    summed over the width, at the prompt's tokens: (len(rows), P_b). One forward over the
    prompt and the answer (causal: row t's log-probability is the one of the sequence cut after
    answer[t - 1]), one backward per row."""
    p = prompt.numel()
    ids = torch.cat([prompt, answer[:-1]])[None]
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    log_probs = model(inputs_embeds=embeddings, use_cache=False).logits[0].log_softmax(-1)
    out = []
    for t in rows:
        (grad,) = torch.autograd.grad(log_probs[p + t - 1, answer[t]], embeddings, retain_graph=True)
        out.append((grad * embeddings)[0, :p].sum(-1).detach())
    return torch.stack(out)


def check_peer(model, answer, matrices):
    """The peer's (T, P_b) matrices of each sample against gradient x input computed here, at the
    first, middle and last generated token; returns the largest max-abs-difference / max-abs."""
    p, count = answer.prompt_length, answer.tokens.shape[1]
    rows = sorted({0, count // 2, count - 1})
    assert len(matrices) == answer.tokens.shape[0]
    worst = 0.0
    for b, theirs in enumerate(matrices):
        prompt = answer.sequences[b, :p][answer.attention_mask[b, :p].bool()]
        tokens = answer.tokens[b][answer.token_mask[b]]
        assert theirs.shape == (tokens.numel(), prompt.numel()), theirs.shape
        ours = gradient_x_input(model, prompt, tokens, rows)
        worst = max(worst, float((theirs[rows] - ours).abs().max() / ours.abs().max()))
    return worst


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
def test_generate(benchmark, model, answers, batch, impl, tmp_path):
    benchmark.group = f"generate-B{batch}"
    benchmark.extra_info.update(impl=impl, batch=batch, prompt=PROMPT, new_tokens=NEW_TOKENS, smoke=SMOKE, **CONFIG)
    answers(batch)  # made once per batch size: also the warm-up of the model and the explainer
    if impl in PEER_SCRIPTS:
        return peer(benchmark, model, answers(batch), batch, impl, tmp_path)
    inputs = prompts(batch)
    explainer = relfast.Explainer(model)
    if impl == "generation":
        def run():
            with torch.no_grad():
                return model.generate(**inputs, max_new_tokens=NEW_TOKENS, **NO_END)
    elif impl.startswith("relfast"):
        chunk = 1 if impl == "relfast-chunk1" else None

        def run():
            return explainer.generate(inputs, max_new_tokens=NEW_TOKENS, chunk_size=chunk, **NO_END)
    elif impl == "single":
        answer = answers(batch)

        def run():
            return single_position_calls(explainer, answer)
    else:  # single-1
        answer = answers(batch)
        full = {"input_ids": answer.sequences, "attention_mask": answer.attention_mask}

        def run():
            return explainer(full).relevance
    if impl == "relfast":  # correctness before timing
        answer = run()
        assert answer.tokens.shape == (batch, NEW_TOKENS)
        check(answer, explainer)
    # one call, timed, its peak working memory measured during it (the slow implementations take
    # minutes a call on 2 cores: one call each keeps the run within the hour)
    memories = []
    benchmark.pedantic(lambda: memories.append(working_memory(run, CPU)), rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info["peak_memory_bytes"] = memories[0]
    if benchmark.stats is not None:
        GENERATE[batch][impl] = dict(time=benchmark.stats.stats.median, memory=memories[0])


def peer(benchmark, model, answer, batch, impl, tmp_path):
    """captum / inseq on relfast's answer, in their environment (warmed up by the script on
    loading): one timed run that also measures its peak working memory, then the check of its
    attributions."""
    missing = peer_missing(impl)
    if missing:
        GENERATE[batch][impl] = dict(skipped=missing)
        pytest.skip(missing)
    case = str(tmp_path / "case.pt")
    write_case(case, model, answer)
    worker = peer_worker(impl, case)
    try:
        os.remove(case)  # loaded: the weights need not stay on disk
        benchmark.extra_info.update(json.loads(worker.ask("info")))
        memories = []
        benchmark.pedantic(lambda: memories.append(int(worker.ask("memory"))), rounds=1, iterations=1,
                           warmup_rounds=0)
        memory = memories[0]
        path = str(tmp_path / "attributions.pt")
        worker.ask(f"attributions {path}")  # that run's
        error = check_peer(model, answer, torch.load(path, weights_only=True))
        benchmark.extra_info["max_abs_diff_over_max"] = error
        assert error < PEER_TOLERANCE, f"{impl}'s attributions differ from gradient x input here: {error:.1e}"
        benchmark.extra_info.update(peak_memory_bytes=memory)
        if benchmark.stats is not None:
            GENERATE[batch][impl] = dict(time=benchmark.stats.stats.median, memory=memory, error=error)
    finally:
        worker.close()


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    if GENERATE:
        print("\n" + "\n".join(generate_table()))


def generate_table():
    """Rows of the printed table: time and peak working memory per implementation (the peers with
    their check's max abs difference / max abs); the speed-up of relfast's explanation (its time
    less generation's) over the single-position calls and the peers; relfast's memory over one
    single-position call's."""
    lines = [f"GPT-2 {CONFIG['n_layer']} layers, width {CONFIG['n_embd']}, prompt {PROMPT}, {NEW_TOKENS} generated, "
             f"CPU float32{' (SMOKE: numbers mean nothing)' if SMOKE else ''}",
             f"{'B':>2} {'impl':<15}{'time s':>9}{'memory MiB':>12}"]
    for batch, results in sorted(GENERATE.items()):
        for impl in IMPLS:
            r = results.get(impl)
            if r is None:
                continue
            if "skipped" in r:
                lines.append(f"{batch:>2} {impl:<15}  skipped: {r['skipped']}")
                continue
            error = f"  (check: {r['error']:.0e})" if "error" in r else ""
            lines.append(f"{batch:>2} {impl:<15}{r['time']:>9.2f}{r['memory'] / 2**20:>12.0f}{error}")
        timed = {impl for impl, r in results.items() if "time" in r}
        if {"generation", "relfast"} <= timed:
            explain = results["relfast"]["time"] - results["generation"]["time"]
            for other in ("single", "captum", "inseq"):
                if other in timed:
                    ratio = f"{results[other]['time'] / explain:.2f}x" if explain > 0 else \
                        "- (generation took longer)"
                    lines.append(f"{batch:>2} {other} / (relfast - generation) = {ratio}")
        if {"relfast", "single-1"} <= timed:
            ratio = results["relfast"]["memory"] / max(results["single-1"]["memory"], 1)
            lines.append(f"{batch:>2} relfast memory / single-1 memory = {ratio:.2f} (goal <= 2)")
    return lines
