"""[P2] bi-modal and encoder-decoder explanations (CLIP, VisualBERT, LXMERT, DETR): the maps equal
the float64 one-sample-at-a-time references of ``bimodal_reference.py`` (written apart from the
engine, on eager copies of the models) for the full method and each ablation of [P2]'s Table 1,
at batch 3 with padding; batched equals per sample; bad input is refused before any work; the
model is left as it was."""
import os
import threading

import pytest
import torch
import transformers

import bimodal_models as models
import bimodal_reference as reference
import relfast
from test_model_untouched import model_state, user_setup

ABLATIONS = [{}, {"normalize": False}, {"aggregate": False}, {"cross_self_attention": False}]
TOLERANCE = 1e-4  # relative to the map's largest entry; float32 maps of float64 math reach ~1e-7


def assert_maps_close(actual, expected, what):
    actual = actual.double()
    scale = expected.abs().max().clamp_min(1e-30)
    error = float((actual - expected).abs().max() / scale)
    if os.environ.get("RELFAST_MAP_ERRORS"):  # scripts/bimodal_max_error.py collects the errors seen
        with open(os.environ["RELFAST_MAP_ERRORS"], "a") as log:
            log.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{what}\t{error:.3e}\n")
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert error <= TOLERANCE, f"{what}: relative error {error:.2e}"
    assert float(expected.abs().max()) > 0, f"{what}: the reference map is all zero (a test that cannot fail)"


def eager(model):
    model.set_attn_implementation("eager")
    return model


def subset(inputs, index):
    return {key: value[index:index + 1] for key, value in inputs.items()}


# ---- CLIP ----

@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("start_layer", [None, 0])
@pytest.mark.parametrize("aggregate", [True, False])
def test_clip_pairs_equal_the_reference(attention, start_layer, aggregate):
    model = models.clip() if attention == "sdpa" else eager(models.clip())
    inputs = models.clip_inputs(3, 3, seed=1)
    explainer = relfast.Explainer(model, start_layer=start_layer, aggregate=aggregate)
    for target in (None, torch.tensor([2, 0, 2]), "all"):
        out = explainer(inputs, target=target)
        image, text = reference.clip_reference(model, inputs, out.pairs.tolist(),
                                               start_layer=-1 if start_layer is None else start_layer,
                                               aggregate=aggregate)
        assert_maps_close(out.maps["image"], image, f"image map, target {target}")
        assert_maps_close(out.maps["text"], text, f"text map, target {target}")
    assert out.pairs.tolist() == [[i, t] for i in range(3) for t in range(3)]
    assert out.image_map().shape == (9, 4, 4)
    similarity = model(**inputs).logits_per_image
    torch.testing.assert_close(out.logits[:, 0].double(), similarity.reshape(-1).detach())
    assert out.output is None


def test_clip_text_map_sums_to_one_on_the_words_between_start_and_end():
    inputs = models.clip_inputs(3, 3, seed=2)
    out = relfast.Explainer(models.clip())(inputs)
    for p in range(3):
        eot = reference.clip_pool_position(inputs["input_ids"][p], models.CLIP_EOT)
        row = out.maps["text"][p]
        assert eot >= 3
        torch.testing.assert_close(row[1:eot].sum(), torch.tensor(1.0))
        assert row[0] == 0 and (row[eot:] == 0).all() and (row[1:eot] > 0).any()


def test_clip_batch_equals_per_pair():
    model, inputs = models.clip(), models.clip_inputs(3, 2, seed=3)
    explainer = relfast.Explainer(model)
    out = explainer(inputs, target=[1, 0, 1])
    for i, t in out.pairs.tolist():
        alone = explainer({"pixel_values": inputs["pixel_values"][i:i + 1], "input_ids": inputs["input_ids"][t:t + 1],
                           "attention_mask": inputs["attention_mask"][t:t + 1]})
        torch.testing.assert_close(out.maps["image"][i], alone.maps["image"][0], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(out.maps["text"][i], alone.maps["text"][0], rtol=1e-5, atol=1e-9)


def test_clip_baselines_run_on_each_tower():
    inputs = models.clip_inputs(2, 2, seed=4)
    for method in ("rollout", "raw_attention", "attn_gradcam"):
        out = relfast.Explainer(models.clip(), method)(inputs)
        assert out.maps["image"].shape == (2, 17) and out.maps["text"].shape == (2, 9)
        assert torch.isfinite(out.maps["image"]).all()


# ---- VisualBERT ----

@pytest.mark.parametrize("aggregate", [True, False])
@pytest.mark.parametrize("target", [None, [4, 1]])
def test_visual_bert_equals_the_reference(aggregate, target):
    model, inputs = models.visual_bert(), models.visual_bert_inputs(3, seed=5)
    out = relfast.Explainer(model, aggregate=aggregate)(inputs, target=target)
    per_target = [None] if target is None else [[t] * 3 for t in target]
    for k, classes in enumerate(per_target):
        text, image = reference.visual_bert_reference(model, inputs, classes, aggregate=aggregate)
        got_text = out.maps["text"] if target is None else out.maps["text"][:, k]
        got_image = out.maps["image"] if target is None else out.maps["image"][:, k]
        assert_maps_close(got_text, text, "text map")
        assert_maps_close(got_image, image, "region map")
    rows = inputs["attention_mask"].sum(1) - 2
    assert (out.maps["text"][..., 0, :] if target else out.maps["text"])[torch.arange(3), rows].eq(0).all()


def test_visual_bert_batch_equals_per_sample():
    model, inputs = models.visual_bert(), models.visual_bert_inputs(3, seed=6)
    explainer = relfast.Explainer(model)
    out = explainer(inputs)
    for b in range(3):
        length = int(inputs["attention_mask"][b].sum())
        alone = explainer({k: (v[b:b + 1, :length] if k in ("input_ids", "attention_mask", "token_type_ids")
                               else v[b:b + 1]) for k, v in inputs.items()})
        torch.testing.assert_close(out.maps["text"][b, :length], alone.maps["text"][0], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(out.maps["image"][b], alone.maps["image"][0], rtol=1e-5, atol=1e-9)


# ---- LXMERT ----

@pytest.mark.parametrize("options", ABLATIONS, ids=lambda o: ",".join(o) or "full")
def test_lxmert_equals_the_reference(options):
    model, inputs = models.lxmert(), models.lxmert_inputs(3, seed=7)
    out = relfast.Explainer(model, **options)(inputs)
    text, image = reference.lxmert_reference(model, inputs, **options)
    assert_maps_close(out.maps["text"], text, "text map")
    assert_maps_close(out.maps["image"], image, "region map")
    assert (out.maps["text"][:, 0] == 0).all()


def test_lxmert_targets_and_batch():
    model, inputs = models.lxmert(), models.lxmert_inputs(3, seed=8)
    explainer = relfast.Explainer(model)
    out = explainer(inputs, target=torch.tensor([[0, 3], [1, 1], [4, 2]]))
    for k in range(2):
        classes = out.target[:, k]
        single = explainer(inputs, target=classes)
        torch.testing.assert_close(out.maps["image"][:, k], single.maps["image"], rtol=1e-5, atol=1e-10)
        text, image = reference.lxmert_reference(model, inputs, classes.tolist())
        assert_maps_close(out.maps["image"][:, k], image, f"region map, target {k}")
        assert_maps_close(out.maps["text"][:, k], text, f"text map, target {k}")
    for b in range(3):
        torch.testing.assert_close(explainer(subset(inputs, b)).maps["image"][0], explainer(inputs).maps["image"][b],
                                   rtol=1e-5, atol=1e-10)


# ---- DETR ----

@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("options", ABLATIONS, ids=lambda o: ",".join(o) or "full")
def test_detr_query_maps_equal_the_reference(attention, options):
    model = models.detr() if attention == "sdpa" else eager(models.detr())
    inputs = models.detr_inputs(3, seed=9)
    queries = [[0, 3], [1, 2], [5, 4]]
    out = relfast.Explainer(model, **options)(inputs, target=queries)
    image, query_maps = reference.detr_reference(model, inputs, queries, **options)
    assert_maps_close(out.maps["image"], image, "image map")
    assert_maps_close(out.maps["queries"], query_maps, "query map")
    assert out.image_map().shape == (3, 2, *models.DETR_GRID)
    assert out.layouts["image"].patch_grid == models.DETR_GRID


def test_detr_default_query_and_batch():
    model, inputs = models.detr(), models.detr_inputs(3, seed=10)
    explainer = relfast.Explainer(model)
    out = explainer(inputs)
    logits = model(**inputs).logits
    best = logits[..., :-1].amax(-1).argmax(-1)
    assert out.target.tolist() == best.tolist()
    torch.testing.assert_close(out.output.logits, logits.detach())
    image, _ = reference.detr_reference(model, inputs, best[:, None].tolist())
    assert_maps_close(out.maps["image"], image[:, 0], "image map of the best query")
    for b in range(3):
        torch.testing.assert_close(explainer(subset(inputs, b), target=int(best[b])).maps["image"][0],
                                   out.maps["image"][b], rtol=1e-5, atol=1e-10)


# relative to the map's max; measured at most 1.3e-5, 4.2e-3 and 2.8e-2 over the four families
LOW_PRECISION = {torch.float32: 1e-4, torch.float16: 1.5e-2, torch.bfloat16: 8e-2}


def _low_precision_cases():
    """(family, build, inputs, target, reference maps as {name: float64 tensor})."""
    clip_inputs = models.clip_inputs(2, 2, seed=11)
    lxmert_inputs = models.lxmert_inputs(2, seed=11)
    detr_inputs = models.detr_inputs(2, seed=11)
    visual_inputs = models.visual_bert_inputs(2, seed=11)
    return {
        "clip": (models.clip, clip_inputs, None,
                 lambda m: dict(zip(("image", "text"), reference.clip_reference(m, clip_inputs, [(0, 0), (1, 1)])))),
        "visual_bert": (models.visual_bert, visual_inputs, [1, 2],
                        lambda m: dict(zip(("text", "image"), reference.visual_bert_reference(m, visual_inputs,
                                                                                            [1, 2])))),
        "lxmert": (models.lxmert, lxmert_inputs, [3, 0],
                   lambda m: dict(zip(("text", "image"), reference.lxmert_reference(m, lxmert_inputs, [3, 0])))),
        "detr": (models.detr, detr_inputs, [1, 2],
                 lambda m: dict(zip(("image", "queries"),
                                    (r[:, 0] for r in reference.detr_reference(m, detr_inputs, [[1], [2]]))))),
    }


@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize("family", ["clip", "visual_bert", "lxmert", "detr"])
def test_lower_precision_models_stay_near_the_float64_reference(family, dtype):
    build, inputs, target, expected_maps = _low_precision_cases()[family]
    expected = expected_maps(build())
    low = build().to(dtype)
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    out = relfast.Explainer(low)(cast, target=torch.tensor(target) if target else None)
    for name, reference_map in expected.items():
        got = out.maps[name]
        assert got.dtype == torch.float32
        error = float((got.double() - reference_map).abs().max() / reference_map.abs().max())
        assert error <= LOW_PRECISION[dtype], f"{name} map: relative error {error:.3g}"


def test_non_contiguous_inputs_give_the_contiguous_result():
    model, inputs = models.detr(), models.detr_inputs(2, seed=14)
    explainer = relfast.Explainer(model)
    strided = inputs["pixel_values"].transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.is_contiguous()
    torch.testing.assert_close(explainer({"pixel_values": strided}).maps["image"], explainer(inputs).maps["image"])
    clip, clip_inputs = models.clip(), models.clip_inputs(2, 2, seed=14)
    wide = torch.stack([clip_inputs["input_ids"]] * 2, dim=2).flatten(1)[:, ::2]
    assert not wide.is_contiguous() and torch.equal(wide, clip_inputs["input_ids"])
    torch.testing.assert_close(relfast.Explainer(clip)({**clip_inputs, "input_ids": wide}).maps["text"],
                               relfast.Explainer(clip)(clip_inputs).maps["text"])


# ---- bad input: refused before any work ----

def counting(model):
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls


def bart():
    config = transformers.BartConfig(vocab_size=60, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=32, num_labels=3)
    return transformers.BartForSequenceClassification(config).eval()


BAD = {
    "clip batches of different sizes": (models.clip, lambda: models.clip_inputs(2, 3, 0), {}, None,
                                        "different sizes (3 texts, 2 images)"),
    "clip pair index out of range": (models.clip, lambda: models.clip_inputs(2, 3, 0), {}, torch.tensor([0, 3]),
                                     "text index 3, out of range for 3 texts"),
    "clip negative pair index": (models.clip, lambda: models.clip_inputs(2, 2, 0), {}, [0, -1], "text index -1"),
    "clip one index per image": (models.clip, lambda: models.clip_inputs(2, 2, 0), {}, torch.tensor([0, 1, 1]),
                                 "3 text indices but the batch has 2 images"),
    "clip callable target": (models.clip, lambda: models.clip_inputs(2, 2, 0), {}, lambda s: s[:, 0], "not a callable"),
    "clip unknown target word": (models.clip, lambda: models.clip_inputs(2, 2, 0), {}, "pairs", "'all'"),
    "clip empty batch": (models.clip, lambda: models.clip_inputs(0, 0, 0), {}, None, "empty batch"),
    "detr empty batch": (models.detr, lambda: {"pixel_values": torch.zeros(0, 3, 64, 64, dtype=torch.float64)}, {},
                         None, "empty batch"),
    "clip without images": (models.clip, lambda: {"input_ids": torch.ones(2, 3, dtype=torch.long)}, {}, None,
                            "'pixel_values'"),
    "detr query out of range": (models.detr, lambda: models.detr_inputs(2, 0), {}, 6,
                                "query 6, out of range for a model with 6 queries"),
    "detr callable target": (models.detr, lambda: models.detr_inputs(2, 0), {}, lambda s: s[:, 0], "query indices"),
    "detr NaN pixels": (models.detr, lambda: {"pixel_values": torch.full((1, 3, 64, 64), float("nan"),
                                                                          dtype=torch.float64)}, {}, None, "NaN"),
    "lxmert batch mismatch": (models.lxmert, lambda: {**models.lxmert_inputs(2, 0),
                                                      "visual_feats": models.lxmert_inputs(3, 0)["visual_feats"],
                                                      "visual_pos": models.lxmert_inputs(3, 0)["visual_pos"]}, {},
                              None, "2 texts but 3 'visual_feats'"),
    "lxmert target out of range": (models.lxmert, lambda: models.lxmert_inputs(2, 0), {}, 5, "out of range"),
    "visual bert without attention mask": (models.visual_bert, lambda: {
        k: v for k, v in models.visual_bert_inputs(2, 0).items() if k != "attention_mask"}, {}, None,
        "'attention_mask'"),
    "visual bert region width": (models.visual_bert, lambda: {**models.visual_bert_inputs(2, 0),
                                                              "visual_embeds": torch.zeros(2, 6, 5)}, {}, None,
                                 "(B, regions >= 1, 12)"),
    # issue 19: every text model refuses an all-padding sample and non-0/1 masks; other checks
    "clip all-padding text": (models.clip, lambda: changed(models.clip_inputs(2, 2, 0), "attention_mask", 1, 0), {},
                              None, "attention_mask is all zeros"),
    "clip mask value 2": (models.clip, lambda: changed(models.clip_inputs(2, 2, 0), "attention_mask", 0, 2, [0]), {},
                          None, "only 0 (padding) and 1 (real), got 2"),
    "clip text without its end token": (models.clip, lambda: without_eot(models.clip_inputs(2, 2, 0)), {}, None,
                                        "without the end token (eos_token_id 59)"),
    "clip float32 pixels": (models.clip, lambda: as_float32(models.clip_inputs(2, 2, 0)), {}, None,
                            "('pixel_values') is torch.float32 but the model computes in torch.float64"),
    "visual bert all-padding text": (models.visual_bert,
                                     lambda: changed(models.visual_bert_inputs(2, 0), "attention_mask", 1, 0), {},
                                     None, "attention_mask is all zeros"),
    "visual bert one-token text": (models.visual_bert, lambda: one_token(models.visual_bert_inputs(2, 0)), {}, None,
                                   "fewer than 2 real tokens (sample 1)"),
    "visual bert token type 2": (models.visual_bert, lambda: changed(models.visual_bert_inputs(2, 0), "token_type_ids",
                                                                     0, 2, [1]), {}, None,
                                 "(token_type_ids) holds 2, outside the model's 2 token types"),
    "visual bert float32 regions": (models.visual_bert, lambda: as_float32(models.visual_bert_inputs(2, 0)), {}, None,
                                    "('visual_embeds') is torch.float32"),
    "lxmert all-padding text": (models.lxmert, lambda: changed(models.lxmert_inputs(2, 0), "attention_mask", 0, 0), {},
                                None, "attention_mask is all zeros"),
    "lxmert float32 features": (models.lxmert, lambda: as_float32(models.lxmert_inputs(2, 0)), {}, None,
                                "is torch.float32 but the model computes in torch.float64"),
    "BertModel all-padding sample": (lambda: bert_encoder(), lambda: changed(models.lxmert_inputs(2, 0),
                                                                              "attention_mask", 1, 0, None, TEXT), {},
                                     lambda e: first_entry(e), "attention_mask is all zeros"),
    "CLIPTextModel all-padding text": (lambda: clip_text(), lambda: changed(
        {k: v for k, v in models.clip_inputs(2, 2, 0).items() if k != "pixel_values"}, "attention_mask", 0, 0), {},
        lambda e: first_entry(e), "attention_mask is all zeros"),
    "detr all-zero pixel mask": (models.detr, lambda: {**models.detr_inputs(2, 0),
                                                       "pixel_mask": torch.tensor([1, 0])[:, None, None].expand(
                                                           2, 64, 64).clone()}, {}, None,
                                 "pixel_mask is all zeros; every sample needs at least one real pixel"),
    "detr float32 pixels": (models.detr, lambda: as_float32(models.detr_inputs(2, 0)), {}, None,
                            "('pixel_values') is torch.float32"),
}


TEXT = ("input_ids", "attention_mask", "token_type_ids")


def first_entry(embeddings):
    return embeddings.reshape(embeddings.shape[0], -1)[:, 0]


def bert_encoder():
    config = transformers.BertConfig(vocab_size=models.VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.BertModel(config).double().eval()


def clip_text():
    return transformers.CLIPTextModel(models.clip().config.text_config).double().eval()


def changed(inputs, key, row, value, columns=None, keep=None):
    """``inputs`` with ``inputs[key][row, columns]`` (all columns: None) set to ``value``; only the
    keys in ``keep`` (all: None)."""
    inputs = {k: v for k, v in inputs.items() if keep is None or k in keep}
    inputs[key] = inputs[key].clone()
    inputs[key][row, slice(None) if columns is None else columns] = value
    return inputs


def without_eot(inputs):
    ids = inputs["input_ids"].clone()
    ids[1][ids[1] == models.CLIP_EOT] = models.CLIP_EOT - 1
    return {**inputs, "input_ids": ids}


def one_token(inputs):
    mask = inputs["attention_mask"].clone()
    mask[1] = 0
    mask[1, 0] = 1
    return {**inputs, "attention_mask": mask}


def as_float32(inputs):
    return {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_before_any_work(case):
    build, make_inputs, options, target, message = BAD[case]
    model = build()
    calls = counting(model)
    with pytest.raises(ValueError, match=_escaped(message)):
        relfast.Explainer(model, **options)(make_inputs(), target=target)
    assert calls == [], "the model ran before the error"


BAD_OPTIONS = {
    "rollout on lxmert": (models.lxmert, {"method": "rollout"}, "cross-attention, which method 'generic' explains"),
    "transformer attribution on detr": (models.detr, {"method": "transformer_attribution"}, "cross-attention"),
    "use_lrp on detr": (models.detr, {"use_lrp": True}, "use_lrp=True"),
    "start_layer on lxmert": (models.lxmert, {"start_layer": 1}, "'start_layer' does not apply"),
    "lrp on clip": (models.clip, {"method": "lrp"}, "needs LRP rules"),
    "ablation on clip": (models.clip, {"normalize": False}, "has none"),
    "clip start_layer out of range": (models.clip, {"start_layer": 2}, "out of range"),
    "unsupported cross-attention model": (bart, {}, "unsupported model BartForSequenceClassification"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_options_are_refused_when_the_explainer_is_made(case):
    build, options, message = BAD_OPTIONS[case]
    with pytest.raises(ValueError, match=_escaped(message)):
        relfast.Explainer(build(), **options)


def _escaped(message):
    import re
    return re.escape(message)


# ---- the user's model is sacred ----

CASES = {
    "clip": (models.clip, lambda: models.clip_inputs(2, 2, 0), "all"),
    "visual_bert": (models.visual_bert, lambda: models.visual_bert_inputs(2, 0), None),
    "lxmert": (models.lxmert, lambda: models.lxmert_inputs(2, 0), [0, 1]),
    "detr": (models.detr, lambda: models.detr_inputs(2, 0), [1, 2]),
    "clip-eager": (lambda: eager(models.clip()), lambda: models.clip_inputs(2, 2, 0), "all"),
    "detr-eager": (lambda: eager(models.detr()), lambda: models.detr_inputs(2, 0), [1, 2]),
}


def eager(model):
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize("name", CASES)
def test_model_untouched_and_threads_agree(name):
    build, make_inputs, target = CASES[name]
    model, inputs = build(), make_inputs()
    calls = user_setup(model)
    before = model_state(model)
    explainer = relfast.Explainer(model)
    expected = explainer(inputs, target=target)
    assert model_state(model) == before and len(calls) == 1
    results = [None] * 6

    def work(i):
        results[i] = explainer(inputs, target=target)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        for key, value in expected.maps.items():
            torch.testing.assert_close(result.maps[key], value)
    assert model_state(model) == before


def test_clip_towers_alone_give_the_pair_maps():
    """Each tower with a callable target (the similarity to the other tower's fixed embedding)
    sees the gradient the pair's logit gives it, so its map is the pair's."""
    model, inputs = models.clip(), models.clip_inputs(3, 3, seed=12)
    pair = relfast.Explainer(model)(inputs)
    model.config.vision_config.projection_dim = model.config.text_config.projection_dim = model.config.projection_dim
    vision = transformers.CLIPVisionModelWithProjection(model.config.vision_config).double().eval()
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    text = transformers.CLIPTextModelWithProjection(model.config.text_config).double().eval()
    text.text_model.load_state_dict(model.text_model.state_dict())
    text.text_projection.load_state_dict(model.text_projection.state_dict())
    with torch.no_grad():
        image_embeds = vision(pixel_values=inputs["pixel_values"]).image_embeds
        text_embeds = text(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).text_embeds
    scale = model.logit_scale.exp().detach()

    def similarity_to(fixed):
        unit = fixed / fixed.norm(dim=-1, keepdim=True)
        return lambda embeds: scale * (embeds / embeds.norm(dim=-1, keepdim=True) * unit).sum(-1)

    image_only = relfast.Explainer(vision)(inputs["pixel_values"], target=similarity_to(text_embeds))
    text_only = relfast.Explainer(text)({"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]},
                                        target=similarity_to(image_embeds))
    torch.testing.assert_close(image_only.maps["image"], pair.maps["image"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(text_only.maps["text"], pair.maps["text"], rtol=1e-5, atol=1e-9)


def test_detr_maps_of_every_query_feed_algorithm_1():
    model, inputs = models.detr(), models.detr_inputs(2, seed=13)
    out = relfast.Explainer(model)(inputs, target=[list(range(6))])
    masks = relfast.eval.detr_masks(out.image_map(), out.output.logits, (16, 16), (64, 64), threshold=0.0)
    assert masks.shape == (2, 6, 1, 64, 64) and masks.dtype == torch.bool
    assert masks.any(dim=(2, 3, 4)).all(), "a zero threshold keeps every query, each with a non-empty mask"
    none = relfast.eval.detr_masks(out.image_map(), out.output.logits, (16, 16), (64, 64), threshold=0.99)
    assert not none.any()


@pytest.mark.parametrize("name", ["lxmert", "detr"])
def test_model_untouched_after_the_rules_fail_midway(name, monkeypatch):
    """A failure inside the co-attention rules (after the forward and the backward) leaves the
    model as it was, and the explainer works afterwards."""
    build, make_inputs, target = CASES[name]
    model, inputs = build(), make_inputs()
    user_setup(model)
    before = model_state(model)
    explainer = relfast.Explainer(model)
    expected = explainer(inputs, target=target)

    def failing(*args, **kwargs):
        raise RuntimeError("failing inside rule 10")

    with monkeypatch.context() as patch:
        patch.setattr(relfast.ops, "bimodal_update", failing)
        with pytest.raises(RuntimeError, match="rule 10"):
            explainer(inputs, target=target)
    assert model_state(model) == before
    torch.testing.assert_close(explainer(inputs, target=target).maps["image"], expected.maps["image"])


@pytest.mark.parametrize("backbone", ["hf-resnet", "timm-resnet50"])
def test_detr_stride_is_read_from_the_backbone_also_for_a_one_position_grid(backbone):
    """A tiny image gives a 1x1 feature grid, which every stride >= the image fits: the upsampled
    map must span the backbone's stride (8 for the test backbone, 32 for ResNet-50), not the
    largest power of two that fits."""
    if backbone == "hf-resnet":
        model, stride = models.detr(), 8
    else:
        config = transformers.DetrConfig(use_timm_backbone=True, backbone="resnet50", use_pretrained_backbone=False,
                                         d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                         decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                         num_queries=3, num_labels=2)
        torch.manual_seed(0)
        model, stride = transformers.DetrForObjectDetection(config).double().eval(), 32
    out = relfast.Explainer(model)(torch.randn(1, 3, stride, stride, dtype=torch.float64))
    assert out.layouts["image"].patch_grid == (1, 1)
    assert tuple(out.image_map(upsample=True).shape) == (1, stride, stride)
    wide = relfast.Explainer(model)(torch.randn(1, 3, 2 * stride, 3 * stride, dtype=torch.float64))
    assert wide.layouts["image"].patch_grid == (2, 3)


@pytest.mark.parametrize("target,texts", [(None, [0, 1]), ([1, 0], [1, 0]), ("all", [0, 1, 0, 1])])
def test_clip_target_is_the_text_index_of_each_pair(target, texts):
    out = relfast.Explainer(models.clip())(models.clip_inputs(2, 2, 0), target=target)
    assert out.target.tolist() == texts
    assert out.target.tolist() == out.pairs[:, 1].tolist()
