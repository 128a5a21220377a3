"""relfast.export of method 'attnlrp': one file per model, traced from a batch-1 example, gives the
eager AttnLRP explainer's logits, relevance and explained target at other batch sizes (and, for
text, other sequence lengths), with padding, for the predicted and for given targets.

One tiny float32 model (2 layers) per family the method supports: BERT family, causal LMs, HF
ViT/DeiT, timm and torchvision ViTs, a hand-written module given a layout (and CLIP, two maps).
``make test`` exports Llama and torchvision to ONNX and one model of every family to TorchScript;
the other models (GPT-2, Qwen2, Mistral, RoBERTa, DistilBERT, DeiT, CLIP), the other ONNX exports
and the float64 and bfloat16 files are ``slow`` (an ONNX export takes 10-30 s on 2 cores).

Tolerances (relative to the largest magnitude of the eager result, as in test_export.py):
- float32: logits 1e-5, relevance 1e-4, the bounds ``relfast export`` checks files with. Both are
  float32 runs of the same rules; the file computes attention as softmax(q·kᵀ·s + mask)·v where
  eager runs the fused kernel, and ONNX Runtime's kernels round differently (measured <= 1.2e-6).
- float64 (TorchScript): 1e-12; the same arithmetic up to the order of sums (measured <= 1e-15).
- float16 / bfloat16 (TorchScript): eager itself is 5e-4 / 3e-3 (Llama) from the float64 map, and
  the file writes out in float32 the softmax that eager's fused kernel computes in the half type;
  so the file may be no further from the float64 run than twice eager's error plus one unit of
  the type's rounding (2^-11 / 2^-8).
ONNX takes float32 models only (refused otherwise: ONNX Runtime cannot run the graph in other dtypes).
"""
import json
from functools import partial

import numpy as np
import onnx
import pytest
import torch
import transformers

import relfast
import relfast.export
from relfast.explain.attnlrp import written_out_attention
from relfast.runtime import OnnxExplainer

import bimodal_models
import engine_models
from engine_models import CLASSES, HAND_WRITTEN_LAYOUT, HEADS, HIDDEN, IMAGE, PATCH, VOCAB, HandWrittenViT
from test_export import LOGITS_RTOL, RELEVANCE_RTOL, as_numpy, rel_err
from test_export_causal_lm import last_real_tokens, without_explained_token

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore::UserWarning")

LAYERS = 2
SIZES = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
             intermediate_size=64)


# ---- tiny models, one builder per supported model ----

def bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        **SIZES, max_position_embeddings=40, num_labels=CLASSES))


def roberta():
    return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        **SIZES, max_position_embeddings=40, num_labels=CLASSES, pad_token_id=0))


def distilbert():
    return transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=64, max_position_embeddings=40,
        num_labels=CLASSES))


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, bos_token_id=None,
        eos_token_id=None))


def llama_like(config, model, **extra):
    def build():
        return getattr(transformers, model)(getattr(transformers, config)(
            **SIZES, num_key_value_heads=2, max_position_embeddings=64, **extra))
    return build


def deit():
    return transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(
        image_size=IMAGE, patch_size=PATCH, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=64, num_labels=CLASSES))


# name -> (builder, kind): "classifier" (right padding), "lm" (left padding), "image" (a dict of
# pixel_values for HF models, a tensor for the others)
MODELS = {
    "bert": (bert, "classifier"), "roberta": (roberta, "classifier"), "distilbert": (distilbert, "classifier"),
    "gpt2": (gpt2, "lm"), "llama": (llama_like("LlamaConfig", "LlamaForCausalLM"), "lm"),
    "qwen2": (llama_like("Qwen2Config", "Qwen2ForCausalLM"), "lm"),
    "mistral": (llama_like("MistralConfig", "MistralForCausalLM", sliding_window=None), "lm"),
    "hf-vit": (partial(engine_models.hf_vit, layers=LAYERS), "image"), "deit": (deit, "image"),
    "timm": (partial(engine_models.timm_vit, layers=LAYERS), "image"),
    "torchvision": (partial(engine_models.torchvision_vit, layers=LAYERS), "image"),
    "hand-written": (HandWrittenViT, "image"),
}
OPTIONS = {"hand-written": {"layout": relfast.TokenLayout(**HAND_WRITTEN_LAYOUT)}}  # explainer options
FAST_ONNX = ("llama", "torchvision")  # text (dynamic length, padding) and images
FAST_SCRIPT = FAST_ONNX + ("bert", "hf-vit", "timm", "hand-written")  # one model of every family


def names(fast):
    return [name if name in fast else pytest.param(name, marks=pytest.mark.slow) for name in MODELS]


def build(name, dtype=torch.float32):
    torch.manual_seed(0)
    return MODELS[name][0]().to(dtype).eval()


# ---- inputs ----

def inputs_for(name, batch, seed, length=9, dtype=torch.float32):
    """Text: every other sample padded by a different amount (classifiers on the right, LMs on
    the left, pad id 0), at least 2 real tokens; images: random pixels."""
    kind = MODELS[name][1]
    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        pixels = torch.randn(batch, 3, IMAGE, IMAGE, generator=g).to(dtype)
        return {"pixel_values": pixels} if name in ("hf-vit", "deit") else pixels
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(0, batch, 2):
        pad = int(torch.randint(1, length - 1, (1,), generator=g))
        if kind == "lm":
            mask[i, :pad], ids[i, :pad] = 0, 0
        else:
            mask[i, length - pad:], ids[i, length - pad:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def lengths(name):
    # the example has 6 tokens; the file is run at other lengths
    return (7, 13) if MODELS[name][1] != "image" else (None,)


def example(name, dtype=torch.float32):
    """Batch 1 (traced at batch 2); text padded, so that neither padding nor its absence is baked in."""
    return inputs_for(name, 1, seed=100, length=6, dtype=dtype)


def positional(inputs):
    return list(inputs.values()) if isinstance(inputs, dict) else [inputs]


class Exported:
    """A model's attnlrp explainer and its files, each exported on first use."""

    def __init__(self, name, folder):
        self.name, self.folder = name, folder
        self.model = build(name)
        self.explainer = relfast.Explainer(self.model, "attnlrp", **OPTIONS.get(name, {}))
        self._onnx = self._script = None

    @property
    def onnx_path(self):
        if self._onnx is None:
            self._onnx = relfast.export.to_onnx(self.explainer, example(self.name), self.folder / f"{self.name}.onnx")
        return self._onnx

    @property
    def onnx(self):
        return OnnxExplainer(self.onnx_path, providers=["CPUExecutionProvider"])

    @property
    def script(self):
        if self._script is None:
            path = relfast.export.to_torchscript(self.explainer, example(self.name), self.folder / f"{self.name}.pt")
            self._script = torch.jit.load(str(path))
        return self._script


@pytest.fixture(scope="module")
def exported_by_name():
    return {}


@pytest.fixture
def files(request, exported_by_name, tmp_path_factory):
    name = request.param
    if name not in exported_by_name:
        exported_by_name[name] = Exported(name, tmp_path_factory.mktemp(name))
    return exported_by_name[name]


def assert_matches(files, where, eager, logits, relevance, explained, inputs):
    """A file's outputs against eager's, and what holds of every AttnLRP map: padding and a
    class token (a parameter, not an input) get 0."""
    assert rel_err(logits, eager.logits) <= LOGITS_RTOL, where
    assert rel_err(relevance, eager.relevance) <= RELEVANCE_RTOL, where
    np.testing.assert_array_equal(np.asarray(explained), eager.target.numpy(), err_msg=where)
    if isinstance(inputs, dict) and "attention_mask" in inputs:
        mask = np.asarray(inputs["attention_mask"])
        assert (np.asarray(relevance)[mask == 0] == 0).all(), f"{where}: padding has relevance"
        if MODELS[files.name][1] == "lm":  # the explained token's own entry apart (test_export_causal_lm)
            rows = last_real_tokens(mask)
            assert rel_err(without_explained_token(relevance, rows),
                           without_explained_token(eager.relevance, rows)) <= RELEVANCE_RTOL, where
    else:
        assert (np.asarray(relevance)[:, 0] == 0).all(), f"{where}: the class token (a parameter) has relevance"


def test_parity_bounds_are_the_clis():
    """``relfast export --method attnlrp`` checks its files with the bounds these tests use."""
    assert relfast.export.PARITY_LOGITS == LOGITS_RTOL
    assert relfast.export.parity_relevance("attnlrp", "onnx") == RELEVANCE_RTOL
    assert relfast.export.parity_relevance("attnlrp", "torchscript") == RELEVANCE_RTOL


# ---- float32: the files against eager ----

@pytest.mark.parametrize("files", names(FAST_ONNX), indirect=True)
def test_onnx_runtime_matches_eager(files):
    runtime = files.onnx
    for batch in (1, 3):
        for length in lengths(files.name):
            inputs = inputs_for(files.name, batch, seed=10 * batch + (length or 0), length=length or 9)
            eager = files.explainer(inputs)
            outputs = runtime.run(as_numpy(inputs))
            assert outputs["relevance"].dtype == np.float32
            assert_matches(files, f"{files.name} B={batch} N={length}", eager, outputs["logits"],
                           outputs["relevance"], outputs["explained_target"], inputs)
    # given targets: one per sample (not the predictions), then one for every sample
    inputs = inputs_for(files.name, 5, seed=7, length=11)
    classes = runtime.num_classes
    target = torch.tensor([3, 0, classes - 1, 1, 2])
    outputs = runtime.run(as_numpy(inputs), target=target.numpy())
    assert_matches(files, "per-sample targets", files.explainer(inputs, target=target), outputs["logits"],
                   outputs["relevance"], outputs["explained_target"], inputs)
    outputs = runtime.run(as_numpy(inputs), target=1)
    assert_matches(files, "target 1", files.explainer(inputs, target=1), outputs["logits"], outputs["relevance"],
                   outputs["explained_target"], inputs)


@pytest.mark.parametrize("files", names(FAST_SCRIPT), indirect=True)
def test_torchscript_matches_eager(files):
    for batch in (1, 3):
        for length in lengths(files.name):
            inputs = inputs_for(files.name, batch, seed=10 * batch + (length or 0) + 1, length=length or 9)
            eager = files.explainer(inputs)
            with torch.no_grad():  # the target left out: each sample's predicted class
                logits, relevance, explained = files.script(*positional(inputs))
            assert relevance.dtype == torch.float32
            assert_matches(files, f"{files.name} B={batch} N={length}", eager, logits, relevance, explained, inputs)
    inputs = inputs_for(files.name, 5, seed=8, length=11)
    target = torch.tensor([3, 0, (VOCAB if MODELS[files.name][1] == "lm" else CLASSES) - 1, 1, 2])
    with torch.no_grad():
        logits, relevance, explained = files.script(*positional(inputs), target)
    assert_matches(files, "per-sample targets", files.explainer(inputs, target=target), logits, relevance, explained,
                   inputs)


@pytest.mark.parametrize("files", ["llama", pytest.param("bert", marks=pytest.mark.slow), "torchvision"],
                         indirect=True)
def test_files_hold_plain_attention_and_standard_ops(files):
    """The files compute attention as plain ops (no fused attention kernel: its backward has no
    ONNX form, and a traced one would tie the file to the tracing device); the ONNX file holds
    standard ops only and keeps the batch (and sequence) dynamic."""
    graph = str(files.script.inlined_graph)
    assert "scaled_dot_product" not in graph and "softmax" in graph
    model = onnx.load(str(files.onnx_path))
    domains = {node.domain for node in model.graph.node} | {node.domain for f in model.functions for node in f.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ops: {domains}"
    spec = json.loads({p.key: p.value for p in model.metadata_props}["relfast"])
    assert spec["method"] == json.loads(files.script.relfast_spec)["method"] == "attnlrp"
    shapes = [i.shape for i in files.onnx.session.get_inputs()]
    if MODELS[files.name][1] == "image":
        assert shapes == [["batch", 3, IMAGE, IMAGE], ["batch"]]
    else:
        assert shapes == [["batch", "sequence"]] * 2 + [["batch"]]


# ---- other dtypes (TorchScript) ----

@pytest.mark.parametrize("dtype", [pytest.param(torch.float64, marks=pytest.mark.slow), torch.float16,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.slow)], ids=str)
def test_torchscript_keeps_the_models_dtype(dtype, tmp_path):
    name = "llama"
    model = build(name, dtype)
    explainer = relfast.Explainer(model, "attnlrp")
    script = torch.jit.load(str(relfast.export.to_torchscript(explainer, example(name, dtype), tmp_path / "m.pt")))
    inputs = inputs_for(name, 3, seed=5, length=10, dtype=dtype)
    exact = relfast.Explainer(build(name, torch.float64), "attnlrp")(inputs)
    eager = explainer(inputs, target=exact.target)
    with torch.no_grad():
        logits, relevance, explained = script(*positional(inputs), exact.target)
    assert logits.dtype == dtype and relevance.dtype == torch.float32 and torch.equal(explained, exact.target)
    if dtype == torch.float64:
        assert rel_err(logits, eager.logits) <= 1e-12 and rel_err(relevance, eager.relevance) <= 1e-12
        return
    unit = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]
    for got, mine, want in ((logits, eager.logits, exact.logits), (relevance, eager.relevance, exact.relevance)):
        eager_error = rel_err(mine.float(), want)
        assert rel_err(got.float(), want) <= 2 * eager_error + unit, (rel_err(got.float(), want), eager_error)


# ---- the written-out attention itself ----

@pytest.mark.parametrize("name", ["llama", "torchvision"])
def test_written_out_attention_gives_the_fused_kernels_relevance(name):
    """What the export traces (SDPA as softmax(q·kᵀ·s + mask)·v with the uniform rule on both
    products) is eager AttnLRP's relevance, in float64: causal mask, left padding and grouped
    key/value heads (Llama); nn.MultiheadAttention (torchvision). And only inside the context."""
    explainer = relfast.Explainer(build(name, torch.float64), "attnlrp")
    inputs = inputs_for(name, 3, seed=4, length=10, dtype=torch.float64)
    fused = explainer(inputs)
    with written_out_attention():
        written = explainer(inputs)
    assert rel_err(written.relevance, fused.relevance) <= 1e-12
    assert rel_err(written.logits, fused.logits) <= 1e-12
    # A wrong share of the products would show: the plain gradient × input map is another map.
    plain = relfast.Explainer(explainer.model, "generic")(inputs, target=fused.target)
    assert rel_err(plain.relevance, fused.relevance) > 1e-2


# ---- refusals ----

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_onnx_refuses_models_that_are_not_float32(dtype, tmp_path):
    explainer = relfast.Explainer(build("llama", dtype), "attnlrp")
    forwards = []
    hook = explainer.model.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        with pytest.raises(ValueError) as info:
            relfast.export.to_onnx(explainer, example("llama", dtype), tmp_path / "m.onnx")
    finally:
        hook.remove()
    message = str(info.value)
    assert message.startswith("relfast.export.to_onnx: the LlamaForCausalLM model's parameters are "
                              f"{str(dtype).replace('torch.', '')}; ONNX export takes float32 models"), message
    assert "to_torchscript" in message and "model.float()" in message
    assert forwards == [] and list(tmp_path.iterdir()) == []


class SoftmaxActivation(torch.nn.Module):
    def forward(self, x):
        return torch.softmax(x, dim=-1)


@pytest.mark.parametrize("exporter", ["to_onnx", "to_torchscript"])
def test_an_op_without_a_rule_is_refused_as_in_eager(exporter, tmp_path):
    """A model the eager AttnLRP explainer refuses (an activation without a rule) is refused by the
    exporters with the same message, and no file is written."""
    model = build("bert")
    model.bert.encoder.layer[0].intermediate.intermediate_act_fn = SoftmaxActivation().eval()
    explainer = relfast.Explainer(model, "attnlrp")
    with pytest.raises(ValueError) as eager:
        explainer(example("bert"))
    with pytest.raises(ValueError) as exported:
        getattr(relfast.export, exporter)(explainer, example("bert"), tmp_path / ("m.onnx" if exporter == "to_onnx"
                                                                                  else "m.pt"))
    assert "torch.softmax" in str(eager.value) and "no AttnLRP rule" in str(eager.value)
    assert str(exported.value) == str(eager.value)
    assert list(tmp_path.iterdir()) == []


def test_a_headless_tower_is_refused(tmp_path):
    """CLIP's image tower alone has no classes: its explanations need a callable target (a function
    of its embedding), which a file cannot take."""
    config = bimodal_models.clip().config.vision_config
    torch.manual_seed(0)
    explainer = relfast.Explainer(transformers.CLIPVisionModel(config).eval(), "attnlrp")
    pixels = torch.randn(1, config.num_channels, config.image_size, config.image_size)
    with pytest.raises(ValueError, match="relfast.export: the CLIPVisionModel model has no classification head; its "
                                         "explanations need a callable target"):
        relfast.export.to_torchscript(explainer, {"pixel_values": pixels}, tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_per_layer_relevance_is_refused(tmp_path):
    """``layers=True`` adds per-layer maps the file does not return yet: refused, not dropped."""
    explainer = relfast.Explainer(build("llama"), "attnlrp", layers=True)
    with pytest.raises(ValueError, match=r"relfast\.export: the explainer's option layers=True \(per-layer "
                                         r"relevance\) is not exportable yet"):
        relfast.export.to_onnx(explainer, example("llama"), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# ---- two maps (CLIP), and the command ----

@pytest.mark.slow
def test_clip_files_give_both_maps(tmp_path):
    """CLIP: the similarity of image b with text target[b] and both towers' maps, from one backward."""
    explainer = relfast.Explainer(bimodal_models.clip().float(), "attnlrp")

    def clip_inputs(images, texts, seed, length=9):
        return {k: v.float() if v.is_floating_point() else v
                for k, v in bimodal_models.clip_inputs(images, texts, seed=seed, length=length).items()}

    example_inputs = clip_inputs(2, 2, seed=0)
    runtime = OnnxExplainer(relfast.export.to_onnx(explainer, example_inputs, tmp_path / "clip.onnx"),
                            providers=["CPUExecutionProvider"])
    script = torch.jit.load(str(relfast.export.to_torchscript(explainer, example_inputs, tmp_path / "clip.pt")))
    inputs = clip_inputs(3, 3, seed=1, length=11)
    for target in (None, torch.tensor([2, 0, 1])):  # None: image b with text b (the files' -1)
        eager = explainer(inputs, target=target)
        file_target = torch.full((3,), -1) if target is None else target
        outputs = runtime.run(as_numpy(inputs), target=file_target.numpy())
        with torch.no_grad():
            logits, image, explained, text = script(*inputs.values(), file_target)
        for got in ((outputs["logits"], outputs["relevance"], outputs["text_relevance"], outputs["explained_target"]),
                    (logits, image, text, explained)):
            assert rel_err(got[0], eager.logits) <= LOGITS_RTOL
            assert rel_err(got[1], eager.maps["image"]) <= RELEVANCE_RTOL
            assert rel_err(got[2], eager.maps["text"]) <= RELEVANCE_RTOL
            np.testing.assert_array_equal(np.asarray(got[3]), eager.target.numpy())


@pytest.mark.slow
def test_the_command_exports_attnlrp(tmp_path, capsys):
    """``relfast export --method attnlrp`` writes the file and checks it against eager (the shipped model)."""
    from testing import cli_in_process as explain_in_process

    code, stdout, stderr = explain_in_process(capsys, "export", "--method", "attnlrp", "--format", "torchscript",
                                              "--out", str(tmp_path / "m.pt"))
    assert code == 0, stderr[-3000:]
    assert "method attnlrp" in stdout and "(ok)" in stdout and (tmp_path / "m.pt").is_file(), stdout
