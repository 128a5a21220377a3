"""AttnLRP (``method="attnlrp"``) against the floor and against lxt 2.1 (the authors' library),
time and peak working memory, one group per model (``attnlrp-<model>``):

* ``llama``: a Llama-3.2-1B-shaped ``LlamaForCausalLM`` cut to fit a 2-core CPU (hidden 2048,
  MLP 8192, 32 heads, 8 KV heads; 4 layers of 16; vocabulary 32000, tied), one 512-token
  prompt, explaining the predicted next token;
* ``vitb16``: torchvision's ViT-B/16 (224 px, 1000 classes), batch 8 (the ViT family lxt patches;
  its head, zero at initialisation, drawn from N(0, 0.02));
* ``gpt2s``: a GPT-2-small-shaped ``GPT2LMHeadModel`` at 4096 tokens, for memory: one call each,
  timed as it is measured.

Random weights (seed 0), float32, SDPA attention as loaded (torchvision: ``nn.MultiheadAttention``).
Implementations, in one run:

* ``floor``: one forward plus one input-gradient backward (gradient of the explained logits at the
  input embeddings, or the patch embedding's output, parameters frozen): the physical floor of a
  gradient-based explanation, in relfast's environment;
* ``relfast``: ``relfast.Explainer(model, "attnlrp")(inputs)``;
* ``lxt``: lxt 2.1's efficient AttnLRP (``scripts/bench_lxt.py``) in its own environment
  (``/work/lxt-env``, or ``$RELFAST_LXT_ENV``; built by scripts/make_lxt_env.sh), on the same
  weights (saved here, loaded there) and the same inputs, driven call by call over a pipe (the
  timed call is the pipe round trip: microseconds beside seconds). Skipped without that env.
* ``lxt-floor``: the floor again, in lxt's environment (its own torch, 2.13): the yardstick of
  lxt's overhead where the torch versions differ.

Before timing, lxt's relevance is compared with relfast's (max abs difference / max abs, in
``extra_info`` and the table). Memory: the peak resident set of one call above the resident set
before it (bench_scaling.working_memory; the lxt ones measured in lxt's process the same way);
that call is also the warm-up. A table is printed at the end (relfast / floor, relfast / lxt).

    .venv/bin/python -m pytest benchmarks/bench_attnlrp.py --benchmark-only -q -s
"""
import importlib.util
import os
import sys
from collections import defaultdict

import pytest
import torch

import relfast
from bench_scaling import working_memory
from side_process import ROOT, SideProcess

transformers = pytest.importorskip("transformers")

LXT_PYTHON = os.path.join(os.environ.get("RELFAST_LXT_ENV", "/work/lxt-env"), "bin", "python")
BENCH_LXT = os.path.join(ROOT, "scripts", "bench_lxt.py")
_spec = importlib.util.spec_from_file_location("bench_lxt", BENCH_LXT)
bench_lxt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_lxt)  # SPECS and make_inputs only (it imports lxt in functions)

MODELS = ("llama", "vitb16", "gpt2s")
IMPLS = ("floor", "relfast", "lxt", "lxt-floor")
ROUNDS = {"llama": 2, "vitb16": 3, "gpt2s": 0}  # timed rounds after the memory run; 0: the memory run is timed
CPU = torch.device("cpu")

# model -> impl -> {"time": median s, "memory": bytes, ...}
ATTNLRP = defaultdict(dict)


def build(name):
    torch.manual_seed(0)
    config = bench_lxt.SPECS[name]["config"]
    if name == "vitb16":
        from torchvision.models.vision_transformer import VisionTransformer
        model = bench_lxt.init_head(name, VisionTransformer(**config))
    elif name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
    return model.float().eval()


class Models:
    """One model resident at a time, its weights saved once for lxt's process."""

    def __init__(self, folder):
        self.folder = folder
        self.name = self.model = self.weights = None

    def get(self, name):
        if name != self.name:
            self.model = None
            self.name, self.model = name, build(name)
            self.weights = os.path.join(self.folder, f"{name}.pt")
            torch.save(self.model.state_dict(), self.weights)
        return self.model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(str(tmp_path_factory.mktemp("attnlrp_weights")))


def lxt_worker(name, variant, weights):
    """scripts/bench_lxt.py --serve in lxt's environment: one model and variant per process."""
    return SideProcess([LXT_PYTHON, BENCH_LXT, "--model", name, "--variant", variant, "--weights", weights, "--serve"])


def floor(name, model, inputs):
    """One forward plus one input-gradient backward from the input embeddings (the patch
    embedding's output), parameters frozen: the same call as bench_lxt.explain_call."""
    before = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        return bench_lxt.explain_call(name, model, inputs)
    finally:
        for p, req in zip(model.parameters(), before):
            p.requires_grad_(req)


def relfast_inputs(name, inputs):
    return inputs if name == "vitb16" else {"input_ids": inputs}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", MODELS)
def test_attnlrp(benchmark, models, name, impl, tmp_path):
    model = models.get(name)
    inputs = bench_lxt.make_inputs(name)
    spec = bench_lxt.SPECS[name]
    benchmark.group = f"attnlrp-{name}"
    benchmark.extra_info.update(model=name, impl=impl, batch=spec["batch"], tokens=spec["tokens"])
    result = ATTNLRP[name].setdefault(impl, {})
    worker = None
    if impl in ("lxt", "lxt-floor"):
        if not os.path.exists(LXT_PYTHON):
            pytest.skip(f"no lxt environment at {LXT_PYTHON} (scripts/make_lxt_env.sh)")
        worker = lxt_worker(name, "lxt" if impl == "lxt" else "floor", models.weights)
    try:
        if impl == "floor":
            run = lambda: floor(name, model, inputs)  # noqa: E731
        elif impl == "relfast":
            explainer = relfast.Explainer(model, "attnlrp")
            run = lambda: explainer(relfast_inputs(name, inputs)).relevance  # noqa: E731
        else:
            run = lambda: worker.ask("run")  # noqa: E731
        if impl == "lxt" and name != "gpt2s":  # correctness before timing: lxt's relevance against relfast's
            path = str(tmp_path / "lxt_relevance.pt")
            worker.ask(f"relevance {path}")
            theirs = torch.load(path, weights_only=True)
            ours = relfast.Explainer(model, "attnlrp")(relfast_inputs(name, inputs)).relevance
            ours = ours[:, 1:] if name == "vitb16" else ours  # the class token (a parameter) has 0
            error = float((ours - theirs).abs().max() / theirs.abs().max())
            result["error"] = benchmark.extra_info["max_abs_diff_over_max"] = error
            assert error < 1e-2, error

        def memory_run():
            return int(worker.ask("memory")) if worker is not None else working_memory(run, CPU)

        if ROUNDS[name] == 0:  # one call: its memory, and its time (the measuring adds milliseconds)
            seen = []
            benchmark.pedantic(lambda: seen.append(memory_run()), rounds=1, iterations=1, warmup_rounds=0)
            memory = seen[0]
        else:
            memory = memory_run()  # also the warm-up
            benchmark.pedantic(run, rounds=ROUNDS[name], iterations=1, warmup_rounds=0)
        benchmark.extra_info["peak_memory_bytes"] = memory
        if benchmark.stats is not None:
            result.update(time=benchmark.stats.stats.median, memory=memory)
    finally:
        if worker is not None:
            worker.close()


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    if ATTNLRP:
        print("\n" + "\n".join(attnlrp_table()))


def attnlrp_table():
    """Rows of the printed table (also used by RESULTS.md)."""
    def cell(r):
        return f"{r['time'] * 1e3:.0f} ms / {r['memory'] / 2**20:.0f} MiB" if "time" in r else "-"

    def ratio(a, b, key):
        return f"{a[key] / b[key]:.2f}" if key in a and key in b and b[key] else "-"

    lines = [f"{'model':<8}" + "".join(f"{impl:>22}" for impl in IMPLS)
             + f"{'rel/floor t':>12}{'rel/floor m':>12}{'rel/lxt t':>10}{'rel/lxt m':>10}{'lxt/lxtfl t':>12}"
             + f"{'lxt err':>9}"]
    for name in MODELS:
        r = ATTNLRP.get(name)
        if not r:
            continue
        flo, rel, lxt, lfl = (r.get(i, {}) for i in IMPLS)
        err = f"{lxt['error']:.0e}" if "error" in lxt else "-"
        lines.append(f"{name:<8}" + "".join(f"{cell(r.get(i, {})):>22}" for i in IMPLS)
                     + f"{ratio(rel, flo, 'time'):>12}{ratio(rel, flo, 'memory'):>12}{ratio(rel, lxt, 'time'):>10}"
                     + f"{ratio(rel, lxt, 'memory'):>10}{ratio(lxt, lfl, 'time'):>12}{err:>9}")
    return lines
