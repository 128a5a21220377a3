"""``relfast bench``: the table it prints, and its mistakes as one line and exit code 2 (in-process
through ``relfast.cli.main``, as the causal-LM tests of test_cli.py)."""
import re

import pytest
import torch

import relfast.cli
import relfast.explain.session
from testing import cli_in_process as explain_in_process
from test_cli_bimodal import clip_folder, detr_folder, region_folders  # noqa: F401 (fixtures)

SHORT = ["--batch", "2", "--seconds", "0.5"]
SETTINGS = ["model", "batch", "device", "dtype", "method"]
RESULTS = ["inference", "explanation", "explanation/inference", "explanation peak memory"]


def bench_table(stdout):
    """{row name: the rest of its line} of the printed table, and the two timed rows parsed."""
    rows = dict(re.match(r"(\S+(?: \S+)*?)\s{2,}(.*)", line.strip()).groups()
                for line in stdout.splitlines() if line.strip() and not line.strip().startswith("calls"))
    timed = {}
    for name in ("inference", "explanation"):
        calls, median_ms, samples_per_s = rows[name].split()
        timed[name] = int(calls), float(median_ms), float(samples_per_s)
    return rows, timed


def assert_consistent(rows, timed, batch):
    for calls, median_ms, samples_per_s in timed.values():
        assert calls >= 3 and median_ms > 0 and samples_per_s > 0
        assert samples_per_s == pytest.approx(1e3 * batch / median_ms, rel=1e-3)  # both at 4 significant digits
    ratio = float(rows["explanation/inference"].rstrip("x"))
    # explanation latency / inference latency (2 decimals) is the quotient of the throughputs (4 digits)
    assert ratio == pytest.approx(timed["inference"][2] / timed["explanation"][2], rel=3e-3, abs=0.01)
    assert rows["explanation peak memory"] == "-" or re.fullmatch(r"-?\d+\.\d MiB \(one call, above its start\)",
                                                                  rows["explanation peak memory"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_the_default_model(capsys, dtype):
    code, stdout, stderr = explain_in_process(capsys, "bench", *SHORT, "--dtype", dtype)
    assert code == 0, stderr
    rows, timed = bench_table(stdout)
    assert (rows["model"], rows["batch"], rows["device"], rows["dtype"], rows["method"]) == \
        ("embedded default model", "2", "cpu", dtype, "generic")
    assert list(rows) == SETTINGS + RESULTS
    assert_consistent(rows, timed, 2)
    assert "measuring: 100%" in stderr, "the progress bar reaches the end"


def test_bench_a_causal_lm_folder(causal_lm_folder, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, stdout, stderr = explain_in_process(capsys, "bench", "--model", str(causal_lm_folder), *SHORT,
                                              "--method", "rollout", "--quiet")
    assert code == 0, stderr
    rows, timed = bench_table(stdout)
    assert rows["model"] == str(causal_lm_folder) and rows["method"] == "rollout"
    assert list(rows) == SETTINGS + ["tokens"] + RESULTS
    assert rows["tokens"] == "32", "the default length is cut to the model's 32 positions"
    assert_consistent(rows, timed, 2)
    assert stderr == "", "--quiet: no progress bar"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An HF image classifier's config alone: --tokens must be refused from it, before loading."""
    import transformers

    folder = tmp_path_factory.mktemp("vit")
    transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=8, architectures=["ViTForImageClassification"]).save_pretrained(folder)
    return folder


# kind: (extra arguments, the rows the table adds after the settings, from the fixtures' configs)
PAIRED = {
    "clip": ([], {"tokens": "32"}),  # the text tower's 32 positions cut the default 128
    "detr": ([], {"image": "64x64 px"}),  # the folder's processor: shortest edge 64
    "visual_bert": ([], {"tokens": "40", "regions": "36"}),
    "lxmert": (["--tokens", "8"], {"tokens": "8", "regions": "36"}),
}


@pytest.mark.parametrize("kind", sorted(PAIRED))
def test_bench_a_two_stream_folder(kind, clip_folder, detr_folder, region_folders, capsys):  # noqa: F811
    """CLIP, DETR, VisualBERT and LXMERT folders are benched on random inputs of their kind."""
    folder = {"clip": clip_folder, "detr": detr_folder}.get(kind, region_folders / kind)
    extra, added = PAIRED[kind]
    code, stdout, stderr = explain_in_process(capsys, "bench", "--model", str(folder), "--batch", "2", "--seconds",
                                              "0.3", "--quiet", *extra)
    assert code == 0, stderr[-3000:]
    rows, timed = bench_table(stdout)
    assert list(rows) == SETTINGS + list(added) + RESULTS
    assert {name: rows[name] for name in added} == added
    assert_consistent(rows, timed, 2)
    assert stderr == "", "--quiet: nothing but the table"


@pytest.fixture(scope="module")
def detr_config_folder(tmp_path_factory):
    """A DETR config alone: --tokens must be refused from it, before loading."""
    import transformers

    folder = tmp_path_factory.mktemp("detr_config")
    transformers.DetrConfig(use_timm_backbone=False, backbone_config=transformers.ResNetConfig(),
                            architectures=["DetrForObjectDetection"]).save_pretrained(folder)
    return folder


# name: (arguments, the message's words, checked before any model is loaded)
MISTAKES = {
    "batch 0": (["--batch", "0"], "--batch must be >= 1, got 0", True),
    "seconds 0": (["--batch", "2", "--seconds", "0"], "--seconds must be a positive number", True),
    "seconds negative": (["--batch", "2", "--seconds", "-1"], "--seconds must be a positive number", True),
    "seconds nan": (["--batch", "2", "--seconds", "nan"], "--seconds must be a positive number", True),
    "unknown method": (["--batch", "2", "--method", "gradients"], "--method must be one of", True),
    "cuda without a GPU": (["--batch", "2", "--device", "cuda"], "--device cuda: no CUDA GPU", True),
    "tokens for the default model": (["--batch", "2", "--tokens", "16"],
                                     "--tokens applies to text models; the embedded default model is an image", True),
    "tokens for an image folder": (["--batch", "2", "--model", "IMAGE_FOLDER", "--tokens", "16"],
                                   "--tokens applies to text models", True),
    "tokens for a DETR folder": (["--batch", "2", "--model", "DETR_FOLDER", "--tokens", "16"],
                                 "--tokens applies to text models; DETR_FOLDER is an image model (DETR)", True),
    "a missing model": (["--batch", "2", "--model", "/no/such/model"], "--model /no/such/model does not exist", True),
    "tokens 0": (["--batch", "2", "--model", "LM", "--tokens", "0"], "--tokens must be >= 1, got 0", True),
    "tokens beyond the positions": (["--batch", "2", "--model", "LM", "--tokens", "33"],
                                    "--tokens 33 is longer than the model's 32 positions", False),
    "a method the model cannot take": (["--batch", "2", "--model", "CLIP", "--method", "lrp"],
                                       "needs LRP rules for every layer", False),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_bench_mistakes_fail_with_one_line(case, causal_lm_folder, image_folder, detr_config_folder,  # noqa: F811
                                          clip_folder, capsys, monkeypatch):  # noqa: F811
    args, words, before_loading = MISTAKES[case]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same case on a GPU machine
    if before_loading:
        def no_loading(*a, **k):
            raise AssertionError("a model was loaded before the arguments were checked")
        monkeypatch.setattr(relfast.cli, "_load_model_and_inputs", no_loading)
        monkeypatch.setattr(relfast.explain.session.Session, "run", no_loading)
    paths = {"LM": str(causal_lm_folder), "IMAGE_FOLDER": str(image_folder), "DETR_FOLDER": str(detr_config_folder),
             "CLIP": str(clip_folder)}
    code, stdout, stderr = explain_in_process(capsys, "bench", *[paths.get(a, a) for a in args])
    assert code == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    words = words.replace("DETR_FOLDER", paths["DETR_FOLDER"])
    assert len(lines) == 1 and lines[0].startswith("relfast: error: ") and words in lines[0], stderr
    assert stdout == ""
