"""HF LLaVA (``LlavaForConditionalGeneration``): the LM's row over its token stream and the image
map it continues into the vision tower, for one position and for every generated token.

- Row t of ``generate`` (text and image) is the single-position explanation of generated token t
  on the sequence cut after the token before it (float32, prompts of different lengths padded on
  the left, T = 8 generated tokens).
- Single-position maps equal a float64 reference written apart from the engine
  (``llava_reference``: eager attention, retained gradients of the attention maps, explicit
  matrices), for both feature select strategies, several feature layers, image sizes and tower
  depths, SDPA and eager attention.
- A padded batch explains each sample as it is alone; the model is left as it was, also after a
  failure; bad inputs and layouts are refused, before any work, with messages that name them.
Tiny random models (CLIP tower of 2-3 layers, Llama of 2 layers).
"""
import pytest
import torch
import transformers

import relfast
from llava_reference import IMAGE_TOKEN, build, eager_twin, features, prompts, reference_maps
from test_model_untouched import model_state, user_setup

NEW_TOKENS = 8
# every sample generates NEW_TOKENS; the image token is never generated (a generated one would be
# taken for an image placeholder by the explained forward)
GENERATE = dict(eos_token_id=None, pad_token_id=0, suppress_tokens=[IMAGE_TOKEN])


def relative_error(actual, expected):
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def grid_side(model):
    vision = model.config.vision_config
    return vision.image_size // vision.patch_size


# ---- (a) every generated token is its single-position explanation ----

@pytest.mark.parametrize("config,chunk_size", [(dict(), 3), (dict(strategy="full", feature_layer=-1, vision_layers=2,
                                                                    image=24), None)])
def test_each_generated_row_is_the_single_position_explanation(config, chunk_size):
    model = build(**config, dtype=torch.float32)
    inputs = prompts(model)
    explainer = relfast.Explainer(model)
    out = explainer.generate(inputs, max_new_tokens=NEW_TOKENS, chunk_size=chunk_size, **GENERATE)
    p, side = inputs["input_ids"].shape[1], grid_side(model)
    assert out.prompt_length == p and out.token_mask.all()
    assert out.relevance.shape == (3, NEW_TOKENS, p + NEW_TOKENS) and out.relevance.dtype == torch.float32
    assert out.image.shape == (3, NEW_TOKENS, side, side) and out.image.dtype == torch.float32
    assert torch.equal(out.sequences[:, :p], inputs["input_ids"])
    worst_text = worst_image = 0.0
    for t in range(NEW_TOKENS):
        cut = {"input_ids": out.sequences[:, :p + t], "attention_mask": out.attention_mask[:, :p + t],
               "pixel_values": inputs["pixel_values"]}
        single = explainer(cut, target=out.tokens[:, t])
        assert single.relevance.shape == (3, p + t) and single.maps["image"].shape == (3, side, side)
        predicted = single.logits.clone()
        predicted[:, IMAGE_TOKEN] = -torch.inf  # suppressed in generation
        assert torch.equal(predicted.argmax(dim=-1), out.tokens[:, t]), "greedy: the argmax at the position before"
        torch.testing.assert_close(out.logits[:, t], single.logits.gather(1, out.tokens[:, t:t + 1])[:, 0])
        assert (out.relevance[:, t, p + t:] == 0).all(), "later tokens get nothing"
        worst_text = max(worst_text, relative_error(out.relevance[:, t, :p + t], single.relevance))
        worst_image = max(worst_image, relative_error(out.image[:, t], single.maps["image"]))
    assert worst_text <= 1e-5 and worst_image <= 1e-5, (worst_text, worst_image)
    padding = inputs["attention_mask"] == 0
    assert (out.relevance[:, :, :p][padding[:, None, :].expand(-1, NEW_TOKENS, -1)] == 0).all()
    placeholders = inputs["input_ids"] == IMAGE_TOKEN
    assert (out.relevance[:, :, :p][placeholders[:, None, :].expand(-1, NEW_TOKENS, -1)] != 0).any(), \
        "the image placeholders hold the LM's relevance of the image tokens"
    assert (out.image.flatten(2).std(dim=-1) > 0).all(), "every row has a non-constant image map"


# ---- (b) single position against the float64 reference ----

# name -> (model config, engine dtype, attention implementation, target per sample or None)
REFERENCE_CASES = {
    "default, layer -2, 3 vision layers": (dict(), torch.float64, "sdpa", None),
    "full, layer -1, 24px": (dict(strategy="full", feature_layer=-1, vision_layers=2, image=24), torch.float64, "sdpa",
                             [5, 17, 42]),
    "default, layer -3 of 2 (the embeddings: no vision layer used)": (dict(feature_layer=-3, vision_layers=2),
                                                                      torch.float64, "sdpa", None),
    "full, layer -3 of 3, patch 4": (dict(strategy="full", feature_layer=-3, image=16, patch=4), torch.float32, "sdpa",
                                     [7, 7, 30]),
    "default, eager attention": (dict(feature_layer=-1, vision_layers=2), torch.float32, "eager", None),
    "default, Qwen2 language model": (dict(language="Qwen2", vision_layers=2), torch.float64, "sdpa", None),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_single_position_maps_match_the_float64_reference(case):
    config, dtype, attention, target = REFERENCE_CASES[case]
    model = build(**config, dtype=dtype)
    if attention == "eager":
        model.set_attn_implementation("eager")
    inputs = prompts(model)
    out = relfast.Explainer(model)(inputs, target=None if target is None else torch.tensor(target))
    side = grid_side(model)
    assert out.relevance.shape == inputs["input_ids"].shape and out.relevance.dtype == torch.float32
    assert out.maps["image"].shape == (3, side, side) and out.image_map().shape == (3, side, side)
    pixels = model.config.vision_config.image_size
    assert out.image_map(upsample=True).shape == (3, pixels, pixels)
    assert torch.equal(out.relevance, out.maps["text"])
    twin = eager_twin(model)
    tolerance = 1e-5 if dtype == torch.float64 else 1e-4  # HF's eager softmax runs in float32
    for b in range(3):
        real = inputs["attention_mask"][b].bool()
        text, image, logits, explained = reference_maps(twin, inputs["input_ids"][b, real], inputs["pixel_values"][b],
                                                        None if target is None else target[b])
        assert int(out.target[b]) == explained
        assert relative_error(out.logits[b], logits) <= tolerance
        assert relative_error(out.relevance[b, real], text) <= tolerance, b
        assert (out.relevance[b, ~real] == 0).all()
        assert relative_error(out.maps["image"][b], image) <= tolerance, b
        assert image.std() > 0.05 * image.abs().max(), "the reference map is not flat: the comparison can fail"


def test_the_vision_tower_contributes_its_own_relevance():
    """Feature layer -3 of a 2-layer tower reads its embeddings: the map is then the LM's row on
    the placeholders alone. Later layers mix patches: the maps then differ from that. (Layer 0
    would be the same hidden state, but transformers' LLaVA reads no hidden states for a 0.)"""
    model = build(feature_layer=-1, vision_layers=2)
    inputs = prompts(model)
    out = relfast.Explainer(model)(inputs)
    r_img = out.relevance[inputs["input_ids"] == IMAGE_TOKEN].view(3, -1)  # default strategy: the patches
    side = grid_side(model)
    assert relative_error(out.maps["image"], r_img.view(3, side, side)) > 1e-3
    direct = build(feature_layer=-3, vision_layers=2)
    out0 = relfast.Explainer(direct)(inputs)
    r0 = out0.relevance[inputs["input_ids"] == IMAGE_TOKEN].view(3, side, side)
    assert relative_error(out0.maps["image"], r0) <= 1e-6


# ---- (c) a padded batch explains each sample as it is alone; K targets per sample ----

def test_batched_equals_per_sample_and_k_targets():
    model = build(strategy="full")
    inputs = prompts(model, shapes=((3, 4), (1, 2), (0, 1), (5, 0)))
    explainer = relfast.Explainer(model)
    batched = explainer(inputs)
    for b in range(4):
        real = inputs["attention_mask"][b].bool()
        alone = explainer({"input_ids": inputs["input_ids"][b:b + 1, real],
                           "pixel_values": inputs["pixel_values"][b:b + 1]})
        assert int(alone.target[0]) == int(batched.target[b])
        assert relative_error(batched.relevance[b, real], alone.relevance[0]) <= 1e-10
        assert relative_error(batched.maps["image"][b], alone.maps["image"][0]) <= 1e-10
    targets = torch.tensor([[3, 9], [9, 40], [1, 2], [59, 3]])
    several = explainer(inputs, target=targets)
    assert several.relevance.shape == (4, 2, inputs["input_ids"].shape[1])
    assert several.maps["image"].shape == (4, 2, grid_side(model), grid_side(model))
    assert several.image_map().shape == several.maps["image"].shape
    for k in range(2):
        one = explainer(inputs, target=targets[:, k])
        torch.testing.assert_close(several.relevance[:, k], one.relevance, rtol=1e-10, atol=0)
        torch.testing.assert_close(several.maps["image"][:, k], one.maps["image"], rtol=1e-10, atol=0)


# ---- (d) the model is untouched ----

def llava_state(model):
    config = model.config
    return dict(model_state(model), vision_attention=config.vision_config._attn_implementation,
                text_attention=config.text_config._attn_implementation,
                parameters={k: v.clone() for k, v in model.state_dict().items()})


def same_state(a, b):
    a, b = dict(a), dict(b)
    pa, pb = a.pop("parameters"), b.pop("parameters")
    return a == b and pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_model_is_untouched_after_calls_and_after_a_failure(attention):
    model = build(dtype=torch.float32)
    if attention == "eager":
        model.set_attn_implementation("eager")
    inputs = prompts(model)
    with torch.no_grad():  # transformers installs its own hidden-state hooks on the tower at the first forward
        model(**inputs)
    user_setup(model)
    before = llava_state(model)
    explainer = relfast.Explainer(model)
    explainer(inputs)
    out = explainer.generate(inputs, max_new_tokens=3, **GENERATE)
    assert same_state(llava_state(model), before)

    def fail_in_the_explained_forward(module, args, output):
        if torch.is_grad_enabled():
            raise RuntimeError("failing in the explained forward")

    handle = model.model.language_model.layers[-1].register_forward_hook(fail_in_the_explained_forward)
    with_hook = llava_state(model)
    with pytest.raises(RuntimeError, match="failing in the explained forward"):
        explainer(inputs)
    with pytest.raises(RuntimeError, match="failing in the explained forward"):
        explainer.generate(inputs, max_new_tokens=3, **GENERATE)
    assert same_state(llava_state(model), with_hook)
    handle.remove()
    assert same_state(llava_state(model), before)
    again = explainer.generate(inputs, max_new_tokens=3, **GENERATE)
    assert torch.equal(again.image, out.image)


# ---- (e) bad inputs, arguments and layouts ----

def _edit(inputs, **changes):
    edited = {k: v.clone() for k, v in inputs.items()}
    for key, value in changes.items():
        if value is None:
            edited.pop(key)
        else:
            edited[key] = value(edited[key]) if callable(value) else value
    return edited


def _drop_placeholder(ids):
    row = ids[1]
    row[(row == IMAGE_TOKEN).nonzero()[0]] = 5
    return ids


def _mask_placeholder(mask):
    mask[0, (mask[0] == 1).nonzero()[4]] = 0  # sample 0's fifth real token: an image placeholder
    return mask


# case -> (inputs made from the good ones, target, words of the message)
BAD_INPUTS = {
    "not a dict": (lambda x: x["input_ids"], None, "takes a dict with 'input_ids'"),
    "no pixel_values": (lambda x: _edit(x, pixel_values=None), None, "must contain 'pixel_values'"),
    "image of another size": (lambda x: _edit(x, pixel_values=torch.zeros(3, 3, 28, 28)), None,
                              r"\(pixel_values\) must have shape \(B, 3, 32, 32\)"),
    "pixel_values as integers": (lambda x: _edit(x, pixel_values=lambda p: p.long()), None, "floating-point"),
    "pixel_values with NaN": (lambda x: _edit(x, pixel_values=lambda p: p.index_fill(0, torch.tensor([1]), torch.nan)),
                              None, "NaN or infinite"),
    "pixel_values in float64": (lambda x: _edit(x, pixel_values=lambda p: p.double()), None,
                                "is torch.float64 but the model computes in torch.float32"),
    "two images per prompt": (lambda x: _edit(x, pixel_values=lambda p: p.repeat(2, 1, 1, 1)), None,
                              "holds 6 images \\(pixel_values\\) for 3 prompts"),
    "a placeholder missing": (lambda x: _edit(x, input_ids=_drop_placeholder), None,
                              "holds 15 image placeholder tokens \\(id 63\\) in sample 1; expected 16"),
    "placeholders masked out": (lambda x: _edit(x, attention_mask=_mask_placeholder), None,
                                "masks out image placeholder tokens"),
    "image_sizes": (lambda x: _edit(x, image_sizes=torch.tensor([[32, 32]] * 3)), None,
                    "has key\\(s\\) \\['image_sizes'\\]"),
    "position_ids": (lambda x: _edit(x, position_ids=torch.zeros_like(x["input_ids"])), None, "'position_ids'"),
    "token id outside the vocabulary": (lambda x: _edit(x, input_ids=lambda i: i.index_fill(1, torch.tensor([0]), 64)),
                                        None, "token id 64, outside the model's vocabulary"),
    "target outside the vocabulary": (lambda x: x, 64, "'target' holds class 64, out of range"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_are_refused_before_any_work(case):
    make, target, words = BAD_INPUTS[case]
    model = build(dtype=torch.float32)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    inputs = make(prompts(model))
    with pytest.raises(ValueError, match=words):
        relfast.Explainer(model)(inputs, target=target)
    if target is None:
        with pytest.raises(ValueError, match=words):
            relfast.Explainer(model).generate(inputs, max_new_tokens=2, **GENERATE)
    assert calls == [], "refused before the model ran"


def test_bad_generate_arguments():
    model = build(dtype=torch.float32)
    inputs = prompts(model)
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    explainer = relfast.Explainer(model)
    with pytest.raises(ValueError, match="argument 'pixel_values' belongs in 'inputs'"):
        explainer.generate(inputs, max_new_tokens=2, pixel_values=inputs["pixel_values"], **GENERATE)
    padding = (inputs["attention_mask"] == 0).sum(dim=1)
    right = {"pixel_values": inputs["pixel_values"],  # each sample's padding moved to its end
             **{key: torch.stack([row.roll(-int(pad)) for row, pad in zip(inputs[key], padding)])
                for key in ("input_ids", "attention_mask")}}
    with pytest.raises(ValueError, match="padded on the right"):
        explainer.generate(right, max_new_tokens=2, **GENERATE)
    assert calls == []
    handle.remove()

    class ImageTokenAlways(transformers.LogitsProcessor):  # a model that generates the image token
        def __call__(self, input_ids, scores):
            scores[:, IMAGE_TOKEN] = scores.max() + 100
            return scores

    with pytest.raises(ValueError, match="generated sequences cannot be explained: argument 'inputs' \\(input_ids\\) "
                                         "holds 18 image placeholder tokens "
                                         ".* suppress_tokens=\\[63\\]"):
        explainer.generate(inputs, max_new_tokens=2, eos_token_id=None, pad_token_id=0,
                           logits_processor=transformers.LogitsProcessorList([ImageTokenAlways()]))


# case -> (explainer arguments, words of the message)
BAD_EXPLAINERS = {
    "rollout": (dict(method="rollout"), "explained by method 'generic' only .* got method 'rollout'"),
    "attnlrp": (dict(method="attnlrp"), "got method 'attnlrp'"),
    "transformer_attribution": (dict(method="transformer_attribution"), "got method 'transformer_attribution'"),
    "start_layer": (dict(start_layer=1), "argument start_layer=1 does not apply"),
    "aggregate": (dict(aggregate=False), "argument aggregate=False does not apply"),
    "full_matrix": (dict(full_matrix=True), "argument full_matrix=True does not apply"),
    "use_lrp": (dict(use_lrp=True), "argument use_lrp=True does not apply"),
    "normalize": (dict(normalize=False), "ablation of the co-attention rules"),
}


@pytest.mark.parametrize("case", sorted(BAD_EXPLAINERS))
def test_methods_and_options_it_has_no_rules_for_are_refused(case):
    arguments, words = BAD_EXPLAINERS[case]
    with pytest.raises(ValueError, match=words):
        relfast.Explainer(build(vision_layers=1, dtype=torch.float32), **arguments)


def test_layouts_it_cannot_explain_are_refused():
    several = build(vision_layers=2, dtype=torch.float32)
    several.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match="reads its image features from vision layers \\[-2, -1\\]; relfast explains "
                                         "one feature layer"):
        relfast.Explainer(several)
    far = build(vision_layers=2, dtype=torch.float32)
    far.config.vision_feature_layer = -4
    with pytest.raises(ValueError, match="vision_feature_layer -4 is out of range for a vision tower of 2 layers"):
        relfast.Explainer(far)
    flash = build(vision_layers=1, dtype=torch.float32)
    flash.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="language model runs attention with 'flash_attention_2'"):
        relfast.Explainer(flash)(prompts(flash))
