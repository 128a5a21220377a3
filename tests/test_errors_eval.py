"""relfast.eval: every user mistake gets a ValueError that starts with the entry point, names the
argument and what was expected, and (where a model is involved) is raised before the model's
forward runs. Table-driven: (model, how to call it, entry point, words the message must hold)."""
import pytest
import torch
import transformers

import relfast
from bimodal_models import clip, clip_inputs, detr, lxmert, lxmert_inputs
from engine_models import build, inputs_for
from relfast.eval import area_under_curve, detr_masks, perturbation, perturbation_curve, rationale_ap, segmentation
from relfast.eval.references import Occlusion, RandomMap
from relfast.eval.segmentation import SegmentationTotals
from relfast.eval.table import Suite, evaluate

PERTURBATION, SEGMENTATION, RATIONALE = "relfast.eval.perturbation", "relfast.eval.segmentation", \
    "relfast.eval.rationale_ap"
DETR_MASKS, OCCLUSION, RANDOM = "relfast.eval.detr_masks", "relfast.eval.Occlusion", "relfast.eval.RandomMap"


def images(count=4):
    return torch.rand(count, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def labels(count=4):
    return torch.arange(count) % 5


def masks(count=4):
    return torch.rand(count, 32, 32, generator=torch.Generator().manual_seed(1)) > 0.5


def text(**change):
    """BERT inputs (3, 9), right-padded to lengths 9, 6, 4."""
    return {**{k: v.clone() for k, v in inputs_for("hf-bert").items()}, **change}


def rationale():
    marked = torch.zeros(3, 9, dtype=torch.bool)
    marked[:, 2] = True
    return marked


def bert_encoder():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=40)
    return transformers.BertModel(config).double().eval()


MODELS = {"hf-vit": lambda: build("hf-vit"), "hf-bert": lambda: build("hf-bert"), "gpt2": lambda: build("gpt2"),
          "clip": clip, "detr": detr, "lxmert": lxmert, "bert-encoder": bert_encoder}
E = relfast.Explainer


def vit_run(**options):
    return lambda m: perturbation(E(m), images(), labels(), progress=False, **options)


def bert_run(**options):
    return lambda m: perturbation(E(m), text(), labels(3), progress=False, **options)


def seg_run(**options):
    return lambda m: segmentation(E(m), images(), masks(), progress=False, **options)


def rat_run(**options):
    return lambda m: rationale_ap(E(m), text(), rationale(), progress=False, **options)


def flat_rationale():
    marked = torch.zeros(3, 9, dtype=torch.bool)
    marked[:, 0] = True  # only [CLS]: no sentence has a rationale among its words
    return marked


# name: (model, call(model), entry point, words)
CASES = {
    # perturbation: options
    "perturbation batch_size -1": ("hf-vit", vit_run(batch_size=-1), PERTURBATION, ["'batch_size'", "positive int"]),
    "perturbation batch_size 0": ("hf-vit", vit_run(batch_size=0), PERTURBATION, ["'batch_size'", "positive int"]),
    "perturbation batch_size True": ("hf-vit", vit_run(batch_size=True), PERTURBATION, ["'batch_size'"]),
    "perturbation batch_size 2.0": ("hf-vit", vit_run(batch_size=2.0), PERTURBATION, ["'batch_size'"]),
    "perturbation steps 1": ("hf-vit", vit_run(steps=1), PERTURBATION, ["'steps'", "int >= 2"]),
    "perturbation steps 3.0": ("hf-vit", vit_run(steps=3.0), PERTURBATION, ["'steps'", "int >= 2"]),
    "perturbation positive 1": ("hf-vit", vit_run(positive=1), PERTURBATION, ["'positive'", "'both'"]),
    "perturbation positive 'negative'": ("hf-vit", vit_run(positive="negative"), PERTURBATION, ["'positive'"]),
    "perturbation unknown target": ("hf-vit", vit_run(target="best"), PERTURBATION, ["'target'", "'predicted'"]),
    "perturbation preprocess not callable": ("hf-vit", vit_run(preprocess="normalize"), PERTURBATION,
                                             ["'preprocess'", "callable"]),
    "perturbation progress not a bool": ("hf-vit", lambda m: perturbation(E(m), images(), labels(), progress="no"),
                                         PERTURBATION, ["'progress'", "True or False"]),
    "perturbation mask_token_id on images": ("hf-vit", vit_run(mask_token_id=3), PERTURBATION,
                                             ["'mask_token_id'", "text"]),
    "perturbation mask_token_id outside the vocabulary": ("hf-bert", bert_run(mask_token_id=60), PERTURBATION,
                                                          ["'mask_token_id'", "vocabulary [0, 60)", "60"]),
    "perturbation negative mask_token_id": ("hf-bert", bert_run(mask_token_id=-1), PERTURBATION,
                                            ["'mask_token_id'", "-1"]),
    "perturbation mask_token_id True": ("hf-bert", bert_run(mask_token_id=True), PERTURBATION, ["'mask_token_id'"]),
    "perturbation pad_token_id outside the vocabulary": ("hf-bert", bert_run(pad_token_id=99), PERTURBATION,
                                                         ["'pad_token_id'", "vocabulary"]),
    "perturbation preprocess with text": ("hf-bert", bert_run(preprocess=lambda x: x), PERTURBATION,
                                          ["'preprocess'", "images"]),
    # perturbation: data and labels
    "perturbation empty images": ("hf-vit", lambda m: perturbation(E(m), images(0), labels(0), progress=False),
                                  PERTURBATION, ["'data'", "no samples"]),
    "perturbation empty text": ("hf-bert", lambda m: perturbation(E(m), {k: v[:0] for k, v in text().items()},
                                                                  labels(0), progress=False),
                                PERTURBATION, ["'data'", "no samples"]),
    "perturbation NaN pixels": ("hf-vit", lambda m: perturbation(E(m), images().fill_(float("nan")), labels(),
                                                                 progress=False), PERTURBATION, ["'data'", "NaN"]),
    "perturbation uint8 images": ("hf-vit", lambda m: perturbation(E(m), torch.zeros(4, 3, 32, 32, dtype=torch.uint8),
                                                                   labels(), progress=False),
                                  PERTURBATION, ["'data'", "float images"]),
    "perturbation images smaller than the grid": ("hf-vit", lambda m: perturbation(E(m), images()[..., :24, :24],
                                                                                   labels(), progress=False),
                                                  PERTURBATION, ["'data'", "(24, 24)", "patch grid"]),
    "perturbation images of another size": ("hf-vit", lambda m: perturbation(
        E(m), torch.nn.functional.pad(images(), (0, 8, 0, 8)), labels(), progress=False), PERTURBATION,
        ["'data'", "(B, 3, 32, 32)", "(4, 3, 40, 40)"]),
    "perturbation images outside [0, 1]": ("hf-vit", lambda m: perturbation(E(m), images() * 255, labels(),
                                                                            progress=False),
                                           PERTURBATION, ["'data'", "[0, 1]", "'preprocess'"]),
    "perturbation token ids outside the vocabulary": ("hf-bert", lambda m: perturbation(
        E(m), text(input_ids=text()["input_ids"] + 60), labels(3), progress=False), PERTURBATION,
        ["'data'", "vocabulary [0, 60)"]),
    "perturbation text for an image model": ("hf-vit", lambda m: perturbation(E(m), text(), labels(3), progress=False),
                                             PERTURBATION, ["'data'", "images"]),
    "perturbation float labels": ("hf-vit", lambda m: perturbation(E(m), images(), labels().float(), progress=False),
                                  PERTURBATION, ["'labels'", "integer"]),
    "perturbation label outside the classes": ("hf-vit", lambda m: perturbation(
        E(m), images(), torch.tensor([0, 1, 2, 5]), progress=False), PERTURBATION, ["'labels'", "class 5", "[0, 5)"]),
    "perturbation K labels per sample": ("hf-vit", lambda m: perturbation(
        E(m), images(), labels()[:, None].repeat(1, 2), progress=False), PERTURBATION, ["'labels'", "shape (4,)"]),
    # perturbation: models the protocol does not apply to
    "perturbation on a causal LM": ("gpt2", lambda m: perturbation(E(m), inputs_for("gpt2"), labels(3), progress=False),
                                    PERTURBATION, ["GPT2LMHeadModel", "causal LM", "not a classifier",
                                                   "text classifiers"]),
    "perturbation on CLIP": ("clip", lambda m: perturbation(E(m), clip_inputs(3, 3, 0), labels(3), progress=False),
                             PERTURBATION, ["CLIPModel", "not a classifier", "image classifiers"]),
    "perturbation on DETR": ("detr", lambda m: perturbation(E(m), torch.rand(2, 3, 64, 64, dtype=torch.float64),
                                                            labels(2), progress=False),
                             PERTURBATION, ["DetrForObjectDetection", "not a classifier"]),
    "perturbation on LXMERT": ("lxmert", lambda m: perturbation(E(m), lxmert_inputs(3, 0), labels(3), progress=False),
                               PERTURBATION, ["LxmertForQuestionAnswering", "not a classifier"]),
    "perturbation on a headless encoder": ("bert-encoder", lambda m: perturbation(E(m), text(), labels(3),
                                                                                 progress=False),
                                           PERTURBATION, ["BertModel", "not a classifier"]),
    "perturbation of a full_matrix explainer": ("hf-vit", lambda m: perturbation(E(m, full_matrix=True), images(),
                                                                                 labels(), progress=False),
                                                PERTURBATION, ["'explainer'", "full_matrix"]),
    "perturbation of a model, not an explainer": ("hf-vit", lambda m: perturbation(m, images(), labels(),
                                                                                  progress=False),
                                                  PERTURBATION, ["'explainer'", "relfast.Explainer"]),
    # segmentation
    "segmentation empty": ("hf-vit", lambda m: segmentation(E(m), images(0), masks(0), progress=False), SEGMENTATION,
                           ["'images'", "no samples"]),
    "segmentation batch_size 0": ("hf-vit", seg_run(batch_size=0), SEGMENTATION, ["'batch_size'"]),
    "segmentation progress not a bool": ("hf-vit", lambda m: segmentation(E(m), images(), masks(), progress=1),
                                         SEGMENTATION, ["'progress'"]),
    "segmentation unknown target": ("hf-vit", seg_run(target="labels"), SEGMENTATION, ["'target'"]),
    "segmentation target label without labels": ("hf-vit", seg_run(target="label"), SEGMENTATION,
                                                 ["'labels'", "required"]),
    "segmentation labels that would be ignored": ("hf-vit", seg_run(labels=labels()), SEGMENTATION,
                                                  ["'labels'", "target='label'"]),
    "segmentation K labels": ("hf-vit", seg_run(target="label", labels=torch.zeros(4, 2, dtype=torch.long)),
                              SEGMENTATION, ["'labels'", "shape (4,)"]),
    "segmentation masks of another size": ("hf-vit", lambda m: segmentation(E(m), images(), masks()[:, :8, :8],
                                                                            progress=False),
                                           SEGMENTATION, ["'masks'", "(4, 32, 32)"]),
    "segmentation soft masks": ("hf-vit", lambda m: segmentation(E(m), images(), masks().float() / 2, progress=False),
                                SEGMENTATION, ["'masks'", "bool"]),
    "segmentation NaN pixels": ("hf-vit", lambda m: segmentation(E(m), images().fill_(float("inf")), masks(),
                                                                 progress=False),
                                SEGMENTATION, ["'images'", "NaN or infinite"]),
    "segmentation of a text model": ("hf-bert", seg_run(), SEGMENTATION, ["BertForSequenceClassification",
                                                                          "not an image model"]),
    "segmentation on CLIP": ("clip", seg_run(), SEGMENTATION, ["CLIPModel", "not a classifier"]),
    # rationale_ap
    "rationale_ap target label without labels": ("hf-bert", rat_run(target="label"), RATIONALE,
                                                 ["'labels'", "required"]),
    "rationale_ap unknown target": ("hf-bert", rat_run(target="gold"), RATIONALE, ["'target'", "'label'"]),
    "rationale_ap K-target labels": ("hf-bert", rat_run(target="label", labels=torch.zeros(3, 2, dtype=torch.long)),
                                     RATIONALE, ["'labels'", "shape (3,)", "K classes"]),
    "rationale_ap label outside the classes": ("hf-bert", rat_run(target="label", labels=torch.tensor([0, 1, 7])),
                                               RATIONALE, ["'labels'", "class 7"]),
    "rationale_ap labels that would be ignored": ("hf-bert", rat_run(labels=labels(3)), RATIONALE,
                                                  ["'labels'", "target='label'"]),
    "rationale_ap empty": ("hf-bert", lambda m: rationale_ap(E(m), {k: v[:0] for k, v in text().items()},
                                                             rationale()[:0], progress=False),
                           RATIONALE, ["'inputs'", "no samples"]),
    "rationale_ap batch_size -1": ("hf-bert", rat_run(batch_size=-1), RATIONALE, ["'batch_size'"]),
    "rationale_ap rationale of another shape": ("hf-bert", lambda m: rationale_ap(E(m), text(), rationale()[:, :5],
                                                                                  progress=False),
                                                RATIONALE, ["'rationale'", "(3, 9)"]),
    "rationale_ap soft rationale": ("hf-bert", lambda m: rationale_ap(E(m), text(), rationale().float() * 0.3,
                                                                      progress=False),
                                    RATIONALE, ["'rationale'", "bool"]),
    "rationale_ap no sentence to score": ("hf-bert", lambda m: rationale_ap(E(m), text(), flat_rationale(),
                                                                            progress=False),
                                          RATIONALE, ["'rationale'", "average precision needs both"]),
    "rationale_ap inputs not a dict": ("hf-bert", lambda m: rationale_ap(E(m), text()["input_ids"], rationale(),
                                                                         progress=False),
                                       RATIONALE, ["'inputs'", "'input_ids'"]),
    "rationale_ap token ids outside the vocabulary": ("hf-bert", lambda m: rationale_ap(
        E(m), text(input_ids=text()["input_ids"] * 0 + 70), rationale(), progress=False), RATIONALE,
        ["'inputs'", "token id 70"]),
    "rationale_ap of an image model": ("hf-vit", rat_run(), RATIONALE, ["ViTForImageClassification", "image model"]),
    "rationale_ap on a causal LM": ("gpt2", lambda m: rationale_ap(E(m), inputs_for("gpt2"), rationale(),
                                                                   progress=False),
                                    RATIONALE, ["GPT2LMHeadModel", "not a classifier"]),
    # references
    "Occlusion target outside the classes": ("hf-vit", lambda m: Occlusion(E(m))(images(2), target=9), OCCLUSION,
                                             ["'target'", "class 9"]),
    "Occlusion K targets": ("hf-vit", lambda m: Occlusion(E(m))(images(2), target=[[0, 1], [1, 2]]), OCCLUSION,
                            ["'target'", "(2,)"]),
    "Occlusion float target": ("hf-vit", lambda m: Occlusion(E(m))(images(2), target=torch.tensor([0.5, 1.0])),
                               OCCLUSION, ["'target'"]),
    "Occlusion baseline of another shape": ("hf-vit", lambda m: Occlusion(E(m), baseline=torch.zeros(4)), OCCLUSION,
                                            ["'baseline'", "(3,)"]),
    "Occlusion mask_token_id outside the vocabulary": ("hf-bert", lambda m: Occlusion(E(m), mask_token_id=60),
                                                       OCCLUSION, ["'mask_token_id'", "vocabulary"]),
    "Occlusion baseline of a text model": ("hf-bert", lambda m: Occlusion(E(m), baseline=torch.zeros(())), OCCLUSION,
                                           ["'baseline'", "image models"]),
    "Occlusion empty inputs": ("hf-vit", lambda m: Occlusion(E(m))(images(0)), OCCLUSION, ["'inputs'", "empty"]),
    "Occlusion on a causal LM": ("gpt2", lambda m: Occlusion(E(m)), OCCLUSION, ["GPT2LMHeadModel", "not a classifier"]),
    "RandomMap negative seed": ("hf-vit", lambda m: RandomMap(E(m), seed=-1), RANDOM, ["'seed'"]),
    "RandomMap on CLIP": ("clip", lambda m: RandomMap(E(m)), RANDOM, ["CLIPModel", "not a classifier"]),
    "RandomMap wrong inputs": ("hf-vit", lambda m: RandomMap(E(m))(images()[:, :1]), RANDOM, ["'inputs'", "shape"]),
    # table.evaluate
    "evaluate with a misspelt test": ("hf-vit", lambda m: evaluate(Suite("s", m, images(), labels(), masks(),
                                                                         lambda x: x), ["generic"], ["segmentaton"]),
                                      "relfast.eval.table.evaluate", ["'tests'", "segmentation"]),
    "evaluate with an unknown method": ("hf-vit", lambda m: evaluate(Suite("s", m, images(), labels(), masks(),
                                                                           lambda x: x), ["best"]),
                                        "relfast.eval.table.evaluate", ["'methods'", "'generic'"]),
    "evaluate segmentation without masks": ("hf-vit", lambda m: evaluate(Suite("digits", m, images(), labels(), None,
                                                                               lambda x: x), ["generic"],
                                                                         ["segmentation"]),
                                            "relfast.eval.table.evaluate", ["'segmentation'", "masks"]),
    # no model
    "detr_masks threshold string": (None, lambda m: detr_masks(torch.rand(1, 1, 8, 8), torch.zeros(1, 1, 3), (8, 8),
                                                               (8, 8), threshold="0.5"),
                                    DETR_MASKS, ["'threshold'", "number", "'0.5'"]),
    "detr_masks threshold True": (None, lambda m: detr_masks(torch.rand(1, 1, 8, 8), torch.zeros(1, 1, 3), (8, 8),
                                                             (8, 8), threshold=True), DETR_MASKS, ["'threshold'"]),
    "detr_masks threshold NaN": (None, lambda m: detr_masks(torch.rand(1, 1, 8, 8), torch.zeros(1, 1, 3), (8, 8),
                                                            (8, 8), threshold=float("nan")),
                                 DETR_MASKS, ["'threshold'"]),
    "detr_masks no image": (None, lambda m: detr_masks(torch.rand(0, 1, 8, 8), torch.zeros(0, 1, 3), (8, 8), (8, 8)),
                            DETR_MASKS, ["'relevance'", "empty"]),
    "detr_masks empty grid": (None, lambda m: detr_masks(torch.rand(1, 1, 0, 8), torch.zeros(1, 1, 3), (8, 8), (8, 8)),
                              DETR_MASKS, ["'relevance'", "empty"]),
    "detr_masks float mask_size": (None, lambda m: detr_masks(torch.rand(1, 1, 8, 8), torch.zeros(1, 1, 3), (8.0, 8),
                                                              (8, 8)), DETR_MASKS, ["'mask_size'"]),
    "detr_masks bool logits": (None, lambda m: detr_masks(torch.rand(1, 1, 8, 8), torch.ones(1, 1, 3, dtype=torch.bool),
                                                          (8, 8), (8, 8)), DETR_MASKS, ["'logits'"]),
    "area_under_curve percentages": (None, lambda m: area_under_curve([0, 0.5], [100, 40]),
                                     "relfast.eval.area_under_curve", ["'accuracy'", "percentages"]),
    "area_under_curve decreasing fractions": (None, lambda m: area_under_curve([0.5, 0.0], [1, 1]),
                                              "relfast.eval.area_under_curve", ["'fractions'", "increase"]),
    "area_under_curve text": (None, lambda m: area_under_curve(["a", "b"], [1, 1]), "relfast.eval.area_under_curve",
                              ["'fractions'", "numbers"]),
    "perturbation_curve predictions of another shape": (
        None, lambda m: perturbation_curve(lambda x: x.sum(dim=(1, 2, 3))[:, None], images(), labels(),
                                           torch.rand(4, 16), torch.ones(4, 16, dtype=torch.bool), lambda d, r: d),
        "relfast.eval.perturbation_curve", ["'predict'", "(4,)"]),
    "perturbation_curve no samples": (None, lambda m: perturbation_curve(lambda x: x, images(0), labels(0),
                                                                         torch.rand(0, 16),
                                                                         torch.ones(0, 16, dtype=torch.bool),
                                                                         lambda d, r: d),
                                      "relfast.eval.perturbation_curve", ["'scores'", "no samples"]),
    "perturbation_curve rankable of another shape": (None, lambda m: perturbation_curve(
        lambda x: x, images(), labels(), torch.rand(4, 16), torch.ones(4, 8, dtype=torch.bool), lambda d, r: d),
        "relfast.eval.perturbation_curve", ["'rankable'", "(4, 16)"]),
    "SegmentationTotals masks of another shape": (None, lambda m: SegmentationTotals().add(
        torch.rand(1, 2, 2), torch.zeros(1, 4, 4, dtype=torch.bool)), "relfast.eval.SegmentationTotals.add",
        ["'masks'", "(1, 2, 2)"]),
    "SegmentationTotals scores of nothing": (None, lambda m: SegmentationTotals().scores(),
                                             "relfast.eval.SegmentationTotals.scores", ["no images"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mistakes_are_refused_before_any_work(case):
    name, call, where, words = CASES[case]
    model = MODELS[name]() if name else None
    forwards = []
    hook = model.register_forward_pre_hook(lambda module, args: forwards.append(1)) if model is not None else None
    try:
        with pytest.raises(ValueError) as error:
            call(model)
    finally:
        if hook is not None:
            hook.remove()
    message = str(error.value)
    assert message.startswith(where + ":"), message
    for word in words:
        assert word in message, (word, message)
    assert forwards == [], "no forward before the check"
