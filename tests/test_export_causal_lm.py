"""relfast.export for HuggingFace causal LMs: one file, exported from a batch-1 example, gives the
eager explainer's next-token logits, relevance and explained token at every batch size and
sequence length, with left-padded samples (positions from the attention mask, the explained row at
the last real token) and GPT-2's and Llama's causal masks built inside the graph.

The GPT-2 file is traced from an unpadded example and the Llama file from a left-padded one, so
neither padding case may be baked into a graph. Errors are relative to the largest magnitude of the
eager result, as in test_export.py.
"""
import json

import numpy as np
import onnx
import pytest
import torch
import transformers

import relfast
import relfast.export
from relfast.runtime import OnnxExplainer

from test_export import LOGITS_RTOL, RELEVANCE_RTOL, as_numpy, rel_err

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore::UserWarning")

VOCAB = 60
BATCHES = (1, 2, 5)
LENGTHS = (7, 19)


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(config)


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


MODELS = {"gpt2": gpt2, "llama": llama}


def prompts(batch, length, seed, padded=True):
    """Token ids with (if ``padded``) every other sample left-padded (pad id 0) by a different
    amount, keeping at least 2 real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(0, batch if padded else 0, 2):
        pad = int(torch.randint(1, length - 1, (1,), generator=g))
        mask[i, :pad] = 0
        ids[i, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def without_explained_token(relevance, rows):
    """The relevance of the other tokens: the explained token's own entry (1 from the identity, plus
    what flowed through attention) dominates max|eager|, so it is compared apart."""
    relevance = np.array(relevance, dtype=np.float64)
    relevance[np.arange(len(rows)), rows] = 0
    return relevance


def last_real_tokens(mask):
    return np.asarray(mask).shape[1] - 1 - np.argmax(np.asarray(mask)[:, ::-1], axis=1)


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    name = request.param
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    explainer = relfast.Explainer(model)
    folder = tmp_path_factory.mktemp(name)
    example = prompts(1, 6, seed=100, padded=name == "llama")
    assert bool((example["attention_mask"] == 0).any()) == (name == "llama")
    onnx_path = relfast.export.to_onnx(explainer, example, folder / "lm_explained.onnx")
    script_path = relfast.export.to_torchscript(explainer, example, folder / "lm_explained.pt")
    return dict(name=name, model=model, explainer=explainer, onnx_path=onnx_path,
                onnx=OnnxExplainer(onnx_path, providers=["CPUExecutionProvider"]),
                script=torch.jit.load(str(script_path)))


def assert_matches(where, eager, logits, relevance, explained, mask):
    assert rel_err(logits, eager.logits) <= LOGITS_RTOL, where
    assert rel_err(relevance, eager.relevance) <= RELEVANCE_RTOL, where
    rows = last_real_tokens(mask)
    assert rel_err(without_explained_token(relevance, rows),
                   without_explained_token(eager.relevance, rows)) <= RELEVANCE_RTOL, where
    np.testing.assert_array_equal(np.asarray(explained), eager.target.numpy(), err_msg=where)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("length", LENGTHS)
def test_onnx_runtime_matches_eager(exported, batch, length):
    inputs = prompts(batch, length, seed=10 * batch + length)
    eager = exported["explainer"](inputs)
    assert eager.logits.shape == (batch, VOCAB) and eager.relevance.shape == (batch, length)
    outputs = exported["onnx"].run(as_numpy(inputs))
    assert outputs["relevance"].dtype == np.float32
    assert_matches(f"{exported['name']} B={batch} N={length}", eager, outputs["logits"], outputs["relevance"],
                   outputs["explained_target"], inputs["attention_mask"])


@pytest.mark.parametrize("batch,length", [(1, 7), (2, 19), (5, 7)])
def test_torchscript_matches_eager(exported, batch, length):
    inputs = prompts(batch, length, seed=10 * batch + length + 1)
    eager = exported["explainer"](inputs)
    with torch.no_grad():
        logits, relevance, explained = exported["script"](inputs["input_ids"], inputs["attention_mask"],
                                                          torch.full((batch,), -1))
    assert_matches(f"{exported['name']} B={batch} N={length}", eager, logits, relevance, explained,
                   inputs["attention_mask"])


def test_explicit_next_tokens(exported):
    """One next token per sample (not the predicted ones), and one id for every sample."""
    inputs = prompts(5, 11, seed=3)
    target = torch.tensor([3, 0, VOCAB - 1, 17, 42])
    eager = exported["explainer"](inputs, target=target)
    outputs = exported["onnx"].run(as_numpy(inputs), target=target.numpy())
    assert_matches("onnx", eager, outputs["logits"], outputs["relevance"], outputs["explained_target"],
                   inputs["attention_mask"])
    logits, relevance, explained = exported["script"](inputs["input_ids"], inputs["attention_mask"], target)
    assert_matches("torchscript", eager, logits, relevance, explained, inputs["attention_mask"])
    same = exported["explainer"](inputs, target=7)
    outputs = exported["onnx"].run(as_numpy(inputs), target=7)
    assert_matches("onnx, one id", same, outputs["logits"], outputs["relevance"], outputs["explained_target"],
                   inputs["attention_mask"])


def test_left_padded_sample_is_explained_as_alone(exported):
    """In the file, a left-padded sample gets the logits and relevance (over its real tokens) it
    gets unpadded on its own: positions and the explained row come from the attention mask."""
    padded = prompts(3, 12, seed=5)
    real = padded["attention_mask"][0].bool()
    alone = {k: v[:1, real] for k, v in padded.items()}
    logits, relevance = exported["onnx"](as_numpy(padded))
    alone_logits, alone_relevance = exported["onnx"](as_numpy(alone))
    assert rel_err(logits[:1], alone_logits) <= LOGITS_RTOL
    assert rel_err(relevance[:1, real.numpy()], alone_relevance) <= RELEVANCE_RTOL


def test_onnx_file_describes_the_vocabulary(exported):
    model = onnx.load(str(exported["onnx_path"]))
    domains = {node.domain for node in model.graph.node} | {node.domain for f in model.functions for node in f.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ops: {domains}"
    spec = json.loads({p.key: p.value for p in model.metadata_props}["relfast"])
    assert spec["num_classes"] == spec["vocab_size"] == VOCAB == exported["onnx"].num_classes
    assert spec["model"] == type(exported["model"]).__name__ and spec["num_prefix_tokens"] == 0
    assert [i.shape for i in exported["onnx"].session.get_inputs()] == [["batch", "sequence"]] * 2 + [["batch"]]


def test_runtime_checks_token_ids_and_next_tokens(exported):
    runtime = exported["onnx"]
    good = as_numpy(prompts(2, 6, seed=1))
    logits, relevance = runtime(good)
    assert logits.shape == (2, VOCAB) and relevance.shape == (2, 6)
    with pytest.raises(ValueError, match=f"token id {VOCAB}, outside the model's vocabulary \\[0, {VOCAB}\\)"):
        runtime({"input_ids": np.full((2, 6), VOCAB), "attention_mask": good["attention_mask"]})
    with pytest.raises(ValueError, match=f"argument 'target' holds class {VOCAB}, out of range for a model with "
                                         f"{VOCAB} classes"):
        runtime(good, target=VOCAB)
    with pytest.raises(ValueError, match="input 'attention_mask' has shape \\(2, 5\\), but input 'input_ids' has "
                                         "sequence size 6"):
        runtime(good["input_ids"], good["attention_mask"][:, :5])


def test_runtime_refuses_sequences_longer_than_the_positions(exported):
    """GPT-2's learned positions end at n_positions (64): a longer prompt is refused by both files
    before they run (they would fail inside with an indexing error); Llama's rotary positions do not end."""
    runtime = exported["onnx"]
    long = {"input_ids": np.ones((1, 65), np.int64), "attention_mask": np.ones((1, 65), np.int64)}
    if exported["name"] == "gpt2":
        assert runtime.spec["max_positions"] == 64
        message = "input 'input_ids' holds sequences of 65 tokens; the model has 64 positions"
        with pytest.raises(ValueError, match=message):
            runtime(long)
        with pytest.raises(torch.jit.Error, match=message):
            exported["script"](*[torch.from_numpy(v) for v in long.values()])
    else:
        assert runtime.spec["max_positions"] is None
        logits, relevance = runtime(long)
        assert relevance.shape == (1, 65) and np.isfinite(relevance).all()
        with torch.no_grad():
            assert exported["script"](*[torch.from_numpy(v) for v in long.values()])[1].shape == (1, 65)


# case -> (change to two good prompts, words in every entry point's message)
BAD_PROMPTS = {
    "token id beyond the vocabulary": ({"input_ids": np.full((2, 6), VOCAB)},
                                       f"holds token id {VOCAB}, outside the model's vocabulary [0, {VOCAB})"),
    "negative token id": ({"input_ids": np.full((2, 6), -3)}, "holds token id -3, outside"),
    "all-padding sample": ({"attention_mask": np.array([[0, 0, 1, 1, 1, 1], [0] * 6])},
                           "every sample needs at least one real token"),
    "mask value 2": ({"attention_mask": np.array([[1, 1, 2, 1, 1, 1], [1] * 6])},
                     "must hold only 0 (padding) and 1 (real), got 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_every_entry_point_refuses_bad_prompts(exported, case):
    """What the eager explainer refuses, both files refuse with its words before running (an
    all-padding prompt has no last real token; ids out of range fail inside with an indexing error)."""
    change, words = BAD_PROMPTS[case]
    prompt = {**as_numpy(prompts(2, 6, seed=1)), **change}
    with pytest.raises(ValueError) as eager:
        exported["explainer"]({k: torch.from_numpy(v) for k, v in prompt.items()})
    runtime = OnnxExplainer(exported["onnx_path"], providers=["CPUExecutionProvider"])
    runtime.session = None  # refused before ONNX Runtime is reached
    with pytest.raises(ValueError) as served:
        runtime(prompt)
    with pytest.raises(torch.jit.Error) as scripted:
        exported["script"](*[torch.from_numpy(v) for v in prompt.values()])
    messages = [str(eager.value), str(served.value), str(scripted.value).splitlines()[-1]]
    assert all(words in message for message in messages), messages
    assert messages[1].startswith("relfast.runtime.OnnxExplainer: input '")
    assert "relfast (exported explainer): input '" in messages[2]
