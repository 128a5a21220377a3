"""relfast.Explainer: every user mistake gets a ValueError naming the argument and what was
expected, raised before any work (the model's forward never runs), and no call returns a
non-finite map. Table-driven: (model, how to call it, words the message must hold)."""
import numpy as np
import pytest
import torch
import transformers

import relfast
from engine_models import build, inputs_for


def timm_headless():
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=0).double().eval()


def detached(scores):
    return scores.detach()[:, 0]


def constant(scores):
    return torch.ones(scores.shape[0], dtype=scores.dtype)


def pixels(**change):
    x = inputs_for("hf-vit")["pixel_values"].clone()
    for index, value in change.items():
        x[0, 0, 0, int(index[1:])] = value
    return {"pixel_values": x}


def mask_with(model_name, value):
    mask = inputs_for(model_name)["attention_mask"].clone()
    mask[0, -1] = value
    return mask


def all_padding_second(model_name):
    mask = inputs_for(model_name)["attention_mask"].clone()
    mask[1] = 0
    return mask


def text(model_name="hf-bert", **change):
    inputs = {k: v.clone() for k, v in inputs_for(model_name).items()}
    inputs.update(change)
    return inputs


# name: (model name, Explainer options, inputs builder, call options, words)
CASES = {
    "nan pixels, raw_attention": ("hf-vit", {"method": "raw_attention"}, lambda: pixels(p3=float("nan")), {},
                                  ["'inputs'", "NaN or infinite"]),
    "inf pixels, attn_gradcam": ("hf-vit", {"method": "attn_gradcam"}, lambda: pixels(p0=float("inf")), {},
                                 ["'inputs'", "NaN or infinite"]),
    "numpy pixels": ("hf-vit", {}, lambda: {"pixel_values": inputs_for("hf-vit")["pixel_values"].numpy()}, {},
                     ["'inputs'", "torch.Tensor", "torch.from_numpy"]),
    "numpy image tensor for timm": ("timm-vit", {}, lambda: inputs_for("timm-vit").numpy(), {},
                                    ["'inputs'", "torch.Tensor"]),
    "uint8 pixels": ("hf-vit", {}, lambda: {"pixel_values": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)}, {},
                     ["'inputs'", "floating-point"]),
    "misspelled image key": ("hf-vit", {}, lambda: {**inputs_for("hf-vit"), "pixel_mask": torch.ones(3)}, {},
                             ["'inputs'", "pixel_mask"]),
    "misspelled text key": ("hf-bert", {}, lambda: {"input_ids": text()["input_ids"],
                                                    "attn_mask": text()["attention_mask"]}, {},
                            ["'inputs'", "attn_mask", "attention_mask"]),
    "numpy token ids": ("hf-bert", {}, lambda: {k: v.numpy() for k, v in text().items()}, {},
                        ["'inputs'", "torch.from_numpy"]),
    "token id above the vocabulary": ("hf-bert", {}, lambda: text(input_ids=torch.full((3, 9), 60)), {},
                                      ["'inputs'", "token id 60", "vocabulary [0, 60)"]),
    "negative token id": ("gpt2", {}, lambda: text("gpt2", input_ids=torch.full((3, 9), -1)), {},
                          ["'inputs'", "token id -1"]),
    "longer than BERT's positions": ("hf-bert", {}, lambda: {"input_ids": torch.ones(2, 41, dtype=torch.long)}, {},
                                     ["'inputs'", "41 tokens", "40 positions"]),
    "longer than GPT-2's positions": ("gpt2", {}, lambda: {"input_ids": torch.ones(2, 65, dtype=torch.long)}, {},
                                      ["'inputs'", "65 tokens", "64 positions"]),
    "empty sequences": ("gpt2", {}, lambda: {"input_ids": torch.ones(2, 0, dtype=torch.long)}, {},
                        ["'inputs'", "empty sequences"]),
    "attention_mask of another shape": ("hf-bert", {}, lambda: text(attention_mask=torch.ones(3, 5, dtype=torch.long)),
                                        {}, ["attention_mask", "shape of input_ids"]),
    "all-padding sample": ("gpt2", {}, lambda: text("gpt2", attention_mask=torch.zeros(3, 9, dtype=torch.long)), {},
                           ["'inputs'", "attention_mask is all zeros"]),
    "timm target out of range": ("timm-vit", {}, lambda: inputs_for("timm-vit"), {"target": 10},
                                 ["'target'", "class 10", "5 classes"]),
    "LM target outside the vocabulary": ("gpt2", {}, lambda: inputs_for("gpt2"), {"target": 60},
                                         ["'target'", "class 60", "60 classes"]),
    "(B, 0) target": ("hf-vit", {}, lambda: inputs_for("hf-vit"), {"target": torch.zeros(3, 0, dtype=torch.long)},
                      ["'target'", "no classes"]),
    "float numpy target": ("hf-vit", {}, lambda: inputs_for("hf-vit"), {"target": np.array([0.5, 1.0, 2.0])},
                           ["'target'", "integer"]),
    "detached callable target": ("hf-vit", {}, lambda: inputs_for("hf-vit"), {"target": detached},
                                 ["callable 'target'", "do not depend"]),
    "constant callable target": ("hf-vit", {}, lambda: inputs_for("hf-vit"), {"target": constant},
                                 ["callable 'target'", "do not depend"]),
    # issue 19
    "attention_mask value 2 (shifts an LM's positions)": ("gpt2", {}, lambda: text("gpt2", attention_mask=mask_with(
        "gpt2", 2)), {}, ["'inputs'", "(attention_mask) must hold only 0 (padding) and 1 (real), got 2"]),
    "attention_mask value -1": ("hf-bert", {}, lambda: text(attention_mask=mask_with("hf-bert", -1)), {},
                                ["'inputs'", "attention_mask", "got -1"]),
    "all-padding BERT sample": ("hf-bert", {}, lambda: text(attention_mask=all_padding_second("hf-bert")), {},
                                ["'inputs'", "attention_mask is all zeros"]),
    "position_ids beyond GPT-2's positions": ("gpt2", {}, lambda: text("gpt2", position_ids=torch.full((3, 9), 64)),
                                              {}, ["'inputs'", "(position_ids) holds 64", "64 positions"]),
    "BERT token_type_ids 2": ("hf-bert", {}, lambda: text(token_type_ids=torch.full((3, 9), 2)), {},
                              ["'inputs'", "(token_type_ids) holds 2", "2 token types"]),
    "a key/value cache": ("gpt2", {}, lambda: text("gpt2", past_key_values=transformers.DynamicCache()), {},
                          ["'inputs'", "'past_key_values'", "without a key/value cache"]),
    "float32 pixels for a float64 HF ViT": ("hf-vit", {}, lambda: {"pixel_values": pixels()["pixel_values"].float()},
                                            {}, ["'inputs'", "torch.float32", "computes in torch.float64"]),
    "float32 image for a float64 timm ViT": ("timm-vit", {}, lambda: inputs_for("timm-vit").float(), {},
                                             ["'inputs'", "torch.float32", "cast the inputs"]),
    "float32 image for a float64 torchvision ViT": ("torchvision-vit", {}, lambda: inputs_for("torchvision-vit").float(),
                                                    {}, ["'inputs'", "torch.float32"]),
    "image on the meta device": ("timm-vit", {}, lambda: inputs_for("timm-vit").to("meta"), {},
                                 ["'inputs'", "is on meta but the model is on cpu"]),
    "headless timm without a callable target": ("timm-headless", {}, lambda: torch.randn(2, 3, 32, 32,
                                                                                        dtype=torch.float64), {},
                                                ["callable 'target'"]),
}
# The forward runs for these (the mistake shows in the model's output); everything else is
# refused before it.
AFTER_FORWARD = {"detached callable target", "constant callable target"}


def model_for(name):
    return timm_headless() if name == "timm-headless" else build(name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_mistakes_are_refused_before_any_work(case):
    name, options, make_inputs, call_options, words = CASES[case]
    model = model_for(name)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    explainer = relfast.Explainer(model, **options)
    with pytest.raises(ValueError) as error:
        explainer(make_inputs(), **call_options)
    for word in words:
        assert word in str(error.value), (word, str(error.value))
    assert str(error.value).startswith("relfast.Explainer"), str(error.value)
    assert forwards == ([1] if case in AFTER_FORWARD else []), "no work before the check"


CONSTRUCTION = {
    "start_layer out of range": (lambda: relfast.Explainer(build("hf-vit"), "rollout", start_layer=3),
                                 ["'start_layer'", "3", "3 attention layers"]),
    "negative start_layer out of range": (lambda: relfast.Explainer(build("gpt2"), "rollout", start_layer=-4),
                                          ["'start_layer'", "-4"]),
    "start_layer of the wrong type": (lambda: relfast.Explainer(build("hf-vit"), "rollout", start_layer=1.5),
                                      ["'start_layer'", "must be an int"]),
    "layout of the wrong type": (lambda: relfast.Explainer(build("hand-written"), layout={"prefix_tokens": 1}),
                                 ["'layout'", "TokenLayout"]),
    "model that is not a module": (lambda: relfast.Explainer(lambda x: x), ["'model'", "torch.nn.Module"]),
    # issue 19: a string is not a flag ("False" would read as True)
    "aggregate='False'": (lambda: relfast.Explainer(build("hf-vit"), aggregate="False"),
                          ["'aggregate'", "True or False", "'False'"]),
    "full_matrix='no'": (lambda: relfast.Explainer(build("hf-vit"), full_matrix="no"), ["'full_matrix'", "'no'"]),
    "normalize='no'": (lambda: relfast.Explainer(build("hf-vit"), normalize="no"), ["'normalize'", "'no'"]),
    "use_lrp=1": (lambda: relfast.Explainer(build("hf-vit"), use_lrp=1), ["'use_lrp'", "True or False"]),
    "method as a list": (lambda: relfast.Explainer(build("hf-vit"), ["generic"]), ["'method'", "str"]),
    "rules not a rule set": (lambda: relfast.Explainer(build("hf-vit"), "lrp", rules="papers"),
                             ["'rules'", "'paper', 'textbook'", "'papers'"]),
    "rules on a method without it": (lambda: relfast.Explainer(build("hf-vit"), "rollout", rules="paper"),
                                     ["'rules'", "'partial_lrp' or 'lrp'", "'rollout'"]),
}


@pytest.mark.parametrize("case", sorted(CONSTRUCTION))
def test_bad_explainer_options_are_refused_at_construction(case):
    make, words = CONSTRUCTION[case]
    with pytest.raises(ValueError) as error:
        make()
    for word in words:
        assert word in str(error.value), (word, str(error.value))


@pytest.mark.parametrize("name,method", [(name, method) for name in ("hf-vit", "timm-vit", "gpt2", "hf-bert")
                                         for method in ("generic", "rollout", "transformer_attribution")
                                         if not (name == "gpt2" and method == "transformer_attribution")])
def test_inputs_made_under_inference_mode_are_explained_as_others(name, method):
    model = build(name)
    inputs = inputs_for(name)
    with torch.inference_mode():
        frozen = {k: v.clone() for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.clone()
    explainer = relfast.Explainer(model, method)
    torch.testing.assert_close(explainer(frozen).relevance, explainer(inputs).relevance)


def test_numpy_bool_flags_are_accepted():
    model = build("hf-vit")
    inputs = inputs_for("hf-vit")
    torch.testing.assert_close(relfast.Explainer(model, aggregate=np.bool_(False))(inputs).relevance,
                               relfast.Explainer(model, aggregate=False)(inputs).relevance)


def test_numpy_integer_targets_are_accepted():
    model = build("hf-vit")
    inputs = inputs_for("hf-vit")
    explainer = relfast.Explainer(model)
    torch.testing.assert_close(explainer(inputs, target=np.int64(2)).relevance, explainer(inputs, target=2).relevance)
    per_sample = np.array([0, 4, 1])
    torch.testing.assert_close(explainer(inputs, target=per_sample).relevance,
                               explainer(inputs, target=torch.tensor([0, 4, 1])).relevance)


def test_image_map_of_a_full_matrix_is_an_error():
    out = relfast.Explainer(build("hf-vit"), full_matrix=True)(inputs_for("hf-vit"))
    with pytest.raises(ValueError, match="full_matrix"):
        out.image_map()


def test_non_square_hf_vit_images():
    config = transformers.ViTConfig(image_size=[32, 48], patch_size=8, num_channels=3, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).double().eval()
    out = relfast.Explainer(model)(torch.randn(2, 3, 32, 48, dtype=torch.float64))
    assert out.relevance.shape == (2, 1 + 4 * 6)
    assert out.image_map().shape == (2, 4, 6) and out.image_map(upsample=True).shape == (2, 32, 48)


@pytest.mark.parametrize("scale,words", [(1e20, "the relevance overflowed"), (1e39, "the model's output holds NaN")])
def test_a_result_that_overflows_is_an_error_not_a_map(scale, words):
    """Finite inputs, classifier weights that overflow float32 in the gradients (1e20) or in the
    output itself (1e39): an error instead of inf relevance and NaN pixel maps."""
    model = build("hf-vit").float()
    with torch.no_grad():
        model.classifier.weight.mul_(scale)
    inputs = {"pixel_values": inputs_for("hf-vit")["pixel_values"].float()}
    with pytest.raises(ValueError, match=words):
        relfast.Explainer(model)(inputs)
