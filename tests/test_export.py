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
         ("bert", "generic", {"full_matrix": True})]


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


@pytest.mark.parametrize("batch", BATCHES)
def test_onnx_runtime_matches_eager(exported, batch):
    for length in lengths_for(exported["name"]):
        inputs = inputs_for(exported["name"], exported["model"], batch, seed=batch, length=length or 9)
        eager = exported["explainer"](inputs)
        outputs = exported["onnx"].run(as_numpy(inputs))
        where = f"{case_id((exported['name'], exported['method'], exported['options']))} B={batch} N={length}"
        assert rel_err(outputs["logits"], eager.logits) <= LOGITS_RTOL, where
        assert rel_err(outputs["relevance"], eager.relevance) <= RELEVANCE_RTOL, where
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
    assert rel_err(relevance, eager.relevance) <= RELEVANCE_RTOL
    args = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
    _, script_relevance, explained = exported["script"](*args, target)
    assert rel_err(script_relevance, eager.relevance) <= RELEVANCE_RTOL and torch.equal(explained, target)
    same = exported["explainer"](inputs, target=1)
    outputs = exported["onnx"].run(as_numpy(inputs), target=1)
    assert rel_err(outputs["relevance"], same.relevance) <= RELEVANCE_RTOL
    assert (outputs["explained_target"] == 1).all()


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


# ---- bad input: relfast's message, before the runtime's ----

@pytest.fixture(scope="module")
def default_files(tmp_path_factory):
    explainer = relfast.Explainer(relfast.models.default_model(), "generic")
    folder = tmp_path_factory.mktemp("default_export")
    example = torch.randn(1, 3, 64, 64)
    return dict(onnx=relfast.export.to_onnx(explainer, example, folder / "m.onnx"),
                script=relfast.export.to_torchscript(explainer, example, folder / "m.pt"))


GOOD = np.zeros((2, 3, 64, 64), np.float32)
BAD_IMAGE_INPUTS = [
    ((np.zeros((3, 64, 64), np.float32),), {}, "input 'pixel_values' must have shape (B, 3, 64, 64), got (3, 64, 64)"),
    ((np.zeros((2, 3, 32, 32), np.float32),), {}, "dimension 2 must be 64, the image size of the model"),
    ((np.zeros((2, 3, 64, 64), np.float64),), {}, "input 'pixel_values' must be float32, got float64"),
    ((np.full((2, 3, 64, 64), np.nan, np.float32),), {}, "input 'pixel_values' holds NaN or infinite values"),
    ((np.zeros((0, 3, 64, 64), np.float32),), {}, "holds an empty batch"),
    ((GOOD,), {"target": 4}, "argument 'target' holds class 4, out of range for a model with 4 classes"),
    ((GOOD,), {"target": np.array([0, -2])}, "argument 'target' holds class -2, out of range"),
    ((GOOD,), {"target": np.array([0, 1, 2])}, "argument 'target' must be an int or have shape (2,)"),
    ((GOOD,), {"target": np.array([0.0, 1.0])}, "argument 'target' must hold integer class indices"),
    ((GOOD, GOOD), {}, "expected 1 model input(s) ['pixel_values'], got 2"),
    ((torch.zeros(2, 3, 64, 64),), {}, "must be a numpy array, got a torch tensor"),
    (({"pixel_values": GOOD, "extra": GOOD},), {}, "unexpected ['extra']"),
]


@pytest.mark.parametrize("args,kwargs,message", BAD_IMAGE_INPUTS, ids=lambda v: str(v)[:40] if isinstance(v, str) else "")
def test_runtime_rejects_bad_input_before_onnxruntime(default_files, args, kwargs, message):
    runtime = OnnxExplainer(default_files["onnx"], providers=["CPUExecutionProvider"])

    class NotCalled:
        def __getattr__(self, name):
            if name == "run":
                raise AssertionError("ONNX Runtime was called with bad input")
            return getattr(runtime.session, name)

    runtime.session = NotCalled()
    with pytest.raises(ValueError) as error:
        runtime(*args, **kwargs)
    assert str(error.value).startswith("relfast.runtime.OnnxExplainer:") and message in str(error.value)


BAD_SCRIPT_INPUTS = [
    (torch.zeros(2, 3, 32, 32), torch.full((2,), -1), "input 'pixel_values' must have shape (B, 3, 64, 64)"),
    (torch.zeros(2, 3, 64, 64, dtype=torch.float64), torch.full((2,), -1),
     "input 'pixel_values' must be float32, got float64"),
    (torch.full((2, 3, 64, 64), float("inf")), torch.full((2,), -1),
     "input 'pixel_values' holds NaN or infinite values"),
    (torch.zeros(2, 3, 64, 64), torch.full((3,), -1), "input 'target' has shape [3], but an earlier input has size 2"),
    (torch.zeros(2, 3, 64, 64), torch.full((2,), 4), "input 'target' holds class 4, out of range"),
    (torch.zeros(2, 3, 64, 64), torch.zeros(2, dtype=torch.int32), "input 'target' must be int64, got int32"),
]


@pytest.mark.parametrize("pixels,target,message", BAD_SCRIPT_INPUTS, ids=[m[:30] for *_, m in BAD_SCRIPT_INPUTS])
def test_torchscript_rejects_bad_input(default_files, pixels, target, message):
    script = torch.jit.load(str(default_files["script"]))
    with pytest.raises(Exception) as error:
        script(pixels, target)
    assert "relfast (exported explainer): " + message in str(error.value).splitlines()[-1]


def test_runtime_rejects_bad_text_input(tmp_path):
    explainer = relfast.Explainer(seeded(bert)(), "generic")
    path = relfast.export.to_onnx(explainer, text_batch(1, 6, seed=0), tmp_path / "bert.onnx")
    runtime = OnnxExplainer(path, providers=["CPUExecutionProvider"])
    good = {k: v.numpy() for k, v in text_batch(2, 6, seed=1).items()}
    with pytest.raises(ValueError, match="input 'attention_mask' has shape \\(2, 5\\), but input 'input_ids' has "
                                         "sequence size 6"):
        runtime(good["input_ids"], good["attention_mask"][:, :5])
    with pytest.raises(ValueError, match="token id 60, out of range for a vocabulary of 60"):
        runtime({"input_ids": np.full((2, 6), VOCAB), "attention_mask": good["attention_mask"]})
    with pytest.raises(ValueError, match="missing \\['attention_mask'\\]"):
        runtime({"input_ids": good["input_ids"]})
    logits, relevance = runtime(good)  # a tokenizer-style dict
    assert logits.shape == (2, 5) and relevance.shape == (2, 6)


# ---- export-time errors ----

def test_export_rejects_what_a_graph_cannot_take(tmp_path):
    encoder = relfast.Explainer(seeded(lambda: bert("BertModel"))(), "generic")
    with pytest.raises(ValueError, match="need a callable target, which an exported graph cannot take"):
        relfast.export.to_onnx(encoder, text_batch(1, 6, seed=0), tmp_path / "x.onnx")
    explainer = relfast.Explainer(relfast.models.default_model())
    with pytest.raises(ValueError, match="'example_inputs' must be a tensor or a dict of tensors"):
        relfast.export.to_torchscript(explainer, [1, 2], tmp_path / "x.pt")
    with pytest.raises(ValueError, match="'dynamic_sequence' applies to text models"):
        relfast.export.to_onnx(explainer, torch.zeros(1, 3, 64, 64), tmp_path / "x.onnx", dynamic_sequence=True)
    with pytest.raises(ValueError, match="must be a relfast.Explainer"):
        relfast.export.to_onnx(explainer.model, torch.zeros(1, 3, 64, 64), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="not written by relfast.export.to_onnx"):
        plain = tmp_path / "plain.onnx"
        torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), str(plain), dynamo=True)
        OnnxExplainer(plain)


def test_runtime_works_without_torch(default_files):
    """relfast.runtime serves the ONNX file where torch cannot be imported at all."""
    image = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    np.save(default_files["onnx"].with_suffix(".npy"), image)
    code = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
import relfast
from relfast.runtime import OnnxExplainer
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


def damaged_copy(source, folder, metadata):
    model = onnx.load(str(source))
    for entry in model.metadata_props:
        if entry.key == "relfast":
            entry.value = metadata
    path = folder / "damaged.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("kind", ["empty", "garbage", "metadata not JSON", "metadata without inputs", "plain model"])
def test_runtime_refuses_unreadable_files_clearly(default_files, tmp_path, kind):
    path = tmp_path / "bad.onnx"
    if kind == "empty":
        path.write_bytes(b"")
        words = "is empty, not an ONNX model"
    elif kind == "garbage":
        path.write_bytes(b"this is not a protobuf" * 10)
        words = "is not a readable ONNX model"
    elif kind == "metadata not JSON":
        path = damaged_copy(default_files["onnx"], tmp_path, "{not json")
        words = "metadata of .* is damaged \\(JSONDecodeError"
    elif kind == "metadata without inputs":
        path = damaged_copy(default_files["onnx"], tmp_path, json.dumps({"method": "generic"}))
        words = "metadata of .* is damaged \\(KeyError"
    else:
        model = onnx.load(str(default_files["onnx"]))
        del model.metadata_props[:]
        onnx.save(model, str(path))
        words = "was not written by relfast.export.to_onnx"
    with pytest.raises(ValueError, match="relfast.runtime.OnnxExplainer: argument 'path': .*" + words):
        OnnxExplainer(path, providers=["CPUExecutionProvider"])


def test_runtime_refuses_a_non_finite_result(default_files):
    """Where ONNX Runtime's own arithmetic overflows (weights or inputs too large), the runtime
    refuses the result as the eager explainer does, instead of returning NaN maps."""
    runtime = OnnxExplainer(default_files["onnx"], providers=["CPUExecutionProvider"])
    real_run = runtime.session.run

    class Overflowing:
        def __getattr__(self, name):
            return getattr(runtime.session_, name)

        def run(self, names, feeds):
            logits, relevance, explained = real_run(names, feeds)
            relevance[0, 0] = np.inf
            return [logits, relevance, explained]

    runtime.session_, runtime.session = runtime.session, Overflowing()
    with pytest.raises(ValueError, match="relevance overflowed to NaN or infinite"):
        runtime(GOOD)


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
