"""Serving exported explainers with ONNX Runtime: numpy in, numpy out, no PyTorch needed.

    sess = relfast.runtime.OnnxExplainer("model_explained.onnx")
    logits, relevance = sess(pixel_values)            # target optional: -1 / None = predicted class

This module imports only numpy and onnxruntime (``relfast`` itself imports without torch when
torch is absent), so a production image needs neither PyTorch nor the relfast kernels. Inputs are
validated against the description :func:`relfast.export.to_onnx` stored in the file before ONNX
Runtime sees them: a ``ValueError`` names the input and what was expected.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

METADATA_KEY = "relfast"
# Float model inputs (pixels, embeddings) are of order 1 once normalised. Far beyond that, float32
# arithmetic inside the model overflows: eager LayerNorm turns it into NaN (refused), while ONNX
# Runtime's fused LayerNorm returns finite but wrong maps (both seen from 1e20 on the demo ViT).
# This bound, far below either failure, is applied by every entry point (the eager explainer and
# the exported files import it from here: this module stays one file that needs no torch).
MAX_ABS_FLOAT_INPUT = 1e6
_NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64, "int32": np.int32,
                 "int64": np.int64}
# Text inputs whose values index one of the model's embedding tables (out of range, the runtime
# fails inside with an indexing error): name -> (spec key of the table's size, message formatted
# with the value, the size and the size again). The messages say what the eager explainer says, and
# relfast.export.to_torchscript builds its file's checks from these, so every entry point refuses
# the same values with the same words.
INDEX_INPUTS = {
    "input_ids": ("vocab_size", "holds token id {}, outside the model's vocabulary [0, {})"),
    "token_type_ids": ("type_vocab_size", "holds {}, outside the model's {} token types [0, {})"),
    "position_ids": ("max_positions", "holds {}, outside the model's {} positions [0, {})"),
}
# Padding masks: 0 = padding, 1 = a real token (other values would weight tokens), and at least one
# real token per sample (an all-padding sample has nothing to explain). Messages: the odd value; the sample.
MASK_INPUTS = ("attention_mask",)
MASK_VALUES_MESSAGE = "must hold only 0 (padding) and 1 (real), got {}"
MASK_EMPTY_MESSAGE = "is all zeros for sample {}; every sample needs at least one real token"
SEQUENCE_MESSAGE = "holds sequences of {} tokens; the model has {} positions"


def index_limits(spec: Dict[str, Any]) -> Dict[str, Tuple[int, str]]:
    """The index inputs of an exported file with a known table: name -> (table size, message)."""
    limits = {}
    for name, (key, message) in INDEX_INPUTS.items():
        size = spec.get(key)
        if size and name in [entry["name"] for entry in spec["inputs"]]:
            limits[name] = (int(size), message)
    return limits


def default_providers() -> List[str]:
    """ONNX Runtime's CUDA provider when this onnxruntime has it and an NVIDIA GPU is present,
    else the CPU provider."""
    import onnxruntime as ort

    has_gpu = os.path.exists("/dev/nvidiactl")  # the NVIDIA driver's control device
    if "CUDAExecutionProvider" in ort.get_available_providers() and has_gpu:
        if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* pip packages, if installed
            ort.preload_dlls()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _shape_text(shape: Sequence[Any]) -> str:
    return "(" + ", ".join("B" if d == "batch" else "N" if d == "sequence" else str(d) for d in shape) + ")"


class OnnxExplainer:
    """Runs a model + explainer file written by :func:`relfast.export.to_onnx`.

    Args:
        path: the .onnx file.
        providers: ONNX Runtime execution providers (default: :func:`default_providers`).
        session_options: an ``onnxruntime.SessionOptions`` (e.g. thread counts).

    Attributes:
        spec: the stored description (method, inputs, classes, patch grid, ...).
        input_names: the model inputs, in call order (the target comes after them).
        providers: the providers the session actually uses.
    """

    def __init__(self, path: Union[str, Path], providers: Optional[Sequence[Any]] = None, session_options=None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"relfast.runtime.OnnxExplainer: no file at {path}")
        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.log_severity_level = 3  # keep provider fallbacks quiet; errors still raise
        where = "relfast.runtime.OnnxExplainer: argument 'path'"
        try:
            self.session = ort.InferenceSession(str(path), session_options,
                                                providers=list(providers) if providers else default_providers())
        except Exception as error:  # ORT raises its own types (InvalidProtobuf, Fail, ...) for unreadable files
            if path.stat().st_size == 0:
                raise ValueError(f"{where}: {path} is empty, not an ONNX model") from None
            first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise ValueError(f"{where}: {path} is not a readable ONNX model ({first_line})") from None
        stored = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if stored is None:
            raise ValueError(f"{where}: {path} was not written by relfast.export.to_onnx (no '{METADATA_KEY}' "
                             "metadata); run plain models with onnxruntime directly")
        try:
            self.spec: Dict[str, Any] = json.loads(stored)
            self.input_names = [entry["name"] for entry in self.spec["inputs"]]
            int(self.spec["num_classes"])
            self._index_limits = index_limits(self.spec)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{where}: the '{METADATA_KEY}' metadata of {path} is damaged ({type(error).__name__}: "
                             f"{error}); export the model again with relfast.export.to_onnx") from None
        self.providers = self.session.get_providers()

    @property
    def num_classes(self) -> int:
        return int(self.spec["num_classes"])

    def __call__(self, *inputs: Any, target: Any = None) -> Tuple[np.ndarray, np.ndarray]:
        """``logits, relevance = sess(*model_inputs, target=None)``.

        Model inputs: numpy arrays in the order of ``input_names`` (e.g. ``pixel_values``), or one
        dict of them (what a tokenizer returns with ``return_tensors="np"``). ``target``: None or -1
        (the predicted class), an int for every sample, or a (B,) array of class indices.
        Returns float32 ``logits`` (B, C) and ``relevance`` (B, N) (CLS first; (B, N, N) for a
        full-matrix export).
        """
        outputs = self.run(*inputs, target=target)
        return outputs["logits"], outputs["relevance"]

    def run(self, *inputs: Any, target: Any = None) -> Dict[str, np.ndarray]:
        """As ``__call__``, returning every output by name: ``logits``, ``relevance`` and
        ``explained_target`` (the classes explained, (B,)); two-stream models add their other
        maps and outputs (``spec["maps"]`` names each map's output: CLIP ``text_relevance``, DETR
        ``queries_relevance``, ``class_logits``, ``pred_boxes``)."""
        feeds = self._feeds(inputs, target)
        values = self.session.run(None, feeds)
        outputs = {output.name: value for output, value in zip(self.session.get_outputs(), values)}
        for name in outputs:  # as the eager explainer: never a non-finite result
            if (name == "logits" or name.endswith("relevance")) and not np.isfinite(outputs[name]).all():
                raise ValueError(f"relfast.runtime.OnnxExplainer: the model's {name} overflowed to NaN or infinite "
                                 "values for these inputs; there is nothing meaningful to explain")
        return outputs

    def image_map(self, relevance: np.ndarray) -> np.ndarray:
        """Vision models: the patch map (B, h_p, w_p) of ``relevance`` (special tokens dropped)."""
        grid = self.spec.get("patch_grid")
        if grid is None:
            raise ValueError("relfast.runtime.OnnxExplainer.image_map: the exported model is not a vision model")
        prefix = int(self.spec["num_prefix_tokens"])
        return np.asarray(relevance)[..., prefix:].reshape(*np.shape(relevance)[:-1], *grid)

    # ---- validation ----

    def _feeds(self, inputs: Tuple[Any, ...], target: Any) -> Dict[str, np.ndarray]:
        where = "relfast.runtime.OnnxExplainer"
        if len(inputs) == 1 and isinstance(inputs[0], Mapping):
            given = dict(inputs[0])
            unknown = sorted(set(given) - set(self.input_names))
            missing = [n for n in self.input_names if n not in given]
            if unknown or missing:
                raise ValueError(f"{where}: the inputs dict must hold exactly {self.input_names}; "
                                 + (f"unexpected {unknown}" if unknown else "") + (" and " if unknown and missing else "")
                                 + (f"missing {missing}" if missing else ""))
            arrays = [given[n] for n in self.input_names]
        else:
            if len(inputs) != len(self.input_names):
                raise ValueError(f"{where}: expected {len(self.input_names)} model input(s) {self.input_names}, got "
                                 f"{len(inputs)}")
            arrays = list(inputs)
        dims: Dict[str, Tuple[int, str]] = {}  # dynamic dimension -> (size, input that set it)
        feeds = {}
        for entry, value in zip(self.spec["inputs"], arrays):
            feeds[entry["name"]] = self._checked(entry, value, dims)
        batch = dims["batch"][0] if "batch" in dims else int(self.spec["target"]["shape"][0])
        feeds[self.spec["target"]["name"]] = self._checked_target(target, batch)
        return feeds

    def _checked(self, entry: Dict[str, Any], value: Any, dims: Dict[str, Tuple[int, str]]) -> np.ndarray:
        name, shape, dtype = entry["name"], entry["shape"], np.dtype(_NUMPY_DTYPES[entry["dtype"]])
        where = f"relfast.runtime.OnnxExplainer: input '{name}'"
        if not isinstance(value, np.ndarray):
            if type(value).__module__.startswith("torch"):
                raise ValueError(f"{where} must be a numpy array, got a torch tensor (use .numpy())")
            raise ValueError(f"{where} must be a numpy array, got {type(value).__name__}")
        if value.dtype != dtype:
            raise ValueError(f"{where} must be {dtype}, got {value.dtype}")
        if value.ndim != len(shape):
            raise ValueError(f"{where} must have shape {_shape_text(shape)}, got {value.shape}")
        for axis, (expected, size) in enumerate(zip(shape, value.shape)):
            if isinstance(expected, int) and size != expected:
                raise ValueError(f"{where} must have shape {_shape_text(shape)}, got {value.shape} (dimension {axis} "
                                 f"must be {expected}{', the image size of the model' if self._is_image(entry) else ''})")
            if isinstance(expected, str):
                if expected in dims and dims[expected][0] != size:
                    raise ValueError(f"{where} has shape {value.shape}, but input '{dims[expected][1]}' has {expected} "
                                     f"size {dims[expected][0]}")
                dims.setdefault(expected, (size, name))
        if shape and shape[0] == "batch" and value.shape[0] == 0:
            raise ValueError(f"{where} holds an empty batch; there is nothing to explain")
        if np.issubdtype(dtype, np.floating) and value.size:
            if not np.isfinite(value).all():
                raise ValueError(f"{where} holds NaN or infinite values")
            largest = float(np.abs(value).max())
            if largest > MAX_ABS_FLOAT_INPUT:  # as the eager explainer: ORT would return wrong, finite maps
                raise ValueError(f"{where} holds a value of magnitude {largest:.3g}; float inputs must lie within "
                                 f"±{MAX_ABS_FLOAT_INPUT:g} (normalised pixels or embeddings are of order 1; far "
                                 "larger ones overflow inside the model)")
        positions = self.spec.get("max_positions")
        if name == "input_ids" and positions and value.ndim == 2 and value.shape[1] > positions:
            raise ValueError(f"{where} " + SEQUENCE_MESSAGE.format(value.shape[1], positions))
        if name in self._index_limits and value.size:
            size, message = self._index_limits[name]
            low, high = int(value.min()), int(value.max())
            if low < 0 or high >= size:
                raise ValueError(f"{where} " + message.format(low if low < 0 else high, size, size))
        if name in MASK_INPUTS and value.ndim == 2 and value.size:
            if value.dtype != np.bool_:
                odd = value[(value != 0) & (value != 1)]
                if odd.size:
                    raise ValueError(f"{where} " + MASK_VALUES_MESSAGE.format(odd[0].item()))
            empty = np.flatnonzero(~value.astype(bool).any(axis=1))
            if empty.size:
                raise ValueError(f"{where} " + MASK_EMPTY_MESSAGE.format(int(empty[0])))
        return np.ascontiguousarray(value)

    def _is_image(self, entry: Dict[str, Any]) -> bool:
        return self.spec.get("patch_grid") is not None and len(entry["shape"]) == 4

    def _checked_target(self, target: Any, batch: int) -> np.ndarray:
        where = "relfast.runtime.OnnxExplainer: argument 'target'"
        if target is None:
            return np.full((batch,), -1, dtype=np.int64)
        if isinstance(target, (bool, np.bool_)):
            raise ValueError(f"{where} must be a class index, got a bool")
        if isinstance(target, (int, np.integer)):
            values = np.full((batch,), int(target), dtype=np.int64)
        else:
            values = np.asarray(target)
            if not np.issubdtype(values.dtype, np.integer):
                raise ValueError(f"{where} must hold integer class indices, got {values.dtype}")
            if values.shape != (batch,):
                raise ValueError(f"{where} must be an int or have shape ({batch},) (one class per sample), got "
                                 f"{values.shape}")
            values = values.astype(np.int64)
        kind = self.spec.get("target_kind", "class")
        limit = batch if kind == "text" else self.num_classes
        if values.size and (values.min() < -1 or values.max() >= limit):
            bad = values.min() if values.min() < -1 else values.max()
            if kind == "text":
                raise ValueError(f"{where} holds text index {bad}, out of range for {batch} texts (-1 = the image's "
                                 "own text)")
            unit, units = ("query", "queries") if kind == "query" else ("class", "classes")
            raise ValueError(f"{where} holds {unit} {bad}, out of range for a model with {limit} {units} [0, {limit}) "
                             f"(-1 = the predicted {unit})")
        return values
