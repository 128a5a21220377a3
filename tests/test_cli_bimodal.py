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
def region_folders(tmp_path_factory):
    """VisualBERT and LXMERT folders (their inputs are detector features, so no processor)."""
    root = tmp_path_factory.mktemp("regions")
    models.visual_bert().float().save_pretrained(root / "visual_bert")
    models.lxmert().float().save_pretrained(root / "lxmert")
    return root


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


def in_process(capsys, *args):
    """``relfast.cli.main`` on ``args``: (exit code, stdout, stderr)."""
    import relfast.cli

    try:
        relfast.cli.main([str(a) for a in args])
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_a_clip_folder_to_torchscript(clip_folder, photo, tmp_path, capsys):
    """The file explains a real image-text pair as relfast.Explainer does (both maps' first: the image's)."""
    import relfast

    out = tmp_path / "clip.pt"
    code, stdout, stderr = in_process(capsys, "export", "--model", clip_folder, "--format", "torchscript", "--out", out)
    assert code == 0, stderr[-3000:]
    assert "parity vs eager PyTorch at batch 1, 2, 5, 16" in stdout and "(ok)" in stdout, stdout
    processor = transformers.AutoProcessor.from_pretrained(clip_folder)
    model = transformers.CLIPModel.from_pretrained(clip_folder).eval()
    inputs = processor(text=["a dog", "a cat on a mat"], images=[plt.imread(photo)[..., :3]] * 2, return_tensors="pt",
                       padding=True, do_rescale=False)
    inputs = {k: inputs[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    eager = relfast.Explainer(model)(inputs)
    logits, relevance = torch.jit.load(str(out))(*inputs.values(), torch.tensor([-1, -1]))[:2]
    torch.testing.assert_close(logits, eager.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(relevance, eager.maps["image"], rtol=1e-4, atol=1e-4 * float(relevance.abs().max()))


def test_export_a_detr_folder_to_onnx(detr_folder, tmp_path, capsys):
    """DETR exports with a fixed batch (1) at its processor's image size; the file equals the
    eager explainer on another image."""
    import relfast
    from relfast.runtime import OnnxExplainer

    out = tmp_path / "detr.onnx"
    code, stdout, stderr = in_process(capsys, "export", "--model", detr_folder, "--out", out)
    assert code == 0, stderr[-3000:]
    assert "at batch 1 (4 inputs; the file has a fixed batch)" in stdout and "(ok)" in stdout, stdout
    assert "batch 8" not in stdout
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(123))
    outputs = OnnxExplainer(out).run(pixels.numpy())
    eager = relfast.Explainer(transformers.DetrForObjectDetection.from_pretrained(detr_folder).eval())(pixels)
    np.testing.assert_allclose(outputs["relevance"], eager.maps["image"].numpy(), rtol=1e-4,
                               atol=1e-4 * float(eager.maps["image"].abs().max()))
    np.testing.assert_allclose(outputs["pred_boxes"], eager.output.pred_boxes.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("height,width", [(4, 4), (1, 2), (3, 5)])
def test_detr_explains_an_image_smaller_than_its_input(detr_folder, tmp_path, capsys, height, width):
    """Tiny images (which the processor, guessing the channel axis from the shape, used to misread
    or fail on) are enlarged by the processor, and the CLI says so."""
    image = tmp_path / "tiny.png"
    plt.imsave(image, np.random.default_rng(height).random((height, width, 3)))
    out = tmp_path / "boxes.png"
    code, stdout, stderr = in_process(capsys, "explain", "--image", image, "--model", detr_folder, "--out", out)
    assert code == 0, stderr[-3000:]
    assert f"note: {image} is {width}x{height} px; the processor enlarged it to " in stdout
    if height == width:
        assert "enlarged it to 64x64" in stdout  # the processor's shortest and longest edge
    assert plt.imread(out).ndim == 3


def test_clip_reads_an_image_three_pixels_high_as_channels_last(clip_folder, tmp_path, capsys):
    """A 3 x 5 px image: its rows are not colour channels (HF's guess for such shapes)."""
    pixels = np.random.default_rng(3).integers(0, 256, (3, 5, 3)).astype(np.uint8)
    image = tmp_path / "strip.png"
    plt.imsave(image, pixels)
    code, stdout, stderr = in_process(capsys, "explain", "--image", image, "--text", "a dog", "--model", clip_folder,
                                      "--out", tmp_path / "pair.png")
    assert code == 0, stderr[-3000:]
    logit = float(re.search(r"similarity logit (-?[\d.]+)", stdout).group(1))
    processor = transformers.AutoProcessor.from_pretrained(clip_folder)
    model = transformers.CLIPModel.from_pretrained(clip_folder).eval()

    def similarity(**layout):
        inputs = processor(text=["a dog"], images=pixels, return_tensors="pt", **layout)
        with torch.no_grad():
            return float(model(**inputs).logits_per_image[0, 0])
    expected = similarity(input_data_format="channels_last")
    assert abs(logit - expected) < 0.01 + 0.01 * abs(expected)
    assert abs(similarity() - expected) > 0.02, "the guessed layout is another image (the test tells them apart)"
