"""Explanation cost against sequence length: time and peak working memory of every way to get
the generic rule's map, beside the plain forward and the forward + input-gradient backward, on

* ``encoder``: a BERT-base-shaped encoder (``BertForSequenceClassification``: 12 layers, 12 heads,
  hidden 768; 4096 positions), explaining the predicted class at the [CLS] row;
* ``gpt2s``: a GPT-2-small-shaped LM (``GPT2LMHeadModel``, 4096 positions), explaining the
  predicted next token at the last position (causal attention);

at N in {197, 577, 1024, 2048, 4096} tokens, batch 1, float32, random weights. Implementations:

* ``forward``: the plain forward under ``torch.no_grad()`` (SDPA attention);
* ``floor``: the plain forward plus one input-gradient backward (parameters frozen): the
  physical floor of a gradient-based explanation;
* ``relfast-sdpa``: ``relfast.Explainer(model)`` on the model as loaded (SDPA): fused attention
  forward and backward, relevance through ``ops.sdpa_row_relevance_update``;
* ``relfast-eager``: the same explainer on the model switched to eager attention (the
  probabilities are tensors of every layer, kept for the backward);
* ``reference``: the papers' algorithm (``bench_explain.reference``: hooks, weight gradients,
  the full N x N matrix product).

Memory is the peak resident set during the call above the resident set before it (free heap
returned with malloc_trim, then VmHWM reset
through /proc/self/clear_refs; glibc's mmap threshold is fixed so freed tensors leave the
resident set), on CUDA ``max_memory_allocated`` above the allocation before. A run whose eager
attention alone would not fit in memory is skipped and reported as such. The module writes
``scaling_time.png`` and ``scaling_memory.png`` beside this file and prints the table.
"""
import gc
import os
import sys
from collections import defaultdict

import pytest
import torch

import relfast
from bench_explain import eager, input_gradient, parameters_requiring_grad

transformers = pytest.importorskip("transformers")

MODELS = ("encoder", "gpt2s")
LENGTHS = {"cpu": (197, 577, 1024, 2048, 4096), "cuda": (197, 577, 1024, 2048, 4096, 8192, 16384, 32768)}
IMPLS = ("forward", "floor", "relfast-sdpa", "relfast-eager", "reference")
MATERIALISING = ("relfast-eager", "reference")  # hold every layer's (B, H, N, N) probabilities
ROUNDS = 2  # timed rounds after the untimed memory run (which is the warm-up)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "scripts"))
from side_memory import working_memory as cpu_working_memory  # noqa: E402 (scripts/side_memory.py)

# (device, model, N) -> {impl: {"time": median s, "memory": bytes} or {"skipped": reason}}
SCALING = defaultdict(dict)


def _meminfo_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def working_memory(fn, device):
    """Peak bytes in use during ``fn()`` beyond those in use before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return cpu_working_memory(fn)  # the same measure as the peers' side-environment scripts


_BUILT = {}


def model_for(name, device):
    if (name, device.type) not in _BUILT:
        _BUILT.clear()  # one model resident at a time
        gc.collect()
        torch.manual_seed(0)
        if name == "encoder":
            net = transformers.BertForSequenceClassification(
                transformers.BertConfig(max_position_embeddings=4096 if device.type == "cpu" else 32768, num_labels=2))
        else:
            net = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=max(LENGTHS[device.type])))
        _BUILT[(name, device.type)] = net.float().eval().to(device)
    return _BUILT[(name, device.type)]


def inputs_for(name, n, device):
    g = torch.Generator().manual_seed(n)
    return {"input_ids": torch.randint(0, 30522 if name == "encoder" else 50257, (1, n), generator=g).to(device)}


def explained_logits(name, output):
    return output.logits if name == "encoder" else output.logits[:, -1]


def floor(name, model, inputs):
    """One SDPA forward plus one input-gradient backward from the embeddings' output."""
    return input_gradient(model, inputs, model.get_input_embeddings(), lambda out: explained_logits(name, out),
                          **({} if name == "encoder" else {"use_cache": False}))


def reference(name, model, inputs):
    """The papers' algorithm on one sample: eager attention, hooks, weight gradients, R = I (N x N)."""
    with eager(model), parameters_requiring_grad(model, True):
        out = model(**inputs, output_attentions=True, **({} if name == "encoder" else {"use_cache": False}))
        saved = [None] * len(out.attentions)
        for i, attn in enumerate(out.attentions):
            attn.register_hook(lambda grad, i=i: saved.__setitem__(i, grad))
        logits = explained_logits(name, out)
        one_hot = torch.zeros_like(logits)
        one_hot[0, int(logits.detach().argmax())] = 1
        model.zero_grad()
        (one_hot * logits).sum().backward()
        n = out.attentions[0].shape[-1]
        R = torch.eye(n, dtype=logits.dtype, device=logits.device)
        for grad, attn in zip(saved, out.attentions):
            R = R + (grad[0] * attn[0].detach()).clamp(min=0).mean(dim=0) @ R
    return R[0] if name == "encoder" else R[-1]


def call_for(impl, name, model, inputs):
    if impl == "forward":
        def forward():
            with torch.no_grad():
                return model(**inputs, **({} if name == "encoder" else {"use_cache": False})).logits
        return forward
    if impl == "floor":
        return lambda: floor(name, model, inputs)
    if impl == "relfast-sdpa":
        explainer = relfast.Explainer(model)
        return lambda: explainer(inputs).relevance
    if impl == "relfast-eager":
        explainer = relfast.Explainer(model)

        def explain_eager():
            with eager(model):
                return explainer(inputs).relevance
        return explain_eager
    return lambda: reference(name, model, inputs)


def too_large(impl, model, n, device):
    """Why a materialising run cannot fit (None if it can): the probabilities alone, kept by
    autograd for every layer, plus their gradient and the scores, about 3 (B, H, N, N) float32
    tensors per layer."""
    if impl not in MATERIALISING:
        return None
    config = model.config
    need = 3 * config.num_hidden_layers * config.num_attention_heads * n * n * 4
    available = torch.cuda.mem_get_info()[0] if device.type == "cuda" else _meminfo_available()
    if need > 0.7 * available:
        return f"needs ~{need / 2**30:.0f} GiB for the attention maps, {available / 2**30:.0f} GiB free"
    return None


def _cases():
    for device in ("cpu", "cuda"):
        marks = () if device == "cpu" else pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
        for name in MODELS:
            for n in LENGTHS[device]:
                for impl in IMPLS:
                    yield pytest.param(device, name, n, impl, id=f"{device}-{name}-N{n}-{impl}", marks=marks)


@pytest.fixture(scope="module", autouse=True)
def plots():
    yield
    if SCALING:
        write_plots()


@pytest.mark.parametrize("device,name,n,impl", list(_cases()))
def test_scaling(benchmark, device, name, n, impl):
    device = torch.device(device)
    model = model_for(name, device)
    inputs = inputs_for(name, n, device)
    key = (device.type, name, n)
    benchmark.group = f"scaling-{device.type}-{name}-N{n}"
    benchmark.extra_info.update(model=name, N=n, impl=impl, device=device.type)
    reason = too_large(impl, model, n, device)
    if reason:
        SCALING[key][impl] = {"skipped": reason}
        pytest.skip(reason)
    fn = call_for(impl, name, model, inputs)
    if impl == "relfast-sdpa" and n <= 577:  # correctness before timing: the eager path's map
        eager_map = call_for("relfast-eager", name, model, inputs)()
        torch.testing.assert_close(fn(), eager_map, rtol=1e-4, atol=1e-5 * float(eager_map.abs().max()))
    run = fn if device.type == "cpu" else (lambda: (fn(), torch.cuda.synchronize()))
    memory = working_memory(run, device)  # also the warm-up
    benchmark.extra_info["peak_memory_bytes"] = memory
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    assert model.config._attn_implementation == "sdpa"
    if benchmark.stats is not None:
        SCALING[key][impl] = {"time": benchmark.stats.stats.median, "memory": memory}


def scaling_table():
    """Rows of the printed table (also used by RESULTS.md)."""
    lines = [f"{'dev':<5}{'model':<8}{'N':>6}" + "".join(f"{impl:>19}" for impl in IMPLS)
             + f"{'sdpa/floor t':>14}{'sdpa/floor m':>14}"]
    for (dev, name, n), by_impl in sorted(SCALING.items()):
        cells = []
        for impl in IMPLS:
            r = by_impl.get(impl, {})
            cells.append("skipped (mem)" if "skipped" in r else
                         f"{r['time'] * 1e3:.0f} ms/{r['memory'] / 2**20:.0f} MiB" if "time" in r else "-")
        sdpa, flo = by_impl.get("relfast-sdpa", {}), by_impl.get("floor", {})
        t = f"{sdpa['time'] / flo['time']:.2f}" if "time" in sdpa and "time" in flo else "-"
        m = f"{sdpa['memory'] / flo['memory']:.2f}" if "time" in sdpa and "time" in flo and flo["memory"] else "-"
        lines.append(f"{dev:<5}{name:<8}{n:>6}" + "".join(f"{c:>19}" for c in cells) + f"{t:>14}{m:>14}")
    return lines


def write_plots():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    print("\n" + "\n".join(scaling_table()))
    for quantity, unit, scale, filename in (("time", "s", 1.0, "scaling_time.png"),
                                            ("memory", "MiB", 2.0**-20, "scaling_memory.png")):
        devices = sorted({dev for dev, _, _ in SCALING})
        fig, axes = plt.subplots(len(devices), len(MODELS), figsize=(5.5 * len(MODELS), 4.2 * len(devices)),
                                 squeeze=False, constrained_layout=True)
        for row, dev in enumerate(devices):
            for col, name in enumerate(MODELS):
                ax = axes[row][col]
                for impl in IMPLS:
                    points = [(n, r[impl][quantity] * scale) for (d, m, n), r in sorted(SCALING.items())
                              if d == dev and m == name and quantity in r.get(impl, {})]
                    if points:
                        ax.plot(*zip(*points), marker="o", label=impl)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xticks(LENGTHS[dev])
                ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set_xlabel("tokens N")
                ax.set_ylabel(f"{quantity} ({unit})")
                ax.set_title(f"{name}, {dev}, batch 1, float32")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
        fig.savefig(os.path.join(HERE, filename), dpi=110)
        plt.close(fig)
