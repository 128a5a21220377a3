"""[P2] two-stream explanations against the plain forward, batch 1 and 8, in one run (random
weights, float32, CPU, HF default SDPA attention):

* CLIP ViT-B/16-shaped ``CLIPModel`` (vision 224 px, patch 16, 12 layers, hidden 768; text 12
  layers, hidden 512, 77 tokens): ``forward`` (no grad, image b against text b), ``generic``
  (the default: image and text maps of pairs (b, b), last layer as the reference), and
  ``generic_all_layers`` (``start_layer=0``);
* DETR-R50-shaped ``DetrForObjectDetection`` (ResNet-50 backbone, d_model 256, 6 + 6 layers,
  8 heads, 100 queries, an 800 x 1066 image, 850 image tokens): ``forward`` and ``generic``
  (the best query of each image; rules 6-10 over every layer), and ``generic_5_queries`` (five
  queries per image: one backward each).

Time: pytest-benchmark medians (groups ``clip-b<B>``, ``detr-b<B>``).
"""
import pytest
import torch

import relfast

transformers = pytest.importorskip("transformers")

BATCHES = (1, 8)
ROUNDS = {1: 5, 8: 2}
TEXT_TOKENS = 77


def clip_model():
    torch.manual_seed(0)
    config = transformers.CLIPConfig(vision_config=dict(image_size=224, patch_size=16),
                                     text_config=dict(eos_token_id=49407), projection_dim=512)
    return transformers.CLIPModel(config).float().eval()


def clip_inputs(batch):
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, 49406, (batch, TEXT_TOKENS), generator=generator)
    lengths = torch.arange(batch) % 10 + 8  # 8..17 tokens, EOT last, padded to 77 as CLIP's tokenizer does
    positions = torch.arange(TEXT_TOKENS)
    ids[:, 0] = 49406
    ids = torch.where(positions >= lengths[:, None], 49407, ids)
    mask = (positions <= lengths[:, None]).long()
    return {"pixel_values": torch.randn(batch, 3, 224, 224, generator=generator), "input_ids": ids,
            "attention_mask": mask}


def detr_model():
    torch.manual_seed(0)
    backbone = transformers.ResNetConfig(out_features=["stage4"])  # ResNet-50: bottleneck, depths 3-4-6-3
    config = transformers.DetrConfig(backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False)
    return transformers.DetrForObjectDetection(config).float().eval()


def detr_inputs(batch):
    return {"pixel_values": torch.randn(batch, 3, 800, 1066, generator=torch.Generator().manual_seed(batch))}


MODELS = {"clip": (clip_model, clip_inputs, {"forward": None, "generic": {}, "generic_all_layers": {"start_layer": 0}}),
          "detr": (detr_model, detr_inputs, {"forward": None, "generic": {}, "generic_5_queries": {}})}


@pytest.fixture(scope="module")
def built():
    return {}


def runner(name, model, impl, batch):
    options = MODELS[name][2][impl]
    if options is None:
        def forward(inputs):
            with torch.no_grad():
                return model(**inputs)
        return forward
    explainer = relfast.Explainer(model, **options)
    target = [list(range(5))] * batch if impl == "generic_5_queries" else None
    return lambda inputs: explainer(inputs, target=target)


@pytest.mark.parametrize("impl", ["forward", "generic", "generic_all_layers", "generic_5_queries"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(MODELS))
def test_two_stream_explanation(benchmark, built, name, batch, impl):
    build, make_inputs, impls = MODELS[name]
    if impl not in impls:
        pytest.skip(f"{impl} is not benchmarked on {name}")
    if name not in built:
        built[name] = build()
    model, inputs = built[name], make_inputs(batch)
    run = runner(name, model, impl, batch)
    result = run(inputs)
    if impl != "forward":
        assert all(bool(torch.isfinite(m).all()) for m in result.maps.values())
    benchmark.group = f"{name}-b{batch}"
    benchmark.extra_info.update(model=name, batch=batch, impl=impl)
    benchmark.pedantic(run, args=(inputs,), rounds=ROUNDS[batch], iterations=1, warmup_rounds=0)
