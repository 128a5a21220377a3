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


def pixels_with(value):
    pixels = GOOD.copy()
    pixels[1, 2, 3, 4] = value
    return pixels


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    explainer = relfast.Explainer(seeded(bert)(), "generic")  # 60 tokens, 40 positions, 5 classes
    return relfast.export.to_onnx(explainer, text_batch(1, 6, seed=0), tmp_path_factory.mktemp("text") / "bert.onnx")


def runtime_that_must_not_run(path):
    runtime = OnnxExplainer(path, providers=CPU)

    class NotCalled:
        def __getattr__(self, name):
            if name == "run":
                raise AssertionError("ONNX Runtime was called with bad input")
            return getattr(runtime.session, name)

    runtime.session = NotCalled()
    return runtime


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
    "mask shorter": ("text", (IDS, MASK[:, :5]), {}, ["input 'attention_mask' has shape (2, 5), but input "
                                                      "'input_ids' has sequence size 6"]),
    "token id beyond vocabulary": ("text", ({"input_ids": np.full((2, 6), VOCAB), "attention_mask": MASK},), {},
                                   [f"holds token id {VOCAB}, out of range for a vocabulary of {VOCAB}"]),
    "negative token id": ("text", ({"input_ids": -IDS, "attention_mask": MASK},), {}, ["holds token id -1"]),
    "longer than the positions": ("text", (np.ones((1, 41), np.int64), np.ones((1, 41), np.int64)), {},
                                  ["holds sequences of 41 tokens; the exported model has 40 positions"]),
    "missing mask": ("text", ({"input_ids": IDS},), {}, ["missing ['attention_mask']"]),
    "int32 ids": ("text", (IDS.astype(np.int32), MASK), {}, ["input 'input_ids' must be int64, got int32"]),
}


@pytest.mark.parametrize("case", sorted(ONNX_INPUTS))
def test_onnx_runtime_refuses_bad_input_before_onnx_runtime_runs(case, default_files, text_file):
    which, args, kwargs, words = ONNX_INPUTS[case]
    runtime = runtime_that_must_not_run(default_files["onnx"] if which == "image" else text_file)
    with pytest.raises(ValueError) as info:
        runtime(*args, **kwargs)
    message = str(info.value)
    assert message.startswith("relfast.runtime.OnnxExplainer:"), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_good_text_input_runs(text_file):
    logits, relevance = OnnxExplainer(text_file, providers=CPU)({"input_ids": IDS, "attention_mask": MASK})
    assert logits.shape == (2, 5) and relevance.shape == (2, 6)


# case -> (pixels, target, words in the last line of the torch.jit.Error)
SCRIPT_INPUTS = {
    "image size": (torch.zeros(2, 3, 32, 32), torch.full((2,), -1), "input 'pixel_values' must have shape (B, 3, 64, 64)"),
    "image dtype": (torch.zeros(2, 3, 64, 64, dtype=torch.float64), torch.full((2,), -1),
                    "input 'pixel_values' must be float32, got float64"),
    "image inf": (torch.full((2, 3, 64, 64), float("inf")), torch.full((2,), -1),
                  "input 'pixel_values' holds NaN or infinite values"),
    "image huge": (torch.from_numpy(pixels_with(1e30)), torch.full((2,), -1),
                   "input 'pixel_values' holds a value of magnitude 1.0"),  # 1e30 as float32, printed in full
    "empty batch": (torch.zeros(0, 3, 64, 64), torch.full((0,), -1), "input 'pixel_values' holds an empty batch"),
    "target batch": (torch.zeros(2, 3, 64, 64), torch.full((3,), -1),
                     "input 'target' has shape [3], but an earlier input has size 2"),
    "target class": (torch.zeros(2, 3, 64, 64), torch.full((2,), 4), "input 'target' holds class 4, out of range"),
    "target dtype": (torch.zeros(2, 3, 64, 64), torch.zeros(2, dtype=torch.int32), "input 'target' must be int64, got int32"),
}


@pytest.mark.parametrize("case", sorted(SCRIPT_INPUTS))
def test_torchscript_file_refuses_bad_input(case, default_files):
    pixels, target, words = SCRIPT_INPUTS[case]
    script = torch.jit.load(str(default_files["script"]))
    with pytest.raises(torch.jit.Error) as info:  # the documented type; its last line is relfast's message
        script(pixels, target)
    assert "relfast (exported explainer): " + words in str(info.value).splitlines()[-1]


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
