"""relfast.export.to_onnx / to_torchscript: every bad argument gets a ValueError naming it, before
any tracing (the model's forward never runs) and without writing a file."""
import logging

import pytest
import torch

import relfast
import relfast.export

from test_explainer import bert
from test_export import VOCAB, seeded, text_batch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")

PIXELS = torch.zeros(1, 3, 64, 64)


def image_explainer():
    return relfast.Explainer(relfast.models.default_model())


def text_explainer():
    return relfast.Explainer(seeded(bert)())


def with_value(value):
    pixels = PIXELS.clone()
    pixels[0, 1, 2, 3] = value
    return pixels


# case -> (exporter, explainer factory, example inputs, file name, options, words in the message)
CASES = {
    "not an explainer": ("to_onnx", lambda: image_explainer().model, PIXELS, "m.onnx", {},
                         ["argument 'explainer' must be a relfast.Explainer", "ViTForImageClassification"]),
    "example a list": ("to_torchscript", image_explainer, [1, 2], "m.pt", {},
                       ["argument 'example_inputs' must be a tensor or a dict of tensors", "list"]),
    "example numpy": ("to_onnx", image_explainer, PIXELS.numpy(), "m.onnx", {}, ["'example_inputs'", "ndarray"]),
    "example empty batch": ("to_onnx", image_explainer, PIXELS[:0], "m.onnx", {}, ["'example_inputs'", "non-empty batch"]),
    "example NaN": ("to_onnx", image_explainer, with_value(float("nan")), "m.onnx", {},
                    ["'example_inputs'", "NaN or infinite"]),
    "example huge": ("to_torchscript", image_explainer, with_value(1e30), "m.pt", {},
                     ["'example_inputs'", "magnitude 1e+30", "within ±1e+06"]),
    "example image size": ("to_onnx", image_explainer, torch.zeros(1, 3, 32, 32), "m.onnx", {},
                           ["'example_inputs'", "(B, 3, 64, 64)", "(1, 3, 32, 32)"]),
    "example token ids": ("to_onnx", text_explainer, {"input_ids": torch.full((1, 6), VOCAB),
                                                      "attention_mask": torch.ones(1, 6, dtype=torch.long)},
                          "m.onnx", {}, ["'example_inputs'", f"token id {VOCAB}, outside the model's vocabulary"]),
    "example all-padding text": ("to_torchscript", text_explainer,
                                 {"input_ids": torch.ones(2, 6, dtype=torch.long),
                                  "attention_mask": torch.tensor([[1] * 6, [0] * 6])}, "m.pt", {},
                                 ["'example_inputs'", "every sample needs at least one real token"]),
    "example token type": ("to_onnx", text_explainer, {**text_batch(1, 6, seed=0),
                                                       "token_type_ids": torch.full((1, 6), 2)}, "m.onnx", {},
                           ["'example_inputs'", "token_type_ids", "2 token types"]),
    "example batches differ": ("to_onnx", text_explainer, {"input_ids": torch.ones(2, 6, dtype=torch.long),
                                                           "attention_mask": torch.ones(3, 6, dtype=torch.long)},
                               "m.onnx", {}, ["'example_inputs'", "same non-empty batch"]),
    "one-token text": ("to_onnx", text_explainer, {"input_ids": torch.ones(1, 1, dtype=torch.long)}, "m.onnx", {},
                       ["text input 'input_ids'", "N >= 2"]),
    "encoder without head": ("to_onnx", lambda: relfast.Explainer(seeded(lambda: bert("BertModel"))()),
                             text_batch(1, 6, seed=0), "m.onnx", {}, ["no classification head", "callable target"]),
    "model in training mode": ("to_torchscript", lambda: relfast.Explainer(relfast.models.default_model().train()),
                               PIXELS, "m.pt", {}, ["training mode", "model.eval()"]),
    "dynamic_sequence on vision": ("to_onnx", image_explainer, PIXELS, "m.onnx", {"dynamic_sequence": True},
                                   ["'dynamic_sequence' applies to text models"]),
    "dynamic_batch a string": ("to_onnx", image_explainer, PIXELS, "m.onnx", {"dynamic_batch": "yes"},
                               ["argument 'dynamic_batch' must be True or False", "'yes'"]),
    "dynamic_sequence an int": ("to_torchscript", text_explainer, text_batch(1, 6, seed=0), "m.pt",
                                {"dynamic_sequence": 1}, ["argument 'dynamic_sequence'", "or None"]),
    "check a string": ("to_onnx", image_explainer, PIXELS, "m.onnx", {"check": "no"}, ["argument 'check'"]),
    "opset too old": ("to_onnx", image_explainer, PIXELS, "m.onnx", {"opset_version": 9},
                      ["argument 'opset_version' must be an int >= 18", "got 9"]),
    "opset a string": ("to_onnx", image_explainer, PIXELS, "m.onnx", {"opset_version": "18"}, ["'opset_version'"]),
    "onnx path a folder": ("to_onnx", image_explainer, PIXELS, "", {}, ["argument 'path' is a folder", "model.onnx"]),
    "onnx path suffix": ("to_onnx", image_explainer, PIXELS, "m.txt", {}, ["argument 'path' must end in .onnx",
                                                                          "'m.txt'"]),
    "script path .onnx": ("to_torchscript", image_explainer, PIXELS, "m.onnx", {},
                          ["argument 'path' must name a TorchScript file", "to_onnx writes"]),
    "script path no suffix": ("to_torchscript", image_explainer, PIXELS, "model", {}, ["argument 'path'", "model.pt"]),
    "lrp not exportable": ("to_onnx", lambda: relfast.Explainer(relfast.models.default_model(), "lrp"), PIXELS,
                           "m.onnx", {}, ["method 'lrp' is not exportable yet", "transformer_attribution"]),
    "path not a path": ("to_onnx", image_explainer, PIXELS, None, {}, ["argument 'path' must be a file path"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_export_argument_is_named_before_any_work(case, tmp_path):
    exporter, make_explainer, example, name, options, words = CASES[case]
    explainer = make_explainer()
    model = explainer if isinstance(explainer, torch.nn.Module) else explainer.model
    forwards = []
    hook = model.register_forward_pre_hook(lambda *args: forwards.append(1))  # the test's own counter
    path = 12 if name is None else tmp_path / name
    try:
        with pytest.raises(ValueError) as info:
            getattr(relfast.export, exporter)(explainer, example, path, **options)
    finally:
        hook.remove()
    message = str(info.value)
    assert message.startswith("relfast."), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert forwards == [], "the model ran before the argument was refused"
    assert list(tmp_path.iterdir()) == [], "a file was written"


def test_a_good_export_runs_the_model_and_writes_the_file(tmp_path, caplog):
    """The counterpart of the table: the same counter and folder see the work when there is no error;
    and the export logs no warning (onnx_ir's "Attribute type is ambiguous ... Defaulted to INTS" for
    relfast's one-hot rows is silenced for the export only)."""
    explainer = image_explainer()
    forwards = []
    hook = explainer.model.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        with caplog.at_level(logging.WARNING):
            path = relfast.export.to_onnx(explainer, PIXELS, tmp_path / "sub" / "m.onnx", check=False)
    finally:
        hook.remove()
    assert forwards and path.is_file() and path.parent.name == "sub"
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
    assert logging.getLogger("onnx_ir._convenience").filters == [], "the filter outlived the export"
