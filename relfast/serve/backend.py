"""The served model: loading it (through relfast.cli's loaders, or relfast.runtime for exported
files) and answering one group of checked requests with one batched call of ``relfast.Explainer``
(or of the exported file).

A backend knows its model; it knows nothing of HTTP or Ray (relfast.serve.deployment) and checks
nothing of a request that relfast.serve.protocol checks, except what needs the model's own
tokenizer (a text's token count). ``run`` raises when the batch fails; the deployment then runs
the group's requests one by one, so that one request that breaks the model fails alone.
"""
import base64
import contextlib
import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .protocol import BadRequest, ModelSpec, Request, check_tokens

TOP_TOKENS = 10  # a causal LM's answer: its best next tokens, not the whole vocabulary's logits


class ModelLoadError(RuntimeError):
    """The model given to ``relfast serve`` / ``relfast.serve.app`` cannot be served (one line)."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


@contextlib.contextmanager
def _cli_loader():
    """relfast.cli's loaders report a bad model as a CliError (one line and exit status 2 on the
    command line); inside a replica (or a user's program) it becomes a ModelLoadError."""
    from ..cli import CliError

    try:
        yield
    except CliError as error:
        raise ModelLoadError(error.message) from None


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (relfast export --format torchscript): a zip holding code/; a
    checkpoint written by torch.save is a zip too, without it."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def load(model: Union[None, str, Path, Any] = None, *, tokenizer: Any = None, image_processor: Any = None,
         labels: Optional[Sequence[str]] = None, threads: Optional[int] = None) -> "Backend":
    """The backend for ``model``: None (the embedded default model), a checkpoint of
    scripts/train_default_model.py, a HuggingFace folder (image classifier, sequence classifier or
    causal LM, with its tokenizer or image processor), an exported ``.onnx`` or TorchScript ``.pt``
    file, or a loaded ``torch.nn.Module`` (then ``tokenizer`` / ``image_processor`` as needed)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if model is not None and not isinstance(model, (str, Path)):
        return TorchBackend(model, tokenizer=tokenizer, image_processor=image_processor, labels=labels)
    from .. import cli

    if model is None:
        import relfast.data

        with _cli_loader():
            loaded = cli._load_checkpoint(None)
        return TorchBackend(loaded, labels=labels or list(relfast.data.CLASSES), normalize=relfast.data.normalize)
    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"model {path} does not exist")
    if path.is_file() and path.suffix.lower() == ".onnx":
        return OnnxBackend(path, tokenizer=tokenizer, labels=labels)
    if path.is_file() and is_torchscript(path):
        return ScriptBackend(path, tokenizer=tokenizer, labels=labels)
    if path.is_file():
        import relfast.data

        with _cli_loader():
            loaded = cli._load_checkpoint(str(path))
        return TorchBackend(loaded, labels=labels, normalize=relfast.data.normalize)
    with _cli_loader():
        kind = cli._model_kind(str(path), "serve")
        if kind in ("text", "causal_lm"):
            import transformers

            loader = (transformers.AutoModelForCausalLM if kind == "causal_lm"
                      else transformers.AutoModelForSequenceClassification)
            folder_tokenizer, loaded = cli._load_text_model(str(path), loader)
            tokenizer = tokenizer or folder_tokenizer
        elif kind == "image":
            loaded = cli._load_model_and_inputs(str(path), "serve")[0]
        else:
            raise ModelLoadError(f"model {path} holds a {cli._KIND_NAMES[kind]}; relfast serve takes image "
                                 "classifiers, sequence classifiers and causal LMs (checkpoints, HuggingFace "
                                 "folders, exported .onnx / .pt files)")
    if kind == "image" and image_processor is None:
        image_processor = _saved_image_processor(path)
    return TorchBackend(loaded, tokenizer=tokenizer, image_processor=image_processor, labels=labels)


def _saved_image_processor(folder: Path) -> Any:
    """The folder's image processor, or None (then the server takes pixels as 'array' only)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError):
        return None


def pad_right(rows: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray, List[int]]:
    """Rows of token ids padded on the right with 0 (masked): (B, N) ids, (B, N) mask, true lengths."""
    lengths = [len(row) for row in rows]
    ids = np.zeros((len(rows), max(lengths)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, :len(row)], mask[b, :len(row)] = row, 1
    return ids, mask, lengths


def png_base64(pixels: np.ndarray) -> str:
    """(H, W, 3) floats in [0, 1] as a base64 PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class Backend:
    """One served model. ``spec`` describes its inputs for the checks; ``run`` answers a group of
    requests that share the route, the method and the shape of their targets."""

    spec: ModelSpec
    labels: Optional[Sequence[str]] = None
    tokenizer: Any = None

    def describe(self) -> Dict[str, Any]:
        spec = self.spec
        return {"kind": spec.kind, "methods": list(spec.methods), "default_method": spec.default_method,
                "classes": spec.num_classes, "input": list(spec.image_shape) if spec.image_shape else None,
                "text": spec.tokenizer, "model": self.name}

    def check(self, request: Request) -> None:
        """Checks that need the model, before batching (a refused request never joins a batch):
        a text's token count (tokenised once, here)."""
        if request.field == "text":
            request.prepared = self._token_ids(request)

    def run(self, requests: List[Request]) -> List[Dict[str, Any]]:
        raise NotImplementedError

    # ---- shared by the backends ----

    def _token_ids(self, request: Request) -> np.ndarray:
        if request.field == "array":
            return request.value
        if request.prepared is not None:
            return request.prepared
        encoded = self.tokenizer(request.value)
        ids = np.asarray(encoded["input_ids"], dtype=np.int64).reshape(-1)
        check_tokens(len(ids), self.spec)
        # a tokenizer whose vocabulary is larger than the model's
        if self.spec.vocab_size and ids.size and int(ids.max()) >= self.spec.vocab_size:
            raise BadRequest("text", f"tokenises to id {int(ids.max())}, outside the model's vocabulary "
                             f"[0, {self.spec.vocab_size})")
        return ids

    def _padded(self, requests: List[Request]) -> Tuple[np.ndarray, np.ndarray, List[int]]:
        """Token ids padded on the right with 0 (masked): (B, N) ids, (B, N) mask, true lengths.
        relfast explains a padded sample as it is alone, so the batch does not change a map."""
        return pad_right([self._token_ids(r) for r in requests])

    def _tokens(self, ids: np.ndarray) -> Optional[List[str]]:
        if self.tokenizer is None:
            return None
        return [str(t) for t in self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])]

    def _answer(self, logits: np.ndarray) -> Dict[str, Any]:
        """What /predict returns for one sample's logits (also part of /explain's answer)."""
        predicted = int(np.argmax(logits))
        if self.spec.kind == "causal_lm":
            top = np.argsort(-logits, kind="stable")[:TOP_TOKENS]
            return {"predicted": predicted, "label": self._label(predicted),
                    "top": [{"id": int(i), "token": self._label(int(i)), "logit": float(logits[i])} for i in top]}
        return {"predicted": predicted, "label": self._label(predicted), "logits": logits.astype(float).tolist()}

    def _label(self, index: int) -> Optional[str]:
        if self.spec.kind == "causal_lm":
            return self.tokenizer.decode([index]) if self.tokenizer is not None else None
        if self.labels is not None and index < len(self.labels):
            return str(self.labels[index])
        return None

    def _overlays(self, request: Request, maps: np.ndarray) -> Union[str, List[str]]:
        """The map(s) over the picture the request sent (its own size), as base64 PNGs."""
        from .. import viz

        picture = request.value / 255.0 if request.field == "image" else request.value
        drawn = [png_base64(viz.overlay(picture, heat)) for heat in maps.reshape(-1, *maps.shape[-2:])]
        return drawn if isinstance(request.target, tuple) else drawn[0]


class TorchBackend(Backend):
    """A torch model explained in process by ``relfast.Explainer`` (one per method, built once)."""

    def __init__(self, model: Any, *, tokenizer: Any = None, image_processor: Any = None,
                 labels: Optional[Sequence[str]] = None, normalize: Optional[Callable] = None):
        import torch

        import relfast
        from relfast.explain import METHODS

        if not isinstance(model, torch.nn.Module):
            raise ModelLoadError(f"argument 'model' must be a torch.nn.Module, a path or None, got "
                                 f"{type(model).__name__}")
        if model.training:
            raise ModelLoadError(f"the model ({type(model).__name__}) is in training mode; call model.eval() "
                                 "before serving it")
        try:
            default = relfast.Explainer(model, "generic")
        except ValueError as error:
            raise ModelLoadError(_first_line(error)) from None
        self.model, self.name = model, type(model).__name__
        self.tokenizer, self.image_processor, self.normalize = tokenizer, image_processor, normalize
        self._explainers = {"generic": default}
        config = getattr(model, "config", None)
        needed = "image_size" if default.layout.is_vision else "vocab_size"
        if getattr(config, needed, None) is None:  # the input checks read the model's sizes from its config
            raise ModelLoadError(f"relfast serve takes HuggingFace models (a config with {needed}); "
                                 f"{self.name} has none: export it (relfast.export) and serve the file")
        causal = self.name.endswith(("ForCausalLM", "LMHeadModel"))
        if default.layout.is_vision:
            kind = "image"
            image_shape = self._image_shape(config)
            self.labels = labels if labels is not None else _config_labels(config)
            num_classes = int(config.num_labels)
            vocab, positions = None, None
        else:
            kind = "causal_lm" if causal else "text"
            image_shape = None
            self.labels = labels if labels is not None else _config_labels(config)
            vocab = int(config.vocab_size)
            num_classes = vocab if causal else int(config.num_labels)
            # learned absolute positions end there (rotary ones do not: Llama, Qwen2, Mistral)
            positions = getattr(config, "n_positions" if causal else "max_position_embeddings", None)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.spec = ModelSpec(kind=kind, methods=tuple(METHODS), default_method="generic", num_classes=num_classes,
                              image_shape=image_shape, vocab_size=vocab, max_positions=positions,
                              tokenizer=tokenizer is not None,
                              images=kind == "image" and (normalize is not None or image_processor is not None))

    def _image_shape(self, config: Any) -> Tuple[int, int, int]:
        size = config.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return int(config.num_channels), int(height), int(width)

    def explainer(self, method: str):
        if method not in self._explainers:
            import relfast

            try:
                self._explainers[method] = relfast.Explainer(self.model, method)
            except ValueError as error:
                raise BadRequest("method", _first_line(error)) from None
        return self._explainers[method]

    def check(self, request: Request) -> None:
        super().check(request)
        if request.route == "/explain":  # a method this model cannot take (the Explainer says why)
            self.explainer(request.method)

    # ---- inputs ----

    def _pixels(self, request: Request):
        import torch

        if request.field == "array":
            return torch.from_numpy(request.value)
        image = request.value  # (H, W, 3) uint8
        channels, height, width = self.spec.image_shape
        if self.image_processor is not None:  # the folder's own resize, crop and normalisation
            try:
                pixels = self.image_processor(images=image, return_tensors="pt",
                                              input_data_format="channels_last")["pixel_values"][0]
            except (ValueError, RuntimeError, TypeError) as error:
                raise BadRequest("image", f"the model's image processor cannot take this image ({_first_line(error)})"
                                 ) from None
            if tuple(pixels.shape) != (channels, height, width):
                raise BadRequest("image", f"the image processor made {tuple(pixels.shape)} pixels; the model takes "
                                 f"{(channels, height, width)}")
            return pixels.float()
        # as `relfast explain --image` reads images: [0, 1], bilinear to the model's size, then normalised
        pixels = torch.from_numpy(image).float().div(255.0).permute(2, 0, 1)
        if channels == 1:
            pixels = pixels.mean(0, keepdim=True)
        pixels = torch.nn.functional.interpolate(pixels[None], size=(height, width), mode="bilinear",
                                                 align_corners=False)[0]
        return self.normalize(pixels)

    def _inputs(self, requests: List[Request]):
        """The batch as the Explainer takes it, and each sample's token count (None for images)."""
        import torch

        if self.spec.is_image:
            pixels = torch.stack([self._pixels(r) for r in requests]).to(self.device, self.dtype)
            return pixels, [None] * len(requests)
        ids, mask, lengths = self._padded(requests)
        inputs = {"input_ids": torch.from_numpy(ids).to(self.device),
                  "attention_mask": torch.from_numpy(mask).to(self.device)}
        return inputs, lengths

    # ---- the calls ----

    def run(self, requests: List[Request]) -> List[Dict[str, Any]]:
        import torch

        inputs, lengths = self._inputs(requests)
        if requests[0].route == "/predict":
            with torch.no_grad():
                output = self.model(inputs) if torch.is_tensor(inputs) else self.model(**inputs)
            logits = output.logits if hasattr(output, "logits") else output
            if self.spec.kind == "causal_lm":  # the next-token logits at each sample's last real token
                logits = logits[torch.arange(len(lengths)), torch.tensor(lengths) - 1]
            logits = logits.float().cpu().numpy()
            return [self._answer(logits[b]) for b in range(len(requests))]
        target = _target_batch(requests)
        out = self.explainer(requests[0].method)(inputs, target=None if target is None else torch.tensor(target))
        logits = out.logits.float().cpu().numpy()
        relevance = out.relevance.float().cpu().numpy()
        explained = out.target.cpu().numpy()
        maps = out.image_map().float().cpu().numpy() if self.spec.is_image and not out.pixel_level else None
        answers = []
        for b, request in enumerate(requests):
            answer = self._answer(logits[b])
            answer["method"] = request.method
            answer["target"] = explained[b].tolist()
            row = relevance[b]
            if lengths[b] is not None:  # the sample's own tokens (the batch pads on the right)
                row = row[..., :lengths[b]]
                answer["tokens"] = self._tokens(inputs["input_ids"][b, :lengths[b]].cpu().numpy())
            answer["relevance"] = row.tolist()
            if self.spec.is_image:
                sample_map = relevance[b] if maps is None else maps[b]
                answer["image_map"] = sample_map.tolist()
                if request.overlay:
                    answer["overlay"] = self._overlays(request, sample_map)
            answers.append(answer)
        return answers


def _config_labels(config: Any) -> Optional[List[str]]:
    names = getattr(config, "id2label", None)
    if not names:
        return None
    return [str(names.get(i, names.get(str(i), i))) for i in range(len(names))]


def _target_batch(requests: List[Request]) -> Union[None, List[int], List[List[int]]]:
    """The group's targets as one Explainer target: None (each sample's prediction), (B,) or (B, K)."""
    if requests[0].target is None:
        return None
    return [list(r.target) if isinstance(r.target, tuple) else r.target for r in requests]


class ExportedBackend(Backend):
    """A file written by relfast.export: its method only, one target per request, its own input
    checks (the file's ValueError becomes the request's 4xx). Text needs ``tokenizer`` (else token
    ids as 'array'); images are taken as relfast's default model and HF ViT processors prepare
    them: [0, 1], bilinear to the file's size, (x - 0.5) / 0.5; other models get pixels as 'array'."""

    def _setup(self, spec: Dict[str, Any], tokenizer: Any, labels: Optional[Sequence[str]], name: str) -> None:
        self.file_spec, self.tokenizer, self.labels, self.name = spec, tokenizer, labels, name
        names = [entry["name"] for entry in spec["inputs"]]
        if len(spec.get("maps") or {}) > 1 or not (names == ["pixel_values"] or "input_ids" in names):
            raise ModelLoadError(f"{name} explains a model of two streams (model {spec.get('model')}); relfast serve "
                                 "takes exported image classifiers, sequence classifiers and causal LMs")
        self.input_names = names
        vision = spec.get("patch_grid") is not None
        causal = str(spec.get("model", "")).endswith(("ForCausalLM", "LMHeadModel"))
        image_shape = tuple(spec["inputs"][0]["shape"][1:]) if vision else None
        if vision and not all(isinstance(d, int) for d in image_shape):
            raise ModelLoadError(f"{name}: its pixel input has no fixed size ({image_shape})")
        self.spec = ModelSpec(kind="image" if vision else "causal_lm" if causal else "text", methods=(spec["method"],),
                              default_method=spec["method"], num_classes=int(spec["num_classes"]),
                              image_shape=image_shape, vocab_size=spec.get("vocab_size"),
                              max_positions=spec.get("max_positions"), tokenizer=tokenizer is not None,
                              images=vision, multi_target=False)

    def _feeds(self, requests: List[Request]) -> Tuple[Dict[str, np.ndarray], List[Optional[int]]]:
        if self.spec.is_image:
            return {"pixel_values": np.stack([self._pixels(r) for r in requests])}, [None] * len(requests)
        ids, mask, lengths = self._padded(requests)
        available = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feeds = {}
        for entry in self.file_spec["inputs"]:
            if entry["name"] not in available:
                raise ModelLoadError(f"{self.name} takes an input '{entry['name']}' relfast serve cannot make")
            feeds[entry["name"]] = available[entry["name"]].astype(np.int32 if entry["dtype"] == "int32" else np.int64)
        return feeds, lengths

    def _pixels(self, request: Request) -> np.ndarray:
        if request.field == "array":
            return request.value
        import torch  # only for the resize, as `relfast explain --image` does it (absent: send arrays)

        channels, height, width = self.spec.image_shape
        pixels = torch.from_numpy(request.value).float().div(255.0).permute(2, 0, 1)
        if channels == 1:
            pixels = pixels.mean(0, keepdim=True)
        pixels = torch.nn.functional.interpolate(pixels[None], size=(height, width), mode="bilinear",
                                                 align_corners=False)[0]
        return ((pixels - 0.5) / 0.5).numpy()

    def _call(self, feeds: Dict[str, np.ndarray], target: Optional[np.ndarray]):
        """(logits, relevance, explained target) as numpy."""
        raise NotImplementedError

    def run(self, requests: List[Request]) -> List[Dict[str, Any]]:
        feeds, lengths = self._feeds(requests)
        targets = _target_batch(requests)
        target = None if targets is None else np.asarray([t[0] if isinstance(t, list) else t for t in targets],
                                                         dtype=np.int64)
        logits, relevance, explained = self._call(feeds, target)
        answers = []
        for b, request in enumerate(requests):
            answer = self._answer(logits[b])
            if request.route == "/predict":
                answers.append(answer)
                continue
            answer["method"] = request.method
            answer["target"] = [int(explained[b])] if isinstance(request.target, tuple) else int(explained[b])
            row = relevance[b]
            if lengths[b] is not None:
                row = row[..., :lengths[b]]
                answer["tokens"] = self._tokens(feeds["input_ids"][b, :lengths[b]])
            answer["relevance"] = row.tolist()
            if self.spec.is_image:
                prefix, grid = int(self.file_spec["num_prefix_tokens"]), self.file_spec["patch_grid"]
                sample_map = relevance[b][..., prefix:].reshape(*grid)
                answer["image_map"] = sample_map.tolist()
                if request.overlay:
                    answer["overlay"] = self._overlays(request, sample_map)
            answers.append(answer)
        return answers


class OnnxBackend(ExportedBackend):
    """A ``.onnx`` file, run by relfast.runtime.OnnxExplainer (ONNX Runtime)."""

    def __init__(self, path: Path, *, tokenizer: Any = None, labels: Optional[Sequence[str]] = None):
        from ..runtime import OnnxExplainer

        try:
            self.session = OnnxExplainer(path)
        except (ValueError, FileNotFoundError) as error:
            raise ModelLoadError(_first_line(error)) from None
        self._setup(self.session.spec, tokenizer, labels, Path(path).name)

    def _call(self, feeds, target):
        outputs = self.session.run(feeds, target=target)
        return outputs["logits"], outputs["relevance"], outputs["explained_target"]


class ScriptBackend(ExportedBackend):
    """A TorchScript ``.pt`` file written by relfast.export.to_torchscript (its relfast:: ops loaded)."""

    def __init__(self, path: Path, *, tokenizer: Any = None, labels: Optional[Sequence[str]] = None):
        import torch

        import relfast.ops  # noqa: F401  (registers the relfast:: ops the file calls)

        try:
            with warnings.catch_warnings():  # torch.jit is deprecated for torch.export; relfast's files are TorchScript
                warnings.filterwarnings("ignore", message="`torch.jit.", category=FutureWarning)
                self.module = torch.jit.load(str(path), map_location="cpu")
            spec = json.loads(self.module.relfast_spec)
        except Exception as error:  # torch.jit raises RuntimeError and others for foreign archives
            raise ModelLoadError(f"{Path(path).name} is not a TorchScript file written by relfast export "
                                 f"({type(error).__name__}: {_first_line(error)})") from None
        self._setup(spec, tokenizer, labels, Path(path).name)

    def _call(self, feeds, target):
        import torch

        tensors = [torch.from_numpy(feeds[name]) for name in self.input_names]
        try:
            with torch.no_grad():
                logits, relevance, explained = self.module(
                    *tensors, target=None if target is None else torch.from_numpy(target))
        except torch.jit.Error as error:  # the file's own input checks: relfast's message is the last line
            last = str(error).strip().splitlines()[-1] if str(error).strip() else ""
            if "relfast (exported explainer)" in last:
                raise ValueError(last.split("ValueError: ")[-1]) from None
            raise
        return logits.float().numpy(), relevance.float().numpy(), explained.numpy()
