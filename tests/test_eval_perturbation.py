"""[P1]'s perturbation and segmentation tests (relfast.eval) on hand-computed cases: the AUC is
the trapezoid with x = 0 included; an oracle map gives the best AUC, an inverted one the worst,
a random one lands between; removal picks exactly the patches and tokens it should; the
segmentation metrics match hand counts; the functions run deterministically on real explainers."""
import numpy as np
import pytest
import torch

import relfast
from relfast.eval import area_under_curve, perturbation, perturbation_curve, segmentation
from relfast.eval.perturbation import removal_ranks, removed_at, remove_patches, remove_tokens
from relfast.eval.segmentation import SegmentationTotals


def test_area_under_curve_is_the_trapezoid_from_zero():
    assert area_under_curve([0, 0.5, 1.0], [1.0, 0.5, 0.0]) == pytest.approx(50.0)
    assert area_under_curve(np.arange(10) / 10, np.ones(10)) == pytest.approx(90.0)
    # 0.1 * ((1 + .6) / 2 + (.6 + .2) / 2) = 0.12
    assert area_under_curve([0, 0.1, 0.2], [1.0, 0.6, 0.2]) == pytest.approx(12.0)
    with pytest.raises(ValueError, match="same length"):
        area_under_curve([0, 1], [1.0])


def test_removal_order_ranks_ties_by_position_and_keeps_specials_last():
    scores = torch.tensor([[3.0, 1.0, 2.0, 2.0]])
    everything = torch.ones(1, 4, dtype=torch.bool)
    assert removal_ranks(scores, everything, positive=True).tolist() == [[0, 3, 1, 2]]
    assert removal_ranks(scores, everything, positive=False).tolist() == [[3, 0, 1, 2]]
    kept_first = torch.tensor([[False, True, True, True]])
    assert removal_ranks(scores, kept_first, positive=True).tolist() == [[3, 2, 0, 1]]
    ranks = removal_ranks(scores, kept_first, positive=True)
    assert removed_at(ranks, kept_first, 0.0).sum() == 0
    assert removed_at(ranks, kept_first, 0.7).tolist() == [[False, False, True, True]]  # int(0.7 * 3) = 2


def test_remove_patches_zeroes_exactly_the_chosen_patches():
    images = torch.ones(1, 2, 4, 6)
    removed = torch.tensor([[False, True, False, False, False, True]])  # grid 2 x 3, patches 2 x 2
    out = remove_patches(images, removed, (2, 3), (2, 2))
    expected = torch.ones(4, 6)
    expected[0:2, 2:4] = 0
    expected[2:4, 4:6] = 0
    assert torch.equal(out[0, 0], expected) and torch.equal(out[0, 1], expected)


def test_remove_tokens_deletes_or_masks():
    inputs = {"input_ids": torch.tensor([[101, 5, 6, 7, 102, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]]),
              "token_type_ids": torch.zeros(1, 6, dtype=torch.long)}
    removed = torch.tensor([[False, False, True, False, False, False]])
    deleted = remove_tokens(inputs, removed, mask_token_id=None, pad_token_id=0)
    assert deleted["input_ids"].tolist() == [[101, 5, 7, 102, 0, 0]]
    assert deleted["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0]]
    masked = remove_tokens(inputs, removed, mask_token_id=103, pad_token_id=0)
    assert masked["input_ids"].tolist() == [[101, 5, 103, 7, 102, 0]]
    assert torch.equal(masked["attention_mask"], inputs["attention_mask"])


def _key_patch_task(count, seed):
    """Images whose label survives only while their key patch is intact: (images, labels, keys,
    predict, remove). 4 x 4 images, 2 x 2 patches."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, 4, (count,), generator=generator)
    images = torch.ones(count, 1, 4, 4)
    labels = torch.ones(count, dtype=torch.long)

    def predict(batch):
        patches = batch.unfold(2, 2, 2).unfold(3, 2, 2).reshape(batch.shape[0], 4, -1).sum(-1)
        return (patches[torch.arange(batch.shape[0]), keys[:batch.shape[0]]] > 0).long()

    def remove(batch, removed):
        return remove_patches(batch, removed, (2, 2), (2, 2))

    return images, labels, keys, predict, remove


def test_oracle_map_gives_the_best_auc_inverted_the_worst_random_between():
    images, labels, keys, predict, remove = _key_patch_task(64, seed=0)
    oracle = torch.nn.functional.one_hot(keys, 4).float()
    everything = torch.ones(64, 4, dtype=torch.bool)
    fractions = np.arange(4) / 4

    def auc(scores, positive):
        correct = perturbation_curve(predict, images, labels, scores, everything, remove, positive=positive, steps=4)
        return area_under_curve(fractions, correct / 64)

    # positive: the oracle removes the key patch first -> accuracy 1, 0, 0, 0
    assert auc(oracle, True) == pytest.approx(0.25 * (1 + 0) / 2 * 100)
    # the inverted map removes it last, never within 3 of 4 patches -> accuracy 1, 1, 1, 1
    assert auc(-oracle, True) == pytest.approx(75.0)
    random_auc = auc(torch.rand(64, 4, generator=torch.Generator().manual_seed(1)), True)
    assert 12.5 < random_auc < 75.0
    # negative: the oracle removes the key last (best), the inverted one first (worst)
    assert auc(oracle, False) == pytest.approx(75.0) and auc(-oracle, False) == pytest.approx(12.5)


def test_segmentation_totals_match_hand_counts():
    totals = SegmentationTotals()
    mask = torch.tensor([[[True, False], [False, False]]])
    totals.add(torch.tensor([[[0.9, 0.6], [0.1, 0.0]]]), mask)  # mean 0.4 -> predicted foreground: top row
    scores = totals.scores()
    assert scores.pixel_accuracy == pytest.approx(3 / 4)
    assert scores.iou == pytest.approx((2 / 3, 1 / 2))  # background: 2 of 3; foreground: 1 of 2
    assert scores.miou == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert scores.mean_ap == pytest.approx(1.0) and scores.images_in_ap == 1
    inverted = SegmentationTotals()
    inverted.add(1 - mask.float(), mask)
    assert inverted.scores().pixel_accuracy == 0 and inverted.scores().iou == (0.0, 0.0)
    empty = SegmentationTotals()
    empty.add(torch.rand(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool))  # no object: no AP to average
    assert empty.scores().images_in_ap == 0


@pytest.fixture(scope="module")
def shapes():
    images, labels, masks = relfast.data.make_shapes(24, seed=4242)  # a seed the model was not trained on
    return images, labels, masks


def test_perturbation_on_the_default_model_is_deterministic_and_batch_free(shapes):
    images, labels, _ = shapes
    explainer = relfast.Explainer(relfast.models.default_model())
    run = dict(positive=True, steps=5, preprocess=relfast.data.normalize, progress=False)
    first = perturbation(explainer, images, labels, batch_size=24, **run)
    again = perturbation(explainer, images, labels, batch_size=7, **run)
    assert np.array_equal(first.accuracy, again.accuracy) and first.auc == again.auc
    assert first.fractions.tolist() == [0, 0.2, 0.4, 0.6, 0.8]
    with torch.no_grad():
        clean = (explainer.model(relfast.data.normalize(images)).logits.argmax(-1) == labels).float().mean()
    assert first.accuracy[0] == pytest.approx(float(clean))
    negative = perturbation(explainer, images, labels, batch_size=24, **{**run, "positive": False})
    assert negative.auc > first.auc  # the generic rule is faithful on the default model


def test_perturbation_of_text_keeps_the_special_tokens():
    import transformers
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(5, 50, (6, 8), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = 1, 2
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    explainer = relfast.Explainer(model)
    curve = perturbation(explainer, inputs, labels, steps=4, progress=False, batch_size=4)
    masked = perturbation(explainer, inputs, labels, steps=4, progress=False, mask_token_id=3)
    assert curve.accuracy.shape == (4,) and 0 <= curve.auc <= 75
    assert masked.accuracy[0] == curve.accuracy[0]  # nothing removed at fraction 0


def test_segmentation_on_the_default_model_equals_its_own_maps(shapes):
    images, labels, masks = shapes
    explainer = relfast.Explainer(relfast.models.default_model())
    scores = segmentation(explainer, images, masks, preprocess=relfast.data.normalize, batch_size=10, progress=False)
    totals = SegmentationTotals()
    totals.add(explainer(relfast.data.normalize(images)).image_map(upsample=True), masks)
    assert scores == totals.scores()
    assert 0 < scores.miou <= 1 and 0 < scores.mean_ap <= 1 and scores.images_in_ap == 24


@pytest.mark.parametrize("call,words", [
    (lambda e, x, y: perturbation(e, x * 255, y, progress=False), "values in [0, 1]"),
    (lambda e, x, y: perturbation(e, x, y[:-1], progress=False), "'labels' must be a tensor of shape (24,)"),
    (lambda e, x, y: perturbation(e, x, y, steps=1, progress=False), "'steps' must be an int >= 2"),
    (lambda e, x, y: perturbation(e, x, y, target="best", progress=False), "'target'"),
    (lambda e, x, y: perturbation(e, [x], y, progress=False), "argument 'data'"),
    (lambda e, x, y: segmentation(e, x, torch.zeros(24, 8, 8, dtype=torch.bool), progress=False), "'masks'"),
])
def test_bad_arguments_are_named(shapes, call, words):
    images, labels, _ = shapes
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        call(relfast.Explainer(relfast.models.default_model()), images, labels)


def test_left_padded_text_keeps_its_first_and_last_real_tokens():
    """With left padding [CLS] is not at position 0: it, [SEP] and the padding are never ranked."""
    from relfast.eval.perturbation import _scores

    batch = {"input_ids": torch.tensor([[0, 0, 101, 5, 6, 102], [101, 7, 8, 9, 102, 0]]),
             "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])}
    out = relfast.Explanation(torch.zeros(2, 2), None, torch.rand(2, 6), relfast.TokenLayout())
    _, rankable = _scores(out, batch, relfast.TokenLayout(), images=False)
    assert rankable.tolist() == [[False, False, False, True, True, False], [False, True, True, True, False, False]]


def _tiny_bert():
    import transformers
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def test_numpy_integers_are_taken_as_ints():
    explainer = relfast.Explainer(_tiny_bert())
    ids = torch.randint(5, 50, (5, 8), generator=torch.Generator().manual_seed(3))
    ids[:, 0], ids[:, -1] = 1, 2
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = torch.tensor([0, 1, 2, 0, 1])
    plain = perturbation(explainer, inputs, labels, steps=4, batch_size=2, mask_token_id=3, progress=False)
    numpy = perturbation(explainer, inputs, labels, steps=np.int64(4), batch_size=np.int32(2),
                         mask_token_id=np.int64(3), progress=False)
    assert numpy.fractions.tolist() == [0, 0.25, 0.5, 0.75]
    assert np.array_equal(plain.accuracy, numpy.accuracy) and plain.auc == numpy.auc


class _Recording:
    """A callable explainer (no relfast family) that records the targets it is asked for and
    returns a fixed relevance per sentence."""

    def __init__(self, relevance):
        self.relevance, self.targets, self.seen = relevance, [], 0

    def __call__(self, batch, target=None):
        count = batch["input_ids"].shape[0]
        self.targets.append(target)
        relevance = self.relevance[self.seen:self.seen + count]
        self.seen += count
        return relfast.Explanation(torch.zeros(count, 2), None, relevance, relfast.TokenLayout())


def test_rationale_ap_explains_the_labels_batch_by_batch_and_skips_unscorable_sentences():
    from relfast.eval import rationale_ap

    ids = torch.tensor([[101, 5, 6, 7, 102], [101, 8, 9, 10, 102], [101, 11, 12, 13, 102]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rationale = torch.tensor([[0, 1, 0, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 1, 0]])  # 0/1 ints; sentence 2: all words
    relevance = torch.tensor([[0, 0.9, 0.1, 0.2, 0], [0, 0.1, 0.2, 0.3, 0], [0, 0.5, 0.9, 0.1, 0]])
    recording = _Recording(relevance)
    labels = torch.tensor([2, 0, 1])
    # sentence 1: its rationale ranks 1st of 3 (AP 1); sentence 3: 3rd of 3 (AP 1/3); sentence 2 is not scored
    assert rationale_ap(recording, inputs, rationale, target="label", labels=labels, batch_size=2,
                        progress=False) == pytest.approx((1 + 1 / 3) / 2)
    assert [t.tolist() for t in recording.targets] == [[2, 0], [1]]


def test_reference_targets_as_list_int_or_tensor_agree():
    from engine_models import build
    from relfast.eval.references import Occlusion

    explainer = relfast.Explainer(build("hf-vit"))
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    occlusion = Occlusion(explainer)
    as_tensor = occlusion(images, target=torch.tensor([1, 1])).relevance
    torch.testing.assert_close(occlusion(images, target=[1, 1]).relevance, as_tensor)
    torch.testing.assert_close(occlusion(images, target=1).relevance, as_tensor)
    torch.testing.assert_close(occlusion(images, target=np.int64(1)).relevance, as_tensor)


def test_segmentation_of_the_predicted_labels_equals_target_predicted(shapes):
    images, _, masks = shapes
    explainer = relfast.Explainer(relfast.models.default_model())
    with torch.no_grad():
        predicted = explainer.model(relfast.data.normalize(images)).logits.argmax(-1)
    run = dict(preprocess=relfast.data.normalize, batch_size=16, progress=False)
    assert segmentation(explainer, images, masks, target="label", labels=predicted, **run) == \
        segmentation(explainer, images, masks, **run)


def test_segmentation_totals_take_0_1_masks_as_bool():
    maps, mask = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)), torch.rand(2, 4, 4) > 0.5
    as_bool, as_int = SegmentationTotals(), SegmentationTotals()
    as_bool.add(maps, mask)
    as_int.add(maps, mask.long())
    assert as_bool.scores() == as_int.scores()
