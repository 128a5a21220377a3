"""Fixtures shared by test files."""
import pytest
import torch

import relfast
import relfast.export


@pytest.fixture(scope="session")
def default_files(tmp_path_factory):
    """The shipped model's generic explainer exported once as ONNX and as TorchScript."""
    explainer = relfast.Explainer(relfast.models.default_model(), "generic")
    folder = tmp_path_factory.mktemp("default_export")
    example = torch.randn(1, 3, 64, 64)
    return dict(onnx=relfast.export.to_onnx(explainer, example, folder / "m.onnx"),
                script=relfast.export.to_torchscript(explainer, example, folder / "m.pt"))


# ---- a tiny causal LM folder with a word-level tokenizer (test_cli, test_generation_page) ----

LM_WORDS = "the cat sat on a mat and dog ran to park with big red ball under tree".split()


@pytest.fixture(scope="module")
def causal_lm_folder(tmp_path_factory):
    """A tiny random GPT-2 and a word-level tokenizer, saved as a HuggingFace folder."""
    import tokenizers
    import torch
    import transformers

    vocab = {"[UNK]": 0, "[PAD]": 1, **{word: i + 2 for i, word in enumerate(LM_WORDS)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    config = transformers.GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lm")
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
