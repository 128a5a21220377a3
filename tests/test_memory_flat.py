"""Serving hygiene (issue 13): 1,000 repeated explanations in one process leave the resident set
flat after warm-up: nothing of a call (records, graphs, recomputed attention) outlives it.

The full runs are marked slow (make test-slow: 41 s on an idle 2-core machine, up to 20 minutes
reported on a busy one); make test runs a short version of each (a leaked capture grows the set
by ~6 MiB a call, far past the bound within 40 calls)."""
import gc

import pytest
import torch

import bimodal_models as models
import relfast

BOUND_MIB = 16.0  # measured growth: under 1 MiB over 1,000 calls of the default model


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def growth_after_warm_up(call, repeats: int, warm_up: int = 100) -> float:
    for _ in range(warm_up):
        call()
    gc.collect()
    start = resident_mib()
    for _ in range(repeats):
        call()
    gc.collect()
    return resident_mib() - start


SHORT = dict(repeats=40, warm_up=10)
REPEATS = [pytest.param(SHORT, id="short"), pytest.param(dict(repeats=1000, warm_up=100), id="full",
                                                          marks=pytest.mark.slow)]
TWO_STREAM_REPEATS = [pytest.param(SHORT, id="short"), pytest.param(dict(repeats=300, warm_up=50), id="full",
                                                                    marks=pytest.mark.slow)]


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("runs", REPEATS)
@pytest.mark.parametrize("method", ["generic", "rollout"])
def test_a_thousand_explanations_keep_memory_flat(method, runs):
    explainer = relfast.Explainer(relfast.models.default_model(), method)
    pixels = relfast.data.normalize(relfast.data.make_shapes(8, seed=1)[0])
    growth = growth_after_warm_up(lambda: explainer(pixels), **runs)
    assert growth < BOUND_MIB, f"resident memory grew by {growth:.1f} MiB over {runs['repeats']} calls"


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("runs", TWO_STREAM_REPEATS)
@pytest.mark.parametrize("name", ["clip", "lxmert", "detr"])
def test_two_stream_explanations_keep_memory_flat(name, runs):
    build, make_inputs, target = {"clip": (models.clip, lambda: models.clip_inputs(2, 2, 0), "all"),
                                  "lxmert": (models.lxmert, lambda: models.lxmert_inputs(2, 0), [0, 1]),
                                  "detr": (models.detr, lambda: models.detr_inputs(2, 0), [1, 2])}[name]
    explainer, inputs = relfast.Explainer(build()), make_inputs()
    growth = growth_after_warm_up(lambda: explainer(inputs, target=target), **runs)
    assert growth < BOUND_MIB, f"resident memory grew by {growth:.1f} MiB over {runs['repeats']} calls"
