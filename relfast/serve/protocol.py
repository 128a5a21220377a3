"""What a request to ``relfast serve`` may hold, and every check on it, in one place.

No model code and no Ray here: numpy, PIL and the standard library, so the checks run (and are
tested) without a model. A request that fails a check is a :class:`BadRequest` naming its field;
the deployment turns it into a 4xx whose JSON body is ``{"error": "field 'x': ...", "field": "x"}``.

Requests (JSON objects; exactly one input field):
    POST /predict  {"image": BASE64_PNG_OR_JPEG} | {"text": "..."} | {"array": NESTED_LIST}
    POST /explain  the same, plus "method" (default: the server's), "target" (a class index, a
                   causal LM's token id, or a list of them: one map each) and "overlay" (true:
                   also a PNG of the map over the image; image models only)
``array``: an image model's input as the model takes it, (C, H, W) normalised floats; a text
model's token ids, a flat list of ints.
"""
import base64
import binascii
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import numpy as np

# one place for the bound every relfast entry point applies to float inputs (runtime.py needs no torch)
from ..runtime import MAX_ABS_FLOAT_INPUT
from . import DEFAULT_MAX_BYTES

ROUTES = ("/predict", "/explain")
INPUT_FIELDS = ("image", "text", "array")
EXPLAIN_FIELDS = ("method", "target", "overlay")
# A decoded image is held as (H, W, 3) bytes before it is resized: 4096 x 4096 is 48 MiB, and a
# small compressed file can claim far more (a decompression bomb), so the header's size is checked first.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_TARGETS = 16  # K targets cost K backwards; more is a batch job, not a request
IMAGE_FORMATS = ("PNG", "JPEG")


class BadRequest(Exception):
    """A request the server refuses: ``status`` (4xx), the ``field`` at fault, one line of why."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"field '{field}': {message}")
        self.field, self.message, self.status = field, message, status

    @property
    def line(self) -> str:
        return str(self)

    def payload(self) -> dict:
        return {"error": self.line, "field": self.field}


@dataclass(frozen=True)
class ModelSpec:
    """What the served model takes, for the checks (filled in by relfast.serve.backend).

    kind: "image", "text" (a sequence classifier) or "causal_lm".
    methods: the methods the server answers; default_method: the one a request without "method" gets.
    num_classes: what a target indexes (classes; a causal LM's vocabulary).
    image_shape: (C, H, W) of an image model's input; None for text.
    vocab_size, max_positions: a text model's token-id range and length limit (None: no limit).
    tokenizer: text models: whether "text" can be tokenised (else token ids in "array" only).
    images: image models: whether "image" can be prepared (else pixels in "array" only).
    multi_target: whether a request may ask for several targets (exported files take one).
    """

    kind: str
    methods: Tuple[str, ...]
    default_method: str
    num_classes: int
    image_shape: Optional[Tuple[int, int, int]] = None
    vocab_size: Optional[int] = None
    max_positions: Optional[int] = None
    tokenizer: bool = False
    images: bool = True
    multi_target: bool = True

    @property
    def is_image(self) -> bool:
        return self.kind == "image"


Target = Union[None, int, Tuple[int, ...]]


@dataclass
class Request:
    """One parsed, checked request. ``value``: image (H, W, 3) uint8; text str; array numpy
    (float32 (C, H, W) pixels or int64 (N,) token ids)."""

    route: str
    field: str
    value: Any
    method: Optional[str] = None
    target: Target = None
    overlay: bool = False
    prepared: Any = None  # what the backend made of the value before batching (a text's token ids)

    @property
    def target_shape(self) -> Any:
        """What the batch groups by: requests that take the same target form one Explainer call."""
        if self.target is None:
            return None
        return "one" if isinstance(self.target, int) else len(self.target)


def route_of(path: str, root_path: str = "") -> str:
    """The route below the application's prefix ("/" + the rest), without a trailing slash."""
    if root_path and path.startswith(root_path):
        path = path[len(root_path):]
    path = "/" + path.strip("/")
    return path


def check_size(length: int, max_bytes: int) -> None:
    if length > max_bytes:
        raise BadRequest("body", f"is {length} bytes, over this server's limit of {max_bytes} bytes (--max-bytes)",
                         status=413)


def parse(route: str, body: bytes, spec: ModelSpec, max_bytes: int = DEFAULT_MAX_BYTES) -> Request:
    """The request of ``body`` to ``route`` ("/predict" or "/explain"), checked against ``spec``."""
    check_size(len(body), max_bytes)
    data = _json_object(body)
    allowed = INPUT_FIELDS + (EXPLAIN_FIELDS if route == "/explain" else ())
    for key in data:
        if key not in allowed:
            if route == "/predict" and key in EXPLAIN_FIELDS:
                raise BadRequest(key, "applies to /explain only (/predict returns the model's prediction)")
            raise BadRequest(key, f"is not a field of {route} requests (fields: {', '.join(allowed)})")
    given = [key for key in INPUT_FIELDS if key in data]
    if len(given) != 1:
        what = "none" if not given else " and ".join(f"'{key}'" for key in given)
        raise BadRequest("input", f"a request holds exactly one of 'image', 'text', 'array'; got {what}")
    field = given[0]
    value = {"image": _image, "text": _text, "array": _array}[field](data[field], spec)
    request = Request(route, field, value)
    if route == "/explain":
        request.method = _method(data.get("method"), spec)
        request.target = _target(data.get("target"), spec)
        request.overlay = _overlay(data.get("overlay", False), spec)
    return request


def check_tokens(count: int, spec: ModelSpec, field: str = "text") -> None:
    """A tokenised text's length, once the backend has tokenised it."""
    if count == 0:
        raise BadRequest(field, "holds no tokens for this model's tokenizer; there is nothing to explain")
    if spec.max_positions and count > spec.max_positions:
        raise BadRequest(field, f"holds {count} tokens; the model has {spec.max_positions} positions")


# ---- the body ----

def _json_object(body: bytes) -> dict:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRequest("body", f"is not UTF-8 text (byte {error.start})") from None
    if not text.strip():
        raise BadRequest("body", "is empty; send a JSON object such as {\"image\": \"<base64 PNG>\"}")
    try:
        # NaN and Infinity (not JSON, but Python writes them) parse as floats: the array check names them
        data = json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        raise BadRequest("body", f"is not valid JSON ({error.msg} at {where})") from None
    except RecursionError:
        raise BadRequest("body", "is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("body", f"must be a JSON object such as {{\"text\": \"...\"}}, got {_json_type(data)}")
    return data


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


# ---- the inputs ----

def _image(value: Any, spec: ModelSpec) -> np.ndarray:
    if not spec.is_image:
        raise BadRequest("image", "this model takes text: send " + ("'text' or token ids as 'array'" if spec.tokenizer
                                                                     else "token ids as 'array'"))
    if not spec.images:
        raise BadRequest("image", "this server has no image preprocessing for its model (no image processor saved "
                         "with it); send the model's input as 'array' (C, H, W)")
    if not isinstance(value, str):
        raise BadRequest("image", f"must be a base64 string of a PNG or JPEG file, got {_json_type(value)}")
    if value.startswith("data:"):  # a data URI: the payload follows the first comma
        value = value.partition(",")[2]
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image", "is not valid base64 (standard alphabet, with padding)") from None
    if not raw:
        raise BadRequest("image", "is empty")
    if not (raw.startswith(b"\x89PNG\r\n\x1a\n") or raw.startswith(b"\xff\xd8\xff")):
        raise BadRequest("image", f"is not a PNG or JPEG file (it starts with bytes {raw[:8].hex(' ')})")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.format not in IMAGE_FORMATS:
                raise BadRequest("image", f"is a {image.format} file; PNG or JPEG expected")
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise BadRequest("image", f"is {width}x{height} pixels, over the limit of {MAX_IMAGE_PIXELS} pixels")
            pixels = np.array(image.convert("RGB"))
    except BadRequest:
        raise
    except Exception as error:  # PIL raises several types for damaged files
        kind = "PNG" if raw.startswith(b"\x89") else "JPEG"
        raise BadRequest("image", f"is a damaged {kind} file ({type(error).__name__}: {_first_line(error)})") from None
    if min(pixels.shape[:2]) == 0:
        raise BadRequest("image", "has no pixels")
    return pixels


def _text(value: Any, spec: ModelSpec) -> str:
    if spec.is_image:
        raise BadRequest("text", "this model takes images: send 'image' (a base64 PNG or JPEG) or 'array' (C, H, W)")
    if not spec.tokenizer:
        raise BadRequest("text", "this server has no tokenizer for its model; send token ids as 'array'")
    if not isinstance(value, str):
        raise BadRequest("text", f"must be a string, got {_json_type(value)}")
    if not value.strip():
        raise BadRequest("text", "is empty; give the text to explain")
    return value


def _array(value: Any, spec: ModelSpec) -> np.ndarray:
    expected = (f"shape ({', '.join(map(str, spec.image_shape))}), the model's (C, H, W) input" if spec.is_image
                else "a flat list of token ids")
    if not isinstance(value, list):
        raise BadRequest("array", f"must be a nested list of numbers of {expected}, got {_json_type(value)}")
    shape = _nested_shape(value, expected)
    flat = _flatten(value, len(shape))
    if any(isinstance(v, bool) for v in flat):
        raise BadRequest("array", "holds booleans; numbers expected")
    odd = next((v for v in flat if not isinstance(v, (int, float))), None)
    if odd is not None:
        raise BadRequest("array", f"holds {_json_type(odd)}; numbers expected")
    if spec.is_image:
        if shape != tuple(spec.image_shape):
            raise BadRequest("array", f"has shape {shape}; expected {expected} (one image per request)")
        if not all(math.isfinite(v) for v in flat):
            raise BadRequest("array", "holds NaN or infinite values")
        largest = max((abs(v) for v in flat), default=0.0)
        if largest > MAX_ABS_FLOAT_INPUT:
            raise BadRequest("array", f"holds a value of magnitude {largest:.3g}; pixels must lie within "
                             f"±{MAX_ABS_FLOAT_INPUT:g} (normalised pixels are of order 1)")
        return np.asarray(flat, dtype=np.float32).reshape(shape)
    if len(shape) != 1:
        raise BadRequest("array", f"has shape {shape}; expected {expected} (one text per request)")
    if not all(isinstance(v, int) for v in flat):
        raise BadRequest("array", "holds non-integers; token ids are ints")
    check_tokens(len(flat), spec, "array")
    low, high = min(flat), max(flat)
    if spec.vocab_size and (low < 0 or high >= spec.vocab_size):
        bad = low if low < 0 else high
        raise BadRequest("array", f"holds token id {bad}, outside the model's vocabulary [0, {spec.vocab_size})")
    return np.asarray(flat, dtype=np.int64)


def _nested_shape(value: Any, expected: str) -> Tuple[int, ...]:
    """The shape of a rectangular nested list; a ragged one is refused."""
    shape = []
    level = value
    while isinstance(level, list):
        shape.append(len(level))
        if not level:
            break
        level = level[0]
    shape = tuple(shape)
    if 0 in shape:
        raise BadRequest("array", f"is empty (shape {shape}); expected {expected}")

    def check(node: Any, depth: int) -> None:
        if depth == len(shape):
            if isinstance(node, list):
                raise BadRequest("array", f"is ragged: lists nested to different depths; expected {expected}")
            return
        if not isinstance(node, list) or len(node) != shape[depth]:
            raise BadRequest("array", f"is ragged: nested lists of unequal lengths at depth {depth}; "
                             f"expected {expected}")
        for child in node:
            check(child, depth + 1)

    check(value, 0)
    return shape


def _flatten(value: Any, depth: int) -> list:
    flat = value
    for _ in range(depth - 1):
        flat = [item for sub in flat for item in sub]
    return flat


# ---- the options of /explain ----

def _method(value: Any, spec: ModelSpec) -> str:
    if value is None:
        return spec.default_method
    if not isinstance(value, str):
        raise BadRequest("method", f"must be a method name (a string), got {_json_type(value)}")
    if value not in spec.methods:
        raise BadRequest("method", f"{value!r} is not a method this server answers ({', '.join(spec.methods)})")
    return value


def _target(value: Any, spec: ModelSpec) -> Target:
    unit = "token id" if spec.kind == "causal_lm" else "class index"
    if value is None:
        return None
    if isinstance(value, list):
        if not value:
            raise BadRequest("target", f"is an empty list; give a {unit}, a list of them, or leave it out (the "
                             "prediction)")
        if len(value) > MAX_TARGETS:
            raise BadRequest("target", f"lists {len(value)} targets; at most {MAX_TARGETS} per request")
        if len(value) > 1 and not spec.multi_target:
            raise BadRequest("target", f"lists {len(value)} targets; this model (an exported file) explains one per "
                             "request")
        return tuple(_one_target(v, spec, unit) for v in value)
    return _one_target(value, spec, unit)


def _one_target(value: Any, spec: ModelSpec, unit: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest("target", f"must be a {unit} (an int) or a list of them, got {_json_type(value)} {value!r}")
    if not 0 <= value < spec.num_classes:
        what = "vocabulary" if spec.kind == "causal_lm" else "classes"
        raise BadRequest("target", f"{unit} {value} is out of range for the model's {spec.num_classes} {what} "
                         f"[0, {spec.num_classes})")
    return value


def _overlay(value: Any, spec: ModelSpec) -> bool:
    if not isinstance(value, bool):
        raise BadRequest("overlay", f"must be true or false, got {_json_type(value)}")
    if value and not spec.is_image:
        raise BadRequest("overlay", "applies to image models only (a text model's relevance is per token)")
    return value


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else "no message"
