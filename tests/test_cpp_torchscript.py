"""The C++ build (CMakeLists.txt) runs scripted relfast code without Python, with the same results.

Builds ``relfast_ops`` and ``cpp/run_script.cpp`` with CMake into ``build/cmake`` (kept between runs,
so later runs are incremental), scripts a module whose forward chains relfast ops the way an
explainer does (self relevance over 3 layers, the streamed CLS row, residual normalisation, a
co-attention update and rollout), runs it in C++ on inputs saved with ``torch.save``, and checks
the C++ outputs against the Python eager outputs (float32, tight) and against a float64
computation with ``relfast.reference`` (looser).

The first build takes a few minutes on 2 cores; skipped only when cmake or a C++ compiler is missing.
"""
import subprocess
from typing import List, Tuple

import pytest
import torch
from torch import Tensor

import relfast  # noqa: F401  (registers the relfast:: operators)
from relfast import ops, reference

from cpp_build import build_target, run as _run, skip_without_toolchain

# torch.jit.script/save are deprecated in favour of torch.export, but TorchScript is what C++ loads.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")

EXE_NAME = "relfast_run_script"

skip_without_toolchain()


@pytest.fixture(scope="module")
def run_script_exe():
    return build_target(EXE_NAME)


class RelevanceChain(torch.nn.Module):
    """One explanation pass of a two-stream model from saved attention maps and their gradients."""

    def forward(self, attns: List[Tensor], grads: List[Tensor], text_attns: List[Tensor], text_grads: List[Tensor],
                co_attn: Tensor, co_grad: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        B, N = attns[0].shape[0], attns[0].shape[-1]
        Q = text_attns[0].shape[-1]
        # [P2] rule 6 layer by layer: R_ss = (I + Ā_L) ··· (I + Ā_1).
        R_ss = torch.eye(N, dtype=attns[0].dtype).expand(B, N, N).contiguous()
        for attn, grad in zip(attns, grads):
            R_ss = ops.relevance_update(R_ss, ops.head_mean_grad_attn(grad, attn))
        R_qq = torch.eye(Q, dtype=attns[0].dtype).expand(B, Q, Q).contiguous()
        for attn, grad in zip(text_attns, text_grads):
            R_qq = ops.relevance_update(R_qq, ops.head_mean_grad_attn(grad, attn))
        # The CLS row of R_ss streamed from the last layer down, without materialising Ā.
        cls = torch.zeros(B, 1, N, dtype=attns[0].dtype)
        cls[:, 0, 0] = 1.0
        for i in range(len(attns) - 1, -1, -1):
            cls = ops.row_relevance_update(cls, grads[i], attns[i])
        # [P2] rule 10: image tokens attending to text tokens, R_sq starting at 0.
        R_sq = ops.bimodal_update(torch.zeros(B, N, Q, dtype=attns[0].dtype), R_ss,
                                  ops.head_mean_grad_attn(co_grad, co_attn), R_qq)
        return cls.squeeze(1), R_ss, ops.normalize_residual(R_ss), R_sq, ops.rollout(attns, 0)


def reference_chain(attns, grads, text_attns, text_grads, co_attn, co_grad):
    """The same computation in float64 with the plain-PyTorch definitions."""
    attns, grads, text_attns, text_grads = ([t.double() for t in ts] for ts in (attns, grads, text_attns, text_grads))
    co_attn, co_grad = co_attn.double(), co_grad.double()
    B, N, Q = attns[0].shape[0], attns[0].shape[-1], text_attns[0].shape[-1]
    R_ss = torch.eye(N, dtype=torch.float64).expand(B, N, N)
    for attn, grad in zip(attns, grads):
        R_ss = reference.relevance_update(R_ss, reference.head_mean_grad_attn(grad, attn))
    R_qq = torch.eye(Q, dtype=torch.float64).expand(B, Q, Q)
    for attn, grad in zip(text_attns, text_grads):
        R_qq = reference.relevance_update(R_qq, reference.head_mean_grad_attn(grad, attn))
    cls = torch.zeros(B, 1, N, dtype=torch.float64)
    cls[:, 0, 0] = 1.0
    for attn, grad in reversed(list(zip(attns, grads))):
        cls = reference.row_relevance_update(cls, grad, attn)
    R_sq = reference.bimodal_update(torch.zeros(B, N, Q, dtype=torch.float64), R_ss,
                                    reference.head_mean_grad_attn(co_grad, co_attn), R_qq)
    return cls.squeeze(1), R_ss, reference.normalize_residual(R_ss), R_sq, reference.rollout(attns, 0)


def make_inputs(B=2, H=3, N=7, Q=5, layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)

    def attention(n_q, n_k):
        return torch.randn(B, H, n_q, n_k, generator=g).mul(2).softmax(dim=-1)

    def gradient(n_q, n_k):
        return torch.randn(B, H, n_q, n_k, generator=g)

    attns = [attention(N, N) for _ in range(layers)]
    grads = [gradient(N, N) for _ in range(layers)]
    text_attns = [attention(Q, Q) for _ in range(layers)]
    text_grads = [gradient(Q, Q) for _ in range(layers)]
    return attns, grads, text_attns, text_grads, attention(N, Q), gradient(N, Q)


def parse_stdout(text):
    """`output <i> <dtype> [d0,d1,...] v0 v1 ...` lines -> float64 tensors."""
    tensors = []
    for line in text.splitlines():
        if not line.startswith("output "):
            continue
        _, index, dtype, shape, *values = line.split()
        assert int(index) == len(tensors) and dtype == "float32", line[:80]
        sizes = [int(s) for s in shape.strip("[]").split(",") if s]
        tensors.append(torch.tensor([float(v) for v in values], dtype=torch.float64).reshape(sizes))
    return tensors


@pytest.fixture(scope="module")
def saved_case(tmp_path_factory):
    """The scripted module and its inputs on disk, with the Python eager and float64 results."""
    folder = tmp_path_factory.mktemp("cpp_torchscript")
    scripted = torch.jit.script(RelevanceChain())
    module_path = folder / "chain.pt"
    torch.jit.save(scripted, str(module_path))
    inputs = make_inputs()
    input_paths = []
    for i, value in enumerate(inputs):
        input_paths.append(folder / f"input{i}.pt")
        torch.save(value, input_paths[-1])
    with torch.no_grad():
        eager = RelevanceChain()(*inputs)
        in_python_scripted = scripted(*inputs)
    return dict(folder=folder, scripted=scripted, module=module_path, inputs=inputs, input_paths=input_paths,
                eager=eager, scripted_out=in_python_scripted, expected64=reference_chain(*inputs))


def test_scripted_graph_calls_relfast_ops(saved_case):
    # The wrappers are separate TorchScript functions (prim::CallFunction in .graph): look at the
    # inlined graph, of the scripted module and of the one loaded back from disk.
    for where, module in (("scripted", saved_case["scripted"]), ("loaded", torch.jit.load(str(saved_case["module"])))):
        graph = str(module.inlined_graph)
        for op in ("head_mean_grad_attn", "relevance_update", "row_relevance_update", "normalize_residual",
                   "bimodal_update", "rollout"):
            assert f"relfast::{op}(" in graph, f"relfast::{op} is not in the {where} graph:\n{graph}"


def test_cpp_matches_python(run_script_exe, saved_case):
    out_path = saved_case["folder"] / "cpp_out.pt"
    proc = _run([run_script_exe, "-o", out_path, saved_case["module"], *saved_case["input_paths"]],
                "relfast_run_script", timeout=300)
    cpp = torch.load(out_path)
    assert isinstance(cpp, tuple) and len(cpp) == 5, f"unexpected C++ result: {type(cpp)}"
    names = ("cls_row", "R_ss", "normalize_residual(R_ss)", "R_sq", "rollout")
    for name, c, e, s, r in zip(names, cpp, saved_case["eager"], saved_case["scripted_out"],
                                saved_case["expected64"]):
        assert c.dtype == torch.float32 and c.shape == e.shape, name
        # Same kernels, same float32 arithmetic: only GEMM blocking may differ between the builds.
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}, C++ vs Python eager: {m}")
        torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}, scripted vs eager: {m}")
        torch.testing.assert_close(c.double(), r, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}, C++ vs float64 reference: {m}")
    # The streamed CLS row is row 0 of the full map.
    torch.testing.assert_close(cpp[0], cpp[1][:, 0], rtol=1e-5, atol=1e-6)

    # The printed values round-trip exactly (%.17g) and agree with the saved result.
    printed = parse_stdout(proc.stdout)
    assert len(printed) == 5, proc.stdout[:500]
    for name, p, c in zip(names, printed, cpp):
        assert torch.equal(p, c.double()), f"{name}: printed values differ from the saved ones"


def test_cpp_expect_option(run_script_exe, saved_case):
    folder = saved_case["folder"]
    good, bad = folder / "expected_good.pt", folder / "expected_bad.pt"
    torch.save(saved_case["eager"], good)
    torch.save(tuple(t + 1e-3 if i == 3 else t for i, t in enumerate(saved_case["eager"])), bad)
    args = [run_script_exe, "--quiet", "--threads", "1"]
    ok = subprocess.run([str(a) for a in args + ["--expect", good, saved_case["module"], *saved_case["input_paths"]]],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "output 4 float32 [2,7,7]" in ok.stdout.splitlines()[-1]
    mismatch = subprocess.run([str(a) for a in args + ["--expect", bad, saved_case["module"],
                                                       *saved_case["input_paths"]]],
                              capture_output=True, text=True, timeout=300)
    assert mismatch.returncode == 1, mismatch.stderr
    assert "output 3 differs" in mismatch.stderr


def test_cpp_registers_all_ops(run_script_exe):
    proc = _run([run_script_exe, "--list-ops"], "relfast_run_script --list-ops", timeout=120)
    schemas = {line.split("(")[0] for line in proc.stdout.splitlines()}
    for op in ("head_mean_grad_attn", "relevance_update", "relevance_update_", "row_relevance_update",
               "normalize_residual", "bimodal_update", "rollout"):
        assert f"relfast::{op}" in schemas, proc.stdout
