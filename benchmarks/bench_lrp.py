"""The [P1] relevance methods against the plain forward and the generic rule, on a
ViT-B/16-shaped ``ViTForImageClassification`` (224 px, 12 layers, 12 heads, hidden 768, 1000
classes; HF default SDPA attention, random weights, float32, CPU), batch 1 and 8, in one run:

* ``forward``: the plain forward under ``torch.no_grad()``;
* ``generic``: ``relfast.Explainer(model)`` ([P2], the default);
* ``transformer_attribution``: [P1]'s method (one relevance forward; per target a relevance
  backward, then a gradient backward through the same graph, streamed into the rows);
* ``lrp``: LRP to the pixels with the papers' code's rules (the default);
* ``lrp_textbook``: the same with ``rules="textbook"`` (one αβ denominator, αβ at the pixels).

Time: pytest-benchmark medians (group ``lrp-vitb16-b<B>``). Peak memory: each (method, batch)
once more in a fresh process, reporting the growth of its peak resident set (Linux ``VmHWM``,
reset after loading) over the loaded model and inputs, printed as a table at the end of the
module.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import relfast

transformers = pytest.importorskip("transformers")

IMPLS = ("forward", "generic", "transformer_attribution", "lrp", "lrp_textbook")
BATCHES = (1, 8)
ROUNDS = {1: 5, 8: 3}


def build_model():
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)).float().eval()


def make_inputs(batch):
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))


def runner(model, impl):
    if impl == "forward":
        def run(pixels):
            with torch.no_grad():
                return model(pixel_values=pixels).logits
        return run
    explainer = (relfast.Explainer(model, "lrp", rules="textbook") if impl == "lrp_textbook"
                 else relfast.Explainer(model, impl))
    return lambda pixels: explainer(pixels)


@pytest.fixture(scope="module")
def model():
    return build_model()


def peak_growth_mib(impl, batch):
    """Runs one explanation in a fresh process: (peak RSS after) - (peak RSS before), in MiB."""
    code = f"""
import json, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
import bench_lrp as b

def status(key):  # kB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

model = b.build_model(); pixels = b.make_inputs({batch}); run = b.runner(model, {impl!r})
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
before = status("VmRSS")
run(pixels)
print(json.dumps((status("VmHWM") - before) / 1024))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
def test_lrp_methods(benchmark, model, batch, impl):
    pixels = make_inputs(batch)
    run = runner(model, impl)
    result = run(pixels)
    if impl != "forward":
        assert bool(torch.isfinite(result.relevance).all())
    benchmark.group = f"lrp-vitb16-b{batch}"
    benchmark.extra_info.update(model="vitb16", batch=batch, impl=impl)
    benchmark.pedantic(run, args=(pixels,), rounds=ROUNDS[batch], iterations=1, warmup_rounds=1)
    assert model.config._attn_implementation == "sdpa" and all(p.requires_grad for p in model.parameters())


def test_peak_memory(benchmark, capsys):
    """Not timed: one fresh process per (method, batch); the table goes to the terminal."""
    peaks = {(impl, batch): peak_growth_mib(impl, batch) for impl in IMPLS for batch in BATCHES}
    benchmark.extra_info.update({f"{impl}-b{batch}-peak_rss_growth_mib": v for (impl, batch), v in peaks.items()})
    with capsys.disabled():
        print("\npeak memory, ViT-B/16 CPU (growth of the peak RSS over model + inputs, MiB)")
        print(f"{'impl':<26}" + "".join(f"{'B=' + str(b):>10}" for b in BATCHES))
        for impl in IMPLS:
            print(f"{impl:<26}" + "".join(f"{peaks[(impl, b)]:>10.0f}" for b in BATCHES))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # keeps the test in --benchmark-only runs
