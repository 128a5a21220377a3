"""relfast.export + relfast.runtime: one exported file (ONNX or TorchScript) gives the eager
explainer's logits and relevance at every batch size (and, for text, every sequence length), and
bad inputs are rejected by relfast with a clear message before the runtime sees them.

Each (model, method) is exported once per module, from an example of batch 1, and the same file
is then run at batch sizes 1, 2, 5 and 16 on fresh random inputs. Errors are relative to the
largest magnitude of the eager result: max|exported - eager| / max|eager|.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers

import relfast
import relfast.export
from relfast.runtime import OnnxExplainer

from test_explainer import bert, vit

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore::UserWarning")

BATCHES = (1, 2, 5, 16)
LOGITS_RTOL, RELEVANCE_RTOL = 1e-5, 1e-4
# transformer_attribution's LRP pass amplifies float32 rounding: its sum rule splits relevance into
# large shares of opposite sign that cancel further on. Fed ONNX Runtime's patch-embedding output
# (its NCHWc convolution rounds differently, within 6e-7), eager float32 moves a DeiT map by 1.45e-4 of
# its maximum, where float64 moves by 1.6e-8 under the same change. So each float32 path (eager,
# ONNX) is up to ~1.5e-4 from a float64 run of the same weights (eager: 1.1e-4 on the default model,
# B=16, seed 16), and two of them may differ by 3e-4 (test_onnx_rounding_is_eager_float32s). The
# TorchScript file runs PyTorch's own kernels and keeps RELEVANCE_RTOL.
ONNX_RELEVANCE_RTOL = {"transformer_attribution": 3e-4}
VOCAB = 60  # test_explainer.bert's vocabulary


def deit_with_teacher():
    config = transformers.DeiTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=3,
                                     num_attention_heads=4, intermediate_size=64, num_labels=5)
    return transformers.DeiTForImageClassificationWithTeacher(config)


def seeded(build):
    def make():
        torch.manual_seed(0)
        return build().eval()
    return make


MODELS = {"default": relfast.models.default_model, "vit": seeded(vit), "deit": seeded(deit_with_teacher),
          "bert": seeded(bert)}
# (model, method, explainer options): every method on the shipped model, generic on each family.
CASES = [("default", "generic", {}), ("default", "rollout", {}), ("default", "raw_attention", {}),
         ("default", "attn_gradcam", {}), ("vit", "generic", {}), ("deit", "generic", {}), ("bert", "generic", {}),
         ("bert", "generic", {"full_matrix": True}), ("default", "transformer_attribution", {}),
         ("deit", "transformer_attribution", {}), ("bert", "transformer_attribution", {})]


def case_id(case):
    model, method, options = case
    return "-".join([model, method] + [k for k in options])


def image_batch(model, batch, seed):
    size = model.config.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def text_batch(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(0, batch, 2):  # every other sample padded, by a different amount
        pad = int(torch.randint(0, length - 2, (1,), generator=g))
        mask[i, length - pad:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def rel_err(got, expected):
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30))


def inputs_for(name, model, batch, seed, length=9):
    return text_batch(batch, length, seed) if name == "bert" else image_batch(model, batch, seed)


def as_numpy(inputs):
    return {k: v.numpy() for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.numpy()


@pytest.fixture(scope="module", params=CASES, ids=case_id)
def exported(request, tmp_path_factory):
    name, method, options = request.param
    model = MODELS[name]()
    explainer = relfast.Explainer(model, method, **options)
    folder = tmp_path_factory.mktemp(case_id(request.param))
    example = inputs_for(name, model, 1, seed=100)
    onnx_path = relfast.export.to_onnx(explainer, example, folder / "model_explained.onnx")
    script_path = relfast.export.to_torchscript(explainer, example, folder / "model_explained.pt")
    return dict(name=name, method=method, options=options, model=model, explainer=explainer,
                onnx=OnnxExplainer(onnx_path, providers=["CPUExecutionProvider"]), onnx_path=onnx_path,
                script=torch.jit.load(str(script_path)), script_path=script_path)


def lengths_for(name):
    return (7, 19) if name == "bert" else (None,)


def onnx_rtol(method):
    assert relfast.export.parity_relevance(method, "onnx") == ONNX_RELEVANCE_RTOL.get(method, RELEVANCE_RTOL), \
        "relfast export (the command) checks files with the same bounds as these tests"
    return ONNX_RELEVANCE_RTOL.get(method, RELEVANCE_RTOL)


@pytest.mark.parametrize("batch", BATCHES)
def test_onnx_runtime_matches_eager(exported, batch):
    for length in lengths_for(exported["name"]):
        inputs = inputs_for(exported["name"], exported["model"], batch, seed=batch, length=length or 9)
        eager = exported["explainer"](inputs)
        outputs = exported["onnx"].run(as_numpy(inputs))
        where = f"{case_id((exported['name'], exported['method'], exported['options']))} B={batch} N={length}"
        assert rel_err(outputs["logits"], eager.logits) <= LOGITS_RTOL, where
        assert rel_err(outputs["relevance"], eager.relevance) <= onnx_rtol(exported["method"]), where
        assert outputs["relevance"].dtype == np.float32
        np.testing.assert_array_equal(outputs["explained_target"], eager.target.numpy(), err_msg=where)


@pytest.mark.parametrize("batch", BATCHES)
def test_torchscript_matches_eager(exported, batch):
    for length in lengths_for(exported["name"]):
        inputs = inputs_for(exported["name"], exported["model"], batch, seed=batch, length=length or 9)
        eager = exported["explainer"](inputs)
        args = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
        logits, relevance, explained = exported["script"](*args, torch.full((batch,), -1))
        assert rel_err(logits, eager.logits) <= LOGITS_RTOL
        assert rel_err(relevance, eager.relevance) <= RELEVANCE_RTOL
        assert torch.equal(explained, eager.target)


def test_explicit_targets(exported):
    """Per-sample targets (not the prediction) through both files, and an int for every sample."""
    classes = exported["onnx"].num_classes
    inputs = inputs_for(exported["name"], exported["model"], 5, seed=7)
    target = torch.tensor([3, 0, classes - 1, 1, 2]) % classes
    eager = exported["explainer"](inputs, target=target)
    logits, relevance = exported["onnx"](as_numpy(inputs), target=target.numpy())
    assert rel_err(relevance, eager.relevance) <= onnx_rtol(exported["method"])
    args = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
    _, script_relevance, explained = exported["script"](*args, target)
    assert rel_err(script_relevance, eager.relevance) <= RELEVANCE_RTOL and torch.equal(explained, target)
    same = exported["explainer"](inputs, target=1)
    outputs = exported["onnx"].run(as_numpy(inputs), target=1)
    assert rel_err(outputs["relevance"], same.relevance) <= onnx_rtol(exported["method"])
    assert (outputs["explained_target"] == 1).all()


@pytest.mark.parametrize("exported", [("default", "transformer_attribution", {})], ids=case_id, indirect=True)
def test_onnx_rounding_is_eager_float32s(exported):
    """The reason for ONNX_RELEVANCE_RTOL: on the batch that reached 1.59e-4 in a report, the ONNX file
    and float32 eager are each within half the bound of a float64 run of the same weights; the file
    is no worse than eager float32 is, and together they cannot differ by more than the bound."""
    inputs = image_batch(exported["model"], 16, seed=16)
    eager = exported["explainer"](inputs)
    model64 = MODELS["default"]().double()
    exact = relfast.Explainer(model64, exported["method"], **exported["options"])(inputs.double(),
                                                                                 target=eager.target).relevance
    half = ONNX_RELEVANCE_RTOL[exported["method"]] / 2
    served = exported["onnx"](inputs.numpy())[1]
    assert rel_err(eager.relevance, exact) <= half
    assert rel_err(served, exact) <= half
    assert rel_err(exported["script"](inputs)[1], exact) <= half


def test_onnx_file_is_standard_and_dynamic(exported):
    model = onnx.load(str(exported["onnx_path"]))
    onnx.checker.check_model(model, full_check=True)
    domains = {node.domain for node in model.graph.node} | {node.domain for f in model.functions for node in f.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ops: {domains}"  # no relfast:: custom ops
    assert not any("relfast" in node.op_type for node in model.graph.node)
    session = exported["onnx"].session
    for entry in session.get_inputs():
        assert entry.shape[0] == "batch", entry
    if exported["name"] == "bert":
        assert [i.shape for i in session.get_inputs()] == [["batch", "sequence"]] * 2 + [["batch"]]
    spec = json.loads({p.key: p.value for p in model.metadata_props}["relfast"])
    assert spec["method"] == exported["method"] and spec["num_classes"] == exported["onnx"].num_classes


def test_torchscript_keeps_fused_ops(exported):
    graph = str(exported["script"].inlined_graph)
    expected = {"generic": "relfast::row_relevance_update", "rollout": "relfast::rollout"}.get(exported["method"])
    if expected is not None:
        assert expected in graph
    spec = json.loads(exported["script"].relfast_spec)
    assert exported["script"].relfast_input_names == [e["name"] for e in spec["inputs"]]


# ---- served files: the runtime without torch, the TorchScript default target ----

@pytest.mark.parametrize("how", ["package", "single file"])
def test_runtime_works_without_torch(default_files, tmp_path, how):
    """relfast.runtime serves the ONNX file where torch cannot be imported at all: from the
    package, and as the one file `relfast/runtime.py` copied alone (what a serving image does)."""
    image = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    np.save(default_files["onnx"].with_suffix(".npy"), image)
    if how == "single file":
        (tmp_path / "served").mkdir()
        (tmp_path / "served" / "relfast_runtime.py").write_text((Path(relfast.__file__).parent / "runtime.py").read_text())
        imports = f"sys.path.insert(0, {str(tmp_path / 'served')!r})\nfrom relfast_runtime import OnnxExplainer"
    else:
        imports = "import relfast\nfrom relfast.runtime import OnnxExplainer"
    code = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
{imports}
runtime = OnnxExplainer({str(default_files['onnx'])!r})
logits, relevance = runtime(np.load({str(default_files['onnx'].with_suffix('.npy'))!r}))
np.save({str(default_files['onnx'].with_suffix('.out.npy'))!r}, relevance)
print(runtime.providers, logits.shape, relevance.shape, runtime.image_map(relevance).shape)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(3, 4) (3, 65) (3, 8, 8)" in proc.stdout
    eager = relfast.Explainer(relfast.models.default_model())(torch.from_numpy(image))
    assert rel_err(np.load(default_files["onnx"].with_suffix(".out.npy")), eager.relevance) <= RELEVANCE_RTOL


def test_torchscript_target_defaults_to_the_predicted_class(default_files):
    script = torch.jit.load(str(default_files["script"]))
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        left_out = script(pixels)
        explicit = script(pixels, torch.full((3,), -1))
    for a, b in zip(left_out, explicit):
        torch.testing.assert_close(a, b)
    assert torch.equal(left_out[2], left_out[0].argmax(dim=-1))
    with pytest.raises(torch.jit.Error, match="input 'target' holds class 7, out of range"):  # the documented type
        script(pixels, torch.full((3,), 7))
