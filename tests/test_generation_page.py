"""The page of a generated answer (``relfast.viz.generation_page``, ``relfast explain --generate``):
what it holds, checked against ``relfast.Explainer(...).generate``, and how it behaves in a real
headless browser (Chromium from the distribution's packages, driven by Selenium): click a generated
token, read back the highlighted tokens, look at the screenshot's pixels."""
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import relfast
from testing import cli_in_process as run_cli

transformers = pytest.importorskip("transformers")

PROMPT = "the big dog ran to the red ball"
NEW_TOKENS = 6


def page_data(page: str) -> dict:
    """The JSON the page's script reads."""
    match = re.search(r'<script id="relfast-data" type="application/json">(.*?)</script>', page, re.S)
    assert match, "the page embeds its data"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def lm(causal_lm_folder):
    tokenizer = transformers.AutoTokenizer.from_pretrained(causal_lm_folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(causal_lm_folder).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def answer(lm):
    model, tokenizer = lm
    inputs = tokenizer([PROMPT], return_tensors="pt")
    return relfast.Explainer(model).generate(inputs, max_new_tokens=NEW_TOKENS, tokenizer=tokenizer, pad_token_id=1)


def expected_row(answer, t: int, shown: list) -> np.ndarray:
    """Generated token t's row over the shown positions before it, its source's entry 0, scaled to
    a largest |value| of 1: what the page must show, from the explanation itself."""
    source = answer.prompt_length + t - 1
    before = [p for p in shown if p <= source]
    values = answer.relevance[0, t, before].double().numpy().copy()
    values[-1] = 0
    return values / np.abs(values).max()


# ---- what the page holds ----

def test_page_rows_are_the_explanation_rows(answer):
    data = page_data(relfast.viz.generation_page(answer))
    prompt = answer.prompt_length
    assert data["tokens"][:prompt] == PROMPT.split()
    assert data["prompt_length"] == prompt
    assert len(data["rows"]) == NEW_TOKENS == len(data["logits"])
    shown = list(range(prompt + NEW_TOKENS))
    for t in range(NEW_TOKENS):
        row = np.array(data["rows"][t])
        assert len(row) == prompt + t, "a row covers the tokens before its token only"
        np.testing.assert_allclose(row, expected_row(answer, t, shown), atol=1e-4)
        order = np.argsort(-row, kind="stable")[:relfast.viz.PAGE_TOP_TOKENS]
        assert data["top"][t] == [int(k) for k in order if row[k] > 0]
    np.testing.assert_allclose(data["logits"], answer.logits[0].numpy(), rtol=1e-5)
    assert data["image"] is None and data["image_rows"] is None


def test_page_hides_the_prompt_tokens_asked_for(answer, lm):
    _, tokenizer = lm
    hidden = tokenizer.convert_tokens_to_ids(["the"])
    data = page_data(relfast.viz.generation_page(answer, hide_tokens=hidden))
    prompt = answer.prompt_length
    shown = [p for p in range(prompt) if p == prompt - 1 or int(answer.sequences[0, p]) not in hidden]
    assert data["tokens"][:len(shown)] == [PROMPT.split()[p] for p in shown]
    shown += list(range(prompt, prompt + NEW_TOKENS))
    for t in range(NEW_TOKENS):
        np.testing.assert_allclose(data["rows"][t], expected_row(answer, t, shown), atol=1e-4)


def test_page_escapes_what_it_embeds(answer):
    page = relfast.viz.generation_page(answer, title="</script><script>alert(1)</script>")
    assert page.count("</script>") == 2, "the title cannot close the page's scripts"
    assert page_data(page)["title"] == "</script><script>alert(1)</script>"
    assert "https://" not in page and "http://" not in page, "the page loads nothing from the network"


@pytest.mark.parametrize("change, match", [
    (dict(token_strings=None), "tokenizer=tokenizer"),
    (dict(relevance=None), "what relfast.Explainer"),
])
def test_page_refuses_an_answer_it_cannot_show(answer, change, match):
    fields = dict(vars(answer))
    fields.update(change)
    if fields["relevance"] is None:
        del fields["relevance"]
    with pytest.raises(ValueError, match=re.escape(match)):
        relfast.viz.generation_page(SimpleNamespace(**fields))


@pytest.mark.parametrize("sample", [1, -1, 0.0, True])
def test_page_refuses_a_sample_out_of_range(answer, sample):
    with pytest.raises(ValueError, match="argument 'sample' must be an int in \\[0, 1\\)"):
        relfast.viz.generation_page(answer, sample=sample)


def test_page_of_image_maps_needs_the_image(answer):
    fake = SimpleNamespace(**{**vars(answer), "image": torch.rand(1, NEW_TOKENS, 2, 3)})
    with pytest.raises(ValueError, match="argument 'image' must be the picture"):
        relfast.viz.generation_page(fake)


def test_page_refuses_non_finite_relevance(answer):
    fields = dict(vars(answer))
    fields["relevance"] = answer.relevance.clone()
    fields["relevance"][0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="answer.relevance"):
        relfast.viz.generation_page(SimpleNamespace(**fields))


# ---- the command line ----

def test_cli_writes_the_page_of_the_answer(causal_lm_folder, answer, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "answer.html"
    code, stdout, stderr = run_cli(capsys, "explain", "--text", PROMPT, "--model", str(causal_lm_folder),
                                   "--generate", str(NEW_TOKENS), "--out", str(out))
    assert code == 0, stderr
    assert f"{NEW_TOKENS} generated tokens" in stdout
    data = page_data(out.read_text(encoding="utf-8"))
    # the tokenizer's special tokens are hidden; here the prompt has none, so every word shows
    assert data["tokens"] == PROMPT.split() + answer.token_strings[0][answer.prompt_length:]
    for t in range(NEW_TOKENS):
        np.testing.assert_allclose(data["rows"][t], expected_row(answer, t, list(range(len(data["tokens"])))),
                                   atol=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--generate", "0"], "--generate must be a number of tokens >= 1"),
    (["--generate", "4", "--target", "3"], "--target does not apply with --generate"),
    (["--generate", "4", "--method", "rollout"], "--method rollout cannot explain generated tokens"),
])
def test_cli_refuses_bad_generate_arguments(causal_lm_folder, tmp_path, capsys, extra, message):
    code, _, stderr = run_cli(capsys, "explain", "--text", PROMPT, "--model", str(causal_lm_folder),
                              "--out", str(tmp_path / "a.html"), *extra)
    assert code == 2 and message in stderr
    assert not (tmp_path / "a.html").exists()


def test_cli_generate_needs_a_causal_lm(tmp_path, capsys):
    code, _, stderr = run_cli(capsys, "explain", "--text", PROMPT, "--generate", "3", "--out", str(tmp_path / "a.html"))
    assert code == 2 and "--generate needs --model FOLDER holding a HuggingFace causal LM" in stderr


def test_generate_methods_agree_with_the_library():
    import relfast.cli
    from relfast.explain.generate import GENERATE_METHODS

    assert relfast.cli.GENERATE_METHODS == GENERATE_METHODS


# ---- in a real browser ----

def _browser():
    """A headless Chromium driven by Selenium, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements.txt)")
    from selenium.webdriver.chrome.service import Service

    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("Chromium and its driver are not installed (apt-get install chromium chromium-driver; "
                    ".ci/run does it where it can)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,900", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = _browser()
    yield driver
    driver.quit()


def open_page(browser, path: Path):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(path.resolve().as_uri())
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def shown_scores(browser) -> list:
    """(text, data-score, classes) of every token span, as the page shows them now."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('span.tok')).map("
        "s => [s.textContent, parseFloat(s.dataset.score), s.className])")


def pixel_colour(screenshot: np.ndarray, element) -> np.ndarray:
    """The mean RGB of an element's box in a screenshot."""
    box = element.rect
    top, left = int(box["y"]) + 2, int(box["x"]) + 2
    return screenshot[top:int(box["y"] + box["height"]) - 2, left:int(box["x"] + box["width"]) - 2, :3].reshape(
        -1, 3).mean(axis=0)


def test_clicking_a_generated_token_highlights_what_drove_it(browser, answer, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    path = relfast.viz.save_generation_page(answer, tmp_path / "answer.html")
    open_page(browser, path)
    prompt, t = answer.prompt_length, 3
    shown = list(range(prompt + NEW_TOKENS))
    assert [text for text, _, _ in shown_scores(browser)] == PROMPT.split() + answer.token_strings[0][prompt:]
    assert all(score == 0 for _, score, _ in shown_scores(browser)), "nothing is coloured before a click"

    generated = browser.find_elements(By.CSS_SELECTOR, "span.gen")
    assert len(generated) == NEW_TOKENS
    generated[t].click()
    spans = shown_scores(browser)
    expected = expected_row(answer, t, shown)
    np.testing.assert_allclose([score for _, score, _ in spans[:prompt + t]], expected, atol=1e-4)
    assert all("future" in classes and score == 0 for _, score, classes in spans[prompt + t:])
    hot = [i for i, (_, _, classes) in enumerate(spans) if "hot" in classes.split()]
    strongest = [int(k) for k in np.argsort(-expected, kind="stable")[:relfast.viz.PAGE_TOP_TOKENS] if expected[k] > 0]
    assert sorted(hot) == sorted(strongest)
    assert "selected" in spans[prompt + t][2].split()
    status = browser.find_element(By.ID, "status").text
    assert status.startswith(f"token {t + 1} of {NEW_TOKENS}")

    # the screenshot: the most relevant token is red, a future token is white
    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    elements = browser.find_elements(By.CSS_SELECTOR, "span.tok")
    red = pixel_colour(pixels, elements[strongest[0]])
    assert red[0] > red[1] + 60 and red[0] > red[2] + 60, f"the strongest token is drawn red, got RGB {red}"
    future = pixel_colour(pixels, elements[prompt + NEW_TOKENS - 1])
    assert (future[:] > 200).all() or future.mean() > 200, f"a later token is not coloured, got RGB {future}"

    # the arrow key moves the selection to the next token
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    spans = shown_scores(browser)
    np.testing.assert_allclose([score for _, score, _ in spans[:prompt + t + 1]],
                               expected_row(answer, t + 1, shown), atol=1e-4)
    assert "selected" in spans[prompt + t + 1][2].split() and "selected" not in spans[prompt + t][2].split()


def test_the_image_overlay_follows_the_selected_token(browser, answer, tmp_path):
    """A vision-language answer's page: the selected token's patch map is drawn over the picture
    (here a made-up 2x3 map per token over a grey picture: the canvas is read back)."""
    from selenium.webdriver.common.by import By

    maps = torch.zeros(1, NEW_TOKENS, 2, 3)
    for t in range(NEW_TOKENS):
        maps[0, t].view(-1)[t % 6] = 1.0  # token t: only patch t mod 6 is relevant
    fake = SimpleNamespace(**{**vars(answer), "image": maps})
    picture = np.full((40, 60, 3), 0.5)
    picture[0, 0] = 0.0  # not a flat picture (min-max normalised for display)
    picture[-1, -1] = 1.0
    path = relfast.viz.save_generation_page(fake, tmp_path / "vlm.html", image=picture)
    open_page(browser, path)
    browser.find_elements(By.CSS_SELECTOR, "span.gen")[4].click()
    # the mean colour of each of the 6 patch cells of the canvas
    cells = browser.execute_script("""
        const c = document.getElementById('image'), g = c.getContext('2d');
        const out = [];
        for (let r = 0; r < 2; r++) for (let k = 0; k < 3; k++) {
          const w = c.width / 3, h = c.height / 2;
          const d = g.getImageData(k * w + 2, r * h + 2, w - 4, h - 4).data;
          let s = [0, 0, 0];
          for (let i = 0; i < d.length; i += 4) { s[0] += d[i]; s[1] += d[i + 1]; s[2] += d[i + 2]; }
          const n = d.length / 4; out.push(s.map(v => v / n));
        }
        return out;""")
    cells = np.array(cells)
    hot = int(np.argmax(cells[:, 0] - cells[:, 1]))
    assert hot == 4, f"token 4's relevant patch is the red one, got cell {hot}: {cells.round()}"
    others = np.delete(cells, 4, axis=0)
    assert np.abs(others[:, 0] - others[:, 1]).max() < 10, "the other patches show the grey picture"


# ---- a vision-language model's answer (LLaVA) through the command line ----

VLM_WORDS = "<image> what is in the picture a red ball on grass cat dog blue sky".split()
VLM_PROMPT = "what is in the picture"


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    """A tiny random LLaVA (CLIP vision tower 32 px, 8 px patches: 4x4 image tokens; Llama LM) saved
    with its processor (CLIP image processor, word-level tokenizer with the <image> token)."""
    import tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, **{word: i + 2 for i, word in enumerate(VLM_WORDS)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                                     extra_special_tokens={"image_token": "<image>"})
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = transformers.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1)
    vision = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4)
    text = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    bos_token_id=None, eos_token_id=None, pad_token_id=1)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"])
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llava")
    transformers.LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def picture_file(tmp_path_factory):
    from PIL import Image

    pixels = (np.random.default_rng(3).random((40, 50, 3)) * 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("picture") / "picture.png"
    Image.fromarray(pixels).save(path)
    return path


def test_cli_writes_the_page_of_a_vision_language_answer(llava_folder, picture_file, tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "vlm.html"
    code, stdout, stderr = run_cli(capsys, "explain", "--image", str(picture_file), "--text", VLM_PROMPT,
                                   "--model", str(llava_folder), "--generate", str(NEW_TOKENS), "--out", str(out))
    assert code == 0, stderr
    data = page_data(out.read_text(encoding="utf-8"))

    # the same answer in-process, as a user of the library gets it
    processor = transformers.AutoProcessor.from_pretrained(llava_folder)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(llava_folder).eval()
    inputs = processor(images=np.array(Image.open(picture_file).convert("RGB")), text=[f"<image>\n{VLM_PROMPT}"],
                       return_tensors="pt", input_data_format="channels_last")
    answer = relfast.Explainer(model).generate(dict(inputs), max_new_tokens=NEW_TOKENS, tokenizer=processor.tokenizer)
    assert answer.image is not None and answer.image.shape == (1, NEW_TOKENS, 4, 4)
    prompt = answer.prompt_length
    ids = answer.sequences[0].tolist()
    shown = [p for p in range(prompt) if ids[p] != model.config.image_token_id] + list(range(prompt, prompt + NEW_TOKENS))
    assert data["tokens"][:len(shown) - NEW_TOKENS] == VLM_PROMPT.split(), "image placeholders are not shown"
    assert data["grid"] == [4, 4] and data["image"].startswith("data:image/png;base64,")
    for t in range(NEW_TOKENS):
        np.testing.assert_allclose(data["rows"][t], expected_row(answer, t, shown), atol=1e-4)
        patch_map = answer.image[0, t].double().numpy().reshape(-1)
        np.testing.assert_allclose(data["image_rows"][t], patch_map / np.abs(patch_map).max(), atol=1e-4)


def test_cli_vision_language_folder_needs_generate(llava_folder, picture_file, tmp_path, capsys):
    code, _, stderr = run_cli(capsys, "explain", "--image", str(picture_file), "--text", VLM_PROMPT,
                              "--model", str(llava_folder), "--out", str(tmp_path / "a.png"))
    assert code == 2 and "a vision-language model: explain its answer with --generate N" in stderr
