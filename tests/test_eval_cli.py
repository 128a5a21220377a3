"""relfast eval: every method named, on the project's held-out data, as a table, a CSV and a PNG;
the random and occlusion references; the digits data and model the project ships."""
import csv
import subprocess
import sys

import matplotlib.pyplot as plt
import pytest
import torch

import relfast
from relfast.eval.references import Occlusion, RandomMap


def run(*args):
    return subprocess.run([sys.executable, "-m", "relfast.cli", "eval", *args], capture_output=True, text=True,
                          timeout=600)


def test_eval_writes_the_table_csv_and_curves(tmp_path):
    result = run("--methods", "generic", "random", "--samples", "24", "--steps", "5", "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "r" / "results.csv")))
    assert [r["method"] for r in rows] == ["generic", "random"]
    for row in rows:
        for key in ("positive_auc", "negative_auc"):
            assert 0 <= float(row[key]) <= 80  # steps 5: fractions 0 .. 0.8
        assert 0 <= float(row["miou"]) <= 1 and 0 <= float(row["mean_ap"]) <= 1
    generic, random = rows
    assert float(generic["positive_auc"]) < float(random["positive_auc"])
    assert float(generic["miou"]) > float(random["miou"])
    assert "generic" in result.stdout and "positive_auc" in result.stdout
    assert plt.imread(tmp_path / "r" / "curves.png").ndim == 3


def test_eval_on_digits_perturbation_only(tmp_path):
    result = run("--data", "digits", "--methods", "rollout", "--test", "perturbation", "--samples", "40",
                 "--out", str(tmp_path / "d"), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "d" / "results.csv")))
    assert rows[0]["method"] == "rollout" and rows[0]["miou"] == ""


@pytest.mark.parametrize("args,words", [
    (["--methods", "best"], "unknown method(s) best"),
    (["--data", "digits", "--test", "segmentation"], "needs object masks"),
    (["--steps", "1"], "--steps >= 2"),
    (["--methods", "generic", "--rules", "textbook"], "--rules applies to partial_lrp and lrp"),
    (["--methods", "lrp", "--rules", "best"], "invalid choice: 'best'"),
])
def test_eval_mistakes(tmp_path, args, words):
    result = run(*args, "--out", str(tmp_path / "x"))
    assert result.returncode != 0 and words in result.stderr, result.stderr


def test_digits_model_reads_the_held_out_digits():
    images, labels = relfast.data.load_digits("held_out")
    train, _ = relfast.data.load_digits("train")
    assert images.shape == (500, 1, 8, 8) and train.shape == (1297, 1, 8, 8)
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    model = relfast.models.digits_model()
    with torch.no_grad():
        accuracy = (model(relfast.data.normalize(images)).logits.argmax(-1) == labels).float().mean()
    assert accuracy > 0.95
    # no held-out image is a training image
    assert not (images.flatten(1)[:, None] == train.flatten(1)[None]).all(-1).any()


def test_references_are_called_like_an_explainer():
    images, _, _ = relfast.data.make_shapes(4, seed=3)
    explainer = relfast.Explainer(relfast.models.default_model())
    pixels = relfast.data.normalize(images)
    random_map = RandomMap(explainer)(pixels)
    assert random_map.image_map().shape == (4, 8, 8)
    torch.testing.assert_close(RandomMap(explainer)(pixels[2:3]).relevance[0], random_map.relevance[2])
    black = relfast.data.normalize(torch.zeros(3))
    occlusion = Occlusion(explainer, baseline=black)(pixels, target=torch.tensor([0, 1, 2, 3]))
    # the relevance of patch (2, 5) is the logit drop when that patch alone turns black
    occluded = pixels[:1].clone()
    occluded[:, :, 16:24, 40:48] = black.view(1, 3, 1, 1)
    with torch.no_grad():
        drop = explainer.model(pixels[:1]).logits[0, 0] - explainer.model(occluded).logits[0, 0]
    torch.testing.assert_close(occlusion.image_map()[0, 2, 5], drop, rtol=1e-5, atol=1e-6)


def test_eval_on_sentiment_rationales(tmp_path):
    result = run("--data", "sentiment", "--methods", "generic", "random", "--samples", "40", "--steps", "4",
                 "--out", str(tmp_path / "s"), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    generic, random = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    assert float(generic["rationale_ap"]) > float(random["rationale_ap"])
    assert float(generic["positive_auc"]) < float(random["positive_auc"])


def test_sentiment_sentences_and_model():
    from relfast.data.sentiment import lexicon_words, make_sentences

    inputs, labels, rationale = make_sentences(60, "held_out")
    train_inputs, _, train_rationale = make_sentences(60, "train")
    held_out_words = set(inputs["input_ids"][rationale].tolist())
    assert held_out_words.isdisjoint(train_inputs["input_ids"][train_rationale].tolist())
    counts = rationale.sum(1)
    assert ((counts >= 1) & (counts <= 2)).all() and set(labels.tolist()) == {0, 1}
    positive, negative = lexicon_words()
    assert len(positive) > 100 and len(negative) > 100
    with torch.no_grad():
        predicted = relfast.models.sentiment_model()(**inputs).logits.argmax(-1)
    assert (predicted == labels).float().mean() > 0.9


def test_rationale_ap_of_an_oracle_and_an_inverted_map():
    from relfast.eval import rationale_ap

    inputs = {"input_ids": torch.tensor([[101, 5, 6, 7, 102, 0], [101, 8, 9, 102, 0, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])}
    rationale = torch.tensor([[0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)

    def explainer_of(relevance):
        return lambda batch, target=None: relfast.Explanation(torch.zeros(2, 2), None, relevance,
                                                              relfast.TokenLayout())

    oracle = rationale.float() + 0.1  # [CLS], [SEP] and padding are left out of the ranking
    assert rationale_ap(explainer_of(oracle), inputs, rationale, progress=False) == pytest.approx(1.0)
    # inverted: sentence 1 ranks its rationale 3rd of 3 (AP 1/3), sentence 2 2nd of 2 (AP 1/2)
    assert rationale_ap(explainer_of(-oracle), inputs, rationale, progress=False) == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_eval_all_data_sets_into_one_folder_each(tmp_path):
    result = run("--data", "all", "--methods", "generic", "--samples", "12", "--steps", "3", "--out", str(tmp_path),
                 "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("shapes", "digits", "sentiment"):
        assert (tmp_path / name / "results.csv").is_file() and (tmp_path / name / "curves.png").is_file()
        assert f"{name} (12 held-out samples)" in result.stdout


def test_eval_rules_choose_the_lrp_baselines_rule_set(tmp_path):
    """--rules textbook: the rows of lrp and partial_lrp with the textbook rules, as
    relfast.eval.table.evaluate gives them; other methods' rows as without the flag."""
    from relfast.eval import table

    result = run("--methods", "lrp", "partial_lrp", "rollout", "--rules", "textbook", "--samples", "24",
                 "--quiet", "--out", str(tmp_path / "t"))
    assert result.returncode == 0, result.stderr[-3000:]
    written = list(csv.DictReader(open(tmp_path / "t" / "results.csv")))
    suite = table.shapes_suite(samples=24)
    textbook = table.evaluate(suite, ["lrp", "partial_lrp", "rollout"], rules="textbook", progress=False)
    paper = table.evaluate(suite, ["lrp", "partial_lrp"], progress=False)
    expected = [{k: "" if v is None else str(v) for k, v in row.values().items()} for row in textbook]
    assert written == expected
    assert [row.values() for row in textbook[:2]] != [row.values() for row in paper]  # the flag changed them
