"""The command line on two-stream models saved as HuggingFace folders (model + processor): CLIP
explains an image-text pair, DETR its detections; both write one PNG and print what they
explained."""
import re
import string
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import transformers

import bimodal_models as models

LETTERS = list(string.ascii_lowercase)


def run(*args):
    return subprocess.run([sys.executable, "-m", "relfast.cli", *args], capture_output=True, text=True, timeout=300)


def letter_tokenizer():
    """A CLIP tokenizer over single letters (no download): 'a dog' -> a</w> d o g</w>."""
    vocab = {c: i for i, c in enumerate(LETTERS)}
    vocab.update({c + "</w>": len(LETTERS) + i for i, c in enumerate(LETTERS)})
    for token in ("</w>", "<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[(c, "</w>") for c in LETTERS])


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = letter_tokenizer()
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=32, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64), projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def detr_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detr")
    model = models.detr().float()
    model.config.id2label = {i: name for i, name in enumerate(["cat", "dog", "car", "tree"])}
    model.config.label2id = {name: i for i, name in model.config.id2label.items()}
    model.save_pretrained(folder)
    transformers.DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    plt.imsave(path, np.random.default_rng(0).random((40, 56, 3)))
    return path


def test_clip_image_and_text_write_one_picture(clip_folder, photo, tmp_path):
    out = tmp_path / "pair.png"
    result = run("explain", "--image", str(photo), "--text", "a dog", "--model", str(clip_folder), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    logit = float(re.search(r"similarity logit (-?[\d.]+)", result.stdout).group(1))
    picture = plt.imread(out)
    assert picture.shape[1] > 2 * picture.shape[0]  # input, overlay, words
    processor = transformers.AutoProcessor.from_pretrained(clip_folder)
    model = transformers.CLIPModel.from_pretrained(clip_folder).eval()
    inputs = processor(text=["a dog"], images=plt.imread(photo)[..., :3], return_tensors="pt", do_rescale=False)
    with torch.no_grad():
        expected = float(model(**inputs).logits_per_image[0, 0])
    assert abs(logit - expected) < 0.01 + 0.01 * abs(expected)


def test_detr_writes_boxes_with_query_maps(detr_folder, photo, tmp_path):
    out = tmp_path / "boxes.png"
    result = run("explain", "--image", str(photo), "--model", str(detr_folder), "--target", "1,4", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 queries: query 1:" in result.stdout and "query 4:" in result.stdout
    picture = plt.imread(out)
    assert picture.shape[1] > 2.5 * picture.shape[0]  # the detections and two query maps


@pytest.mark.parametrize("args,words", [
    (["--text", "a dog"], "CLIP folder"),  # image and text without a CLIP model
    (["--text", "a dog", "--compare", "a cat"], "--compare applies to --text alone"),
])
def test_image_and_text_mistakes(photo, tmp_path, args, words):
    result = run("explain", "--image", str(photo), *args, "--out", str(tmp_path / "x.png"))
    assert result.returncode != 0 and words in result.stderr, result.stderr


def test_image_and_text_with_a_detr_folder_is_refused(detr_folder, photo, tmp_path):
    result = run("explain", "--image", str(photo), "--text", "a dog", "--model", str(detr_folder),
                 "--out", str(tmp_path / "x.png"))
    assert result.returncode != 0 and "CLIP folder" in result.stderr
