"""Served files: relfast.runtime.OnnxExplainer and the exported TorchScript file refuse bad input
with relfast's message (ValueError; torch.jit.Error from the scripted file) before the runtime
computes anything, refuse unreadable files clearly, never return a non-finite result, and agree
with the eager explainer on which inputs they refuse."""
import json

import numpy as np
import onnx
import pytest
import torch

import relfast
import relfast.export
from relfast.runtime import MAX_ABS_FLOAT_INPUT, OnnxExplainer

from test_explainer import bert
from test_export import VOCAB, seeded, text_batch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")

CPU = ["CPUExecutionProvider"]
GOOD = np.zeros((2, 3, 64, 64), np.float32)
IDS = np.ones((2, 6), np.int64)
MASK = np.ones((2, 6), np.int64)
TYPES = np.zeros((2, 6), np.int64)
POSITIONS = np.tile(np.arange(6), (2, 1))
TEXT = {"input_ids": IDS, "attention_mask": MASK, "token_type_ids": TYPES, "position_ids": POSITIONS}


def text_with(**changes):
    """The good text inputs, in the exported signature's order, with some replaced."""
    return {**TEXT, **changes}


def mask_with(row, col, value):
    mask = MASK.copy()
    mask[row, col] = value
    return mask


def pixels_with(value):
    pixels = GOOD.copy()
    pixels[1, 2, 3, 4] = value
    return pixels


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """BERT (60 tokens, 40 positions, 2 token types, 5 classes) exported with every text input it takes."""
    explainer = relfast.Explainer(seeded(bert)(), "generic")
    example = {**text_batch(1, 6, seed=0), "token_type_ids": torch.zeros(1, 6, dtype=torch.long),
               "position_ids": torch.arange(6)[None]}
    folder = tmp_path_factory.mktemp("text")
    return dict(explainer=explainer, onnx=relfast.export.to_onnx(explainer, example, folder / "bert.onnx"),
                script=relfast.export.to_torchscript(explainer, example, folder / "bert.pt"))


def runtime_that_must_not_run(path):
    runtime = OnnxExplainer(path, providers=CPU)

    class NotCalled:
        def __getattr__(self, name):
            if name == "run":
                raise AssertionError("ONNX Runtime was called with bad input")
            return getattr(runtime.session, name)

    runtime.session = NotCalled()
    return runtime


# Text values every entry point refuses (the eager explainer, the ONNX runtime, the TorchScript file,
# whose graphs would fail with "index out of range" or explain nonsense): case -> (inputs, the input
# named, words in every message).
LONG = {"input_ids": np.ones((1, 41), np.int64), "attention_mask": np.ones((1, 41), np.int64),
        "token_type_ids": np.zeros((1, 41), np.int64), "position_ids": np.zeros((1, 41), np.int64)}
TEXT_VALUES = {
    "token id beyond vocabulary": (text_with(input_ids=np.full((2, 6), VOCAB)), "input_ids",
                                   f"holds token id {VOCAB}, outside the model's vocabulary [0, {VOCAB})"),
    "negative token id": (text_with(input_ids=-IDS), "input_ids", "holds token id -1, outside"),
    "longer than the positions": (LONG, "input_ids", "holds sequences of 41 tokens; the model has 40 positions"),
    "token type beyond the table": (text_with(token_type_ids=TYPES + 2), "token_type_ids",
                                    "holds 2, outside the model's 2 token types [0, 2)"),
    "negative token type": (text_with(token_type_ids=TYPES - 1), "token_type_ids", "holds -1, outside"),
    "position beyond the learned ones": (text_with(position_ids=POSITIONS + 35), "position_ids",
                                         "holds 40, outside the model's 40 positions [0, 40)"),
    "negative position": (text_with(position_ids=POSITIONS - 1), "position_ids", "holds -1, outside"),
    "mask value 2": (text_with(attention_mask=mask_with(1, 3, 2)), "attention_mask",
                     "must hold only 0 (padding) and 1 (real), got 2"),
    "mask value -1": (text_with(attention_mask=mask_with(0, 0, -1)), "attention_mask", "got -1"),
    "all-padding sample": (text_with(attention_mask=mask_with(1, slice(None), 0)), "attention_mask",
                           "every sample needs at least one real token"),
}

# case -> (file, positional inputs, keyword arguments, words in the message)
ONNX_INPUTS = {
    "image rank": ("image", (GOOD[0],), {}, ["input 'pixel_values' must have shape (B, 3, 64, 64), got (3, 64, 64)"]),
    "image size": ("image", (GOOD[:, :, :32, :32],), {}, ["dimension 2 must be 64, the image size of the model"]),
    "image dtype": ("image", (GOOD.astype(np.float64),), {}, ["input 'pixel_values' must be float32, got float64"]),
    "image NaN": ("image", (pixels_with(np.nan),), {}, ["input 'pixel_values' holds NaN or infinite values"]),
    "image -inf": ("image", (pixels_with(-np.inf),), {}, ["input 'pixel_values' holds NaN or infinite values"]),
    "image huge": ("image", (pixels_with(1e30),), {}, ["input 'pixel_values' holds a value of magnitude 1e+30",
                                                       "within ±1e+06"]),
    "image just beyond the bound": ("image", (pixels_with(-2e6),), {}, ["magnitude 2e+06"]),
    "empty batch": ("image", (GOOD[:0],), {}, ["holds an empty batch"]),
    "torch tensor": ("image", (torch.zeros(2, 3, 64, 64),), {}, ["must be a numpy array, got a torch tensor"]),
    "a list": ("image", (GOOD.tolist(),), {}, ["input 'pixel_values' must be a numpy array, got list"]),
    "two inputs for one": ("image", (GOOD, GOOD), {}, ["expected 1 model input(s) ['pixel_values'], got 2"]),
    "unknown key": ("image", ({"pixel_values": GOOD, "extra": GOOD},), {}, ["unexpected ['extra']"]),
    "target too large": ("image", (GOOD,), {"target": 4}, ["argument 'target' holds class 4, out of range for a "
                                                           "model with 4 classes"]),
    "target below -1": ("image", (GOOD,), {"target": np.array([0, -2])}, ["argument 'target' holds class -2"]),
    "target shape": ("image", (GOOD,), {"target": np.array([0, 1, 2])}, ["'target' must be an int or have shape (2,)"]),
    "target floats": ("image", (GOOD,), {"target": np.array([0.0, 1.0])}, ["'target' must hold integer class"]),
    "target a bool": ("image", (GOOD,), {"target": True}, ["argument 'target' must be a class index, got a bool"]),
    "mask shorter": ("text", tuple(text_with(attention_mask=MASK[:, :5]).values()), {},
                     ["input 'attention_mask' has shape (2, 5), but input 'input_ids' has sequence size 6"]),
    "missing mask": ("text", ({"input_ids": IDS},), {},
                     ["missing ['attention_mask', 'token_type_ids', 'position_ids']"]),
    "int32 ids": ("text", tuple(text_with(input_ids=IDS.astype(np.int32)).values()), {},
                  ["input 'input_ids' must be int64, got int32"]),
    "float mask": ("text", (text_with(attention_mask=MASK.astype(np.float32)),), {},
                   ["input 'attention_mask' must be int64, got float32"]),
    "all-padding sample, named": ("text", (text_with(attention_mask=mask_with(1, slice(None), 0)),), {},
                                  ["input 'attention_mask' is all zeros for sample 1"]),
    **{f"text: {case}": ("text", (inputs,), {}, [f"input '{name}' ", words])
       for case, (inputs, name, words) in TEXT_VALUES.items()},
}


@pytest.mark.parametrize("case", sorted(ONNX_INPUTS))
def test_onnx_runtime_refuses_bad_input_before_onnx_runtime_runs(case, default_files, text_files):
    which, args, kwargs, words = ONNX_INPUTS[case]
    runtime = runtime_that_must_not_run(default_files["onnx"] if which == "image" else text_files["onnx"])
    with pytest.raises(ValueError) as info:
        runtime(*args, **kwargs)
    message = str(info.value)
    assert message.startswith("relfast.runtime.OnnxExplainer:"), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_good_text_input_runs(text_files):
    """The counterpart of the text cases: padding (zeros in a mask that has a real token) and every
    index at the end of its table run in both files."""
    good = text_with(attention_mask=mask_with(0, slice(3, None), 0), input_ids=IDS * (VOCAB - 1),
                     token_type_ids=TYPES + np.array([0, 1])[:, None], position_ids=POSITIONS + 34)
    logits, relevance = OnnxExplainer(text_files["onnx"], providers=CPU)(good)
    assert logits.shape == (2, 5) and relevance.shape == (2, 6)
    script = torch.jit.load(str(text_files["script"]))
    script_logits, script_relevance, _ = script(*[torch.from_numpy(v) for v in good.values()])
    np.testing.assert_allclose(script_logits.numpy(), logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(script_relevance.numpy(), relevance, rtol=1e-3, atol=1e-5)


def as_torch(inputs):
    return tuple(torch.from_numpy(np.ascontiguousarray(value)) for value in inputs.values())


B2 = torch.full((2,), -1)
# case -> (file, inputs with the target last, words in the last line of the torch.jit.Error: the first right after
# "relfast (exported explainer): ")
SCRIPT_INPUTS = {
    "image size": ("image", (torch.zeros(2, 3, 32, 32), B2), ["input 'pixel_values' must have shape (B, 3, 64, 64)"]),
    "image dtype": ("image", (torch.zeros(2, 3, 64, 64, dtype=torch.float64), B2),
                    ["input 'pixel_values' must be float32, got float64"]),
    "image inf": ("image", (torch.full((2, 3, 64, 64), float("inf")), B2),
                  ["input 'pixel_values' holds NaN or infinite values"]),
    "image huge": ("image", (torch.from_numpy(pixels_with(1e30)), B2),
                   ["input 'pixel_values' holds a value of magnitude 1.0"]),  # 1e30 as float32, printed in full
    "empty batch": ("image", (torch.zeros(0, 3, 64, 64), torch.full((0,), -1)),
                    ["input 'pixel_values' holds an empty batch"]),
    "target batch": ("image", (torch.zeros(2, 3, 64, 64), torch.full((3,), -1)),
                     ["input 'target' has shape [3], but an earlier input has size 2"]),
    "target class": ("image", (torch.zeros(2, 3, 64, 64), torch.full((2,), 4)),
                     ["input 'target' holds class 4, out of range"]),
    "target dtype": ("image", (torch.zeros(2, 3, 64, 64), torch.zeros(2, dtype=torch.int32)),
                     ["input 'target' must be int64, got int32"]),
    "text mask shorter": ("text", (*as_torch(text_with(attention_mask=MASK[:, :5])), B2),
                          ["input 'attention_mask' has shape [2, 5], but an earlier input has size 6"]),
    "all-padding sample, named": ("text", (*as_torch(text_with(attention_mask=mask_with(1, slice(None), 0))), B2),
                                  ["input 'attention_mask' is all zeros for sample 1"]),
    "float mask": ("text", (*as_torch(text_with(attention_mask=MASK.astype(np.float32))), B2),
                   ["input 'attention_mask' must be int64, got float32"]),
    **{f"text: {case}": ("text", (*as_torch(inputs), torch.full((len(inputs["input_ids"]),), -1)),
                         [f"input '{name}' ", words]) for case, (inputs, name, words) in TEXT_VALUES.items()},
}


@pytest.mark.parametrize("case", sorted(SCRIPT_INPUTS))
def test_torchscript_file_refuses_bad_input(case, default_files, text_files):
    which, args, words = SCRIPT_INPUTS[case]
    script = torch.jit.load(str(default_files["script"] if which == "image" else text_files["script"]))
    with pytest.raises(torch.jit.Error) as info:  # the documented type; its last line is relfast's message
        script(*args)
    last_line = str(info.value).splitlines()[-1]
    assert "relfast (exported explainer): " + words[0] in last_line, last_line
    for word in words[1:]:
        assert word in last_line, f"{word!r} not in {last_line!r}"


@pytest.mark.parametrize("case", sorted(TEXT_VALUES))
def test_eager_explainer_refuses_the_same_text_values(case, text_files):
    """The files' text checks are the eager explainer's: it refuses each case with the same words."""
    inputs, name, words = TEXT_VALUES[case]
    with pytest.raises(ValueError) as info:
        text_files["explainer"]({key: torch.from_numpy(value) for key, value in inputs.items()})
    message = str(info.value)
    assert message.startswith("relfast.Explainer:") and name in message and words in message, message


@pytest.mark.parametrize("magnitude", [1.0, 1e5, MAX_ABS_FLOAT_INPUT, 1.5e6, 1e20, 1e30])
def test_eager_onnx_and_torchscript_agree_on_large_inputs(magnitude, default_files):
    """Every entry point refuses the same inputs, and explains the rest alike: ONNX Runtime's own
    LayerNorm returns finite but wrong maps from about 1e20 on, where eager gives NaN."""
    pixels = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    pixels *= np.float32(magnitude / np.abs(pixels).max())
    explainer = relfast.Explainer(relfast.models.default_model())
    runtime = OnnxExplainer(default_files["onnx"], providers=CPU)
    script = torch.jit.load(str(default_files["script"]))
    runs = {"eager": lambda: explainer(torch.from_numpy(pixels)).relevance.numpy(),
            "onnx": lambda: runtime(pixels)[1],
            "torchscript": lambda: script(torch.from_numpy(pixels))[1].numpy()}
    results, refusals = {}, {}
    for name, run in runs.items():
        try:
            results[name] = run()
        except (ValueError, torch.jit.Error) as error:
            refusals[name] = str(error)
    if magnitude > MAX_ABS_FLOAT_INPUT:
        assert sorted(refusals) == sorted(runs), f"accepted by {sorted(results)}"
        assert all("magnitude" in message for message in refusals.values()), refusals
    else:
        assert refusals == {}
        for name in ("onnx", "torchscript"):
            scale = np.abs(results["eager"]).max()
            assert np.abs(results[name] - results["eager"]).max() <= 1e-4 * scale, name


# ---- unreadable files ----

def damaged_copy(source, folder, metadata):
    model = onnx.load(str(source))
    for entry in model.metadata_props:
        if entry.key == "relfast":
            entry.value = metadata
    path = folder / "damaged.onnx"
    onnx.save(model, str(path))
    return path


def without_metadata(source, folder):
    model = onnx.load(str(source))
    del model.metadata_props[:]
    path = folder / "plain.onnx"
    onnx.save(model, str(path))
    return path


def written(content):
    def make(source, folder):
        path = folder / "bad.onnx"
        path.write_bytes(content)
        return path
    return make


# case -> (makes the file from the good one and a folder, words in the message)
FILES = {
    "empty": (written(b""), "is empty, not an ONNX model"),
    "garbage": (written(b"this is not a protobuf" * 10), "is not a readable ONNX model"),
    "truncated": (lambda source, folder: written(source.read_bytes()[:5000])(source, folder),
                  "is not a readable ONNX model"),
    "metadata not JSON": (lambda source, folder: damaged_copy(source, folder, "{not json"),
                          "metadata of .* is damaged \\(JSONDecodeError"),
    "metadata without inputs": (lambda source, folder: damaged_copy(source, folder, json.dumps({"method": "generic"})),
                                "metadata of .* is damaged \\(KeyError"),
    "plain model": (without_metadata, "was not written by relfast.export.to_onnx"),
}


@pytest.mark.parametrize("case", sorted(FILES))
def test_runtime_refuses_unreadable_files_clearly(case, default_files, tmp_path):
    make, words = FILES[case]
    path = make(default_files["onnx"], tmp_path)
    with pytest.raises(ValueError, match="relfast.runtime.OnnxExplainer: argument 'path': .*" + words):
        OnnxExplainer(path, providers=CPU)


def test_runtime_refuses_a_non_finite_result(default_files):
    """Where ONNX Runtime's own arithmetic overflows (weights too large), the runtime refuses the
    result as the eager explainer does, instead of returning NaN maps."""
    runtime = OnnxExplainer(default_files["onnx"], providers=CPU)
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
