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
