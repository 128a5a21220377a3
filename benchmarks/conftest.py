"""Shared pieces of the relfast benchmarks (pytest-benchmark).

Every ``bench_<op>.py`` times relfast's fused op against its unfused eager PyTorch chain
(``relfast.reference``) on the same inputs, after checking that both agree. This file provides:

* collection of ``bench_*.py`` files (pytest only collects ``test_*.py`` by default);
* the shapes (``shape`` is parametrised from the module's ``SHAPES`` tuple of ids);
* ``device`` (cpu, and cuda when a GPU and relfast's CUDA kernels are present);
* ``inputs``: seeded builders of attention-like tensors;
* ``check``: the float32 correctness assertion;
* ``measure``: runs the benchmark (synchronising CUDA), records bytes moved and GB/s in
  ``extra_info``, and feeds the summary table printed at the end of the session;
* ``explain_results``: where bench_explain.py records its medians, for the end-to-end table.
"""
import math
import time
from collections import defaultdict
from dataclasses import dataclass

import pytest
import torch

import relfast
from relfast import ops


# ---- collection ----

def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself: don't collect it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


# ---- shapes and devices ----

@dataclass(frozen=True)
class Shape:
    id: str
    B: int
    H: int
    N: int


SHAPE_TABLE = {
    s.id: s
    for s in (
        Shape("vitb", B=8, H=12, N=197),        # ViT-B/16 at 224x224: 196 patches + CLS
        Shape("long", B=1, H=12, N=2048),       # long sequence
    )
}
DEFAULT_SHAPES = ("vitb", "long")
DTYPE = torch.float32


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        ids = getattr(metafunc.module, "SHAPES", DEFAULT_SHAPES)
        metafunc.parametrize("shape", [SHAPE_TABLE[i] for i in ids], ids=ids)


_no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_no_gpu)])
def device(request):
    if request.param == "cuda" and not ops.built_with_cuda():
        pytest.skip("relfast was built without its CUDA kernels")
    return torch.device(request.param)


# ---- inputs ----

class Inputs:
    """Seeded float32 inputs, generated on the CPU (so they do not depend on the device)."""

    def __init__(self, device):
        self.device = device
        self.gen = torch.Generator().manual_seed(0)

    def _to(self, t):
        return t.to(self.device)

    def grad(self, s):
        """Gradient w.r.t. the attention map: standard normal, (B, H, N, N)."""
        return self._to(torch.randn(s.B, s.H, s.N, s.N, generator=self.gen, dtype=DTYPE))

    def attn(self, s):
        """Attention probabilities: row softmax of standard normal logits, (B, H, N, N)."""
        return self._to(torch.randn(s.B, s.H, s.N, s.N, generator=self.gen, dtype=DTYPE).softmax(-1))

    def abar(self, s):
        """Head-averaged map ``E_h[(grad * attn)^+]``, (B, N, N)."""
        g = torch.randn(s.B, s.H, s.N, s.N, generator=self.gen, dtype=DTYPE)
        a = torch.randn(s.B, s.H, s.N, s.N, generator=self.gen, dtype=DTYPE).softmax(-1)
        return self._to(relfast.reference.head_mean_grad_attn(g, a))

    def rmap(self, s):
        """Relevance map: identity plus small positive values, (B, N, N)."""
        noise = torch.rand(s.B, s.N, s.N, generator=self.gen, dtype=DTYPE) / s.N
        return self._to(noise + torch.eye(s.N, dtype=DTYPE))

    def rows(self, s, K=1):
        """K rows of R: the CLS row ``e_0`` plus small positive values, (B, K, N)."""
        v = torch.rand(s.B, K, s.N, generator=self.gen, dtype=DTYPE) / s.N
        v[:, :, 0] += 1
        return self._to(v)


@pytest.fixture
def inputs(device):
    return Inputs(device)


@pytest.fixture
def check():
    """Correctness before timing: relfast's output must match the reference in float32."""
    def _check(actual, expected):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    return _check


# ---- timing and bookkeeping ----

def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


# Plain reads of grad and attn, for the read floor; the fastest on the machine at hand is used
# (on the 2-core CPU ``dot`` and ``sum+sum`` are within noise of each other, ``amax`` is slower).
PLAIN_READS = {
    "dot": lambda grad, attn: torch.dot(grad.reshape(-1), attn.reshape(-1)),  # one pass over both
    "sum+sum": lambda grad, attn: grad.sum() + attn.sum(),
    "amax+amax": lambda grad, attn: torch.maximum(grad.amax(), attn.amax()),
}


@pytest.fixture
def fastest_read():
    """``fastest_read(grad, attn)`` -> (name, fn): the plain read of ``PLAIN_READS`` with the
    lowest best-of-5 time, for the "one read of grad+attn" floor."""
    def _pick(grad, attn):
        def best_time(read):
            run = _synced(lambda: read(grad, attn), grad.device)
            run()
            times = []
            for _ in range(5):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            return min(times)
        name = min(PLAIN_READS, key=lambda k: best_time(PLAIN_READS[k]))
        return name, PLAIN_READS[name]
    return _pick


# (op, shape id, device type) -> {impl: median seconds}; impl in "relfast", "torch", "floor".
RESULTS = defaultdict(dict)
BYTES = {}            # (op, shape id, device type) -> minimum bytes read + written by the op
COPY_BPS = {}         # device type -> measured copy bandwidth (bytes/s), CUDA only


def _synced(fn, device):
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@pytest.fixture
def measure(benchmark, request):
    """``measure(fn, op=, shape=, impl=, reads=, writes=, setup=None, **extra_info)`` times ``fn()``.

    ``reads``/``writes`` are the tensors the op must read and write at least once; their sizes
    give the bytes moved and, with the median time, GB/s. ``setup`` (untimed, before every call)
    is for in-place ops, which run through ``benchmark.pedantic`` so the inputs can be restored.
    """
    def _measure(fn, *, op, shape, impl, reads, writes, setup=None, **extra_info):
        device = reads[0].device
        key = (op, shape if isinstance(shape, str) else shape.id, device.type)
        benchmark.group = "-".join(key[:2]) + ("-cuda" if device.type == "cuda" else "")
        moved = nbytes(list(reads) + list(writes))
        benchmark.extra_info.update(op=op, shape=key[1], impl=impl, bytes=moved, **extra_info)
        if setup is None:
            benchmark(_synced(fn, device))
        else:
            restore = _synced(setup, device)
            run = _synced(fn, device)

            def setup():  # pedantic takes a non-None return value for the target's arguments
                restore()

            setup()  # one warm-up call, then one timed call to choose the number of rounds
            run()
            setup()
            start = time.perf_counter()
            run()
            once = time.perf_counter() - start
            cfg = request.config
            max_time = float(cfg.getoption("benchmark_max_time"))  # a str when left at its default
            rounds = max(int(cfg.getoption("benchmark_min_rounds")),
                         min(1000, math.ceil(max_time / max(once, 1e-6))))
            benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
        if benchmark.stats is None:  # --benchmark-disable: the function ran once, untimed
            return
        median = benchmark.stats.stats.median
        benchmark.extra_info["GB/s"] = round(moved / median / 1e9, 2)
        if impl == "copy":
            COPY_BPS[device.type] = moved / median
        else:
            RESULTS[key][impl] = median
            if impl == "relfast":
                BYTES[key] = moved
    return _measure


# ---- summary table ----

# (model id, batch) -> {impl: median seconds}; impl in "forward", "floor", "relfast", "reference"
# (bench_explain.py, end-to-end explanation).
EXPLAIN_RESULTS = defaultdict(dict)


def _num(x, spec, scale=1.0):
    return "-" if x is None else format(x * scale, spec)


def _ratio(a, b):
    return a / b if a and b else None


@pytest.fixture
def explain_results():
    return EXPLAIN_RESULTS


def _explain_summary(terminalreporter):
    w = terminalreporter.write_line
    terminalreporter.write_sep("-", "end-to-end explanation, CPU (medians)")
    w("xfwd = relfast / plain forward (target <= 2.3); xfloor = relfast / (forward + input-grad backward)")
    w("speedup = reference (per sample, hooks, weight grads, full matrix) / relfast (target >= 1.4 at batch 8)")
    w(f"{'model':<8}{'B':>3}{'fwd ms':>10}{'floor ms':>10}{'relfast ms':>12}{'ref ms':>10}"
      f"{'xfwd':>7}{'xfloor':>8}{'speedup':>9}")

    for (name, B), t in sorted(EXPLAIN_RESULTS.items()):
        fwd, flo, rel, ref = (t.get(k) for k in ("forward", "floor", "relfast", "reference"))
        w(f"{name:<8}{B:>3}{_num(fwd, '.1f', 1e3):>10}{_num(flo, '.1f', 1e3):>10}{_num(rel, '.1f', 1e3):>12}"
          f"{_num(ref, '.1f', 1e3):>10}{_num(_ratio(rel, fwd), '.2f'):>7}{_num(_ratio(rel, flo), '.2f'):>8}"
          f"{_num(_ratio(ref, rel), '.2f'):>9}")


# (bench_export.py, serving exported explainers).
EXPORT_RESULTS = defaultdict(dict)


@pytest.fixture
def export_results():
    return EXPORT_RESULTS


def _export_summary(terminalreporter):
    w = terminalreporter.write_line
    terminalreporter.write_sep("-", "exported explainer, CPU (medians)")
    w("xeager = ORT explanation / eager PyTorch explanation (target <= 1); xplain = ORT explanation / ORT plain "
      "inference (target <= 2.5)")
    w(f"{'model':<8}{'B':>3}{'ORT plain ms':>14}{'ORT explain ms':>16}{'TS explain ms':>15}{'eager ms':>10}"
      f"{'xeager':>8}{'xplain':>8}")
    for (name, B), t in sorted(EXPORT_RESULTS.items()):
        plain, ort_exp, ts_exp, eager = (t.get(k) for k in ("ort_plain", "ort_explain", "torchscript_explain",
                                                             "eager_explain"))
        w(f"{name:<8}{B:>3}{_num(plain, '.2f', 1e3):>14}{_num(ort_exp, '.2f', 1e3):>16}"
          f"{_num(ts_exp, '.2f', 1e3):>15}{_num(eager, '.2f', 1e3):>10}"
          f"{_num(_ratio(ort_exp, eager), '.2f'):>8}{_num(_ratio(ort_exp, plain), '.2f'):>8}")


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if EXPLAIN_RESULTS:
        _explain_summary(terminalreporter)
    if EXPORT_RESULTS:
        _export_summary(terminalreporter)
    if not (RESULTS or COPY_BPS):
        return
    w = terminalreporter.write_line
    terminalreporter.write_sep("-", "relfast vs unfused PyTorch (medians)")
    w("speedup = torch / relfast (target >= 3x for head_mean_grad_attn, row_relevance_update at vitb)")
    w("x floor = relfast / one read of grad+attn (target <= 1.5 for row_relevance_update)")
    for dev, bps in COPY_BPS.items():
        w(f"%copy   = relfast GB/s / {dev} copy bandwidth, {bps / 1e9:.0f} GB/s (target >= 80%)")
    header = (f"{'op':<26}{'shape':<10}{'dev':<5}{'relfast ms':>11}{'torch ms':>10}{'speedup':>9}"
              f"{'GB/s':>8}{'floor ms':>10}{'x floor':>9}" + (f"{'%copy':>7}" if COPY_BPS else ""))
    w(header)

    for (op, shape, dev), t in sorted(RESULTS.items()):
        fused, eager, floor = t.get("relfast"), t.get("torch"), t.get("floor")
        bps = _ratio(BYTES.get((op, shape, dev)), fused)
        speedup = _ratio(eager, fused)
        row = (f"{op:<26}{shape:<10}{dev:<5}{_num(fused, '.3f', 1e3):>11}{_num(eager, '.3f', 1e3):>10}"
               f"{_num(speedup, '.2f') + ('x' if speedup else ''):>9}{_num(bps, '.1f', 1e-9):>8}"
               f"{_num(floor, '.3f', 1e3):>10}{_num(_ratio(fused, floor), '.2f'):>9}")
        if COPY_BPS:
            row += f"{_num(_ratio(bps, COPY_BPS.get(dev)), '.0f', 100):>7}"
        w(row)
