"""Model + explainer as one TorchScript file that keeps the fused ``relfast::`` ops.

Loadable by ``torch.jit.load`` (after ``import relfast``) and by C++ linked with the
``relfast_ops`` library (``CMakeLists.txt``; example: ``cpp/explain.cpp``).
"""
import json
import warnings
from pathlib import Path
from typing import Any, List, Optional, Union

import torch
from torch import Tensor

from ..explain.explainer import Explainer
from ..runtime import (MASK_EMPTY_MESSAGE, MASK_INPUTS, MASK_VALUES_MESSAGE, MAX_ABS_FLOAT_INPUT, SEQUENCE_MESSAGE,
                       index_limits)
from .graph import BATCH, SEQUENCE, check_flags, checked_path, trace

# Dynamic dimensions in the scripted checks: a negative id; every input shares its size.
_DIM_IDS = {BATCH: -1, SEQUENCE: -2}


def _dtype_text(dtype: torch.dtype) -> str:
    # TorchScript's dtypes are plain ints; name the common ones.
    for candidate, text in ((torch.float32, "float32"), (torch.float64, "float64"), (torch.float16, "float16"),
                            (torch.bfloat16, "bfloat16"), (torch.int64, "int64"), (torch.int32, "int32"),
                            (torch.uint8, "uint8"), (torch.bool, "bool")):
        if dtype == candidate:
            return text
    return "dtype code {}".format(dtype)


def _shape_text(shape: List[int]) -> str:
    parts: List[str] = []
    for d in shape:
        parts.append("B" if d == -1 else ("N" if d == -2 else str(d)))
    return "(" + ", ".join(parts) + ")"


def check_inputs(inputs: List[Tensor], names: List[str], dtypes: List[str], shapes: List[List[int]],
                 num_classes: int, max_abs: float) -> None:
    """Scripted checks of the inputs, the target last: dtype, rank, fixed sizes, the dynamic sizes
    (batch, sequence) they share, finite floats within ``max_abs``, and target classes in [-1, num_classes)."""
    sizes = [-1, -1]  # the dynamic sizes seen so far (-1 = none yet)
    for k in range(len(inputs)):
        x, shape = inputs[k], shapes[k]
        where = "relfast (exported explainer): input '" + names[k] + "'"
        if _dtype_text(x.dtype) != dtypes[k]:
            raise ValueError(where + " must be {}, got {}".format(dtypes[k], _dtype_text(x.dtype)))
        if x.dim() != len(shape):
            raise ValueError(where + " must have shape {}, got {}".format(_shape_text(shape), x.shape))
        for i in range(len(shape)):
            expected = shape[i]
            if expected >= 0 and x.size(i) != expected:
                raise ValueError(where + " must have shape {}, got {}".format(_shape_text(shape), x.shape))
            if expected < 0:
                slot = -expected - 1
                if sizes[slot] >= 0 and x.size(i) != sizes[slot]:
                    raise ValueError(where + " has shape {}, but an earlier input has size {} in that dimension "
                                     "(expected {})".format(x.shape, sizes[slot], _shape_text(shape)))
                sizes[slot] = x.size(i)
        if len(shape) > 0 and x.size(0) == 0:
            raise ValueError(where + " holds an empty batch; there is nothing to explain")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(where + " holds NaN or infinite values")
        if x.is_floating_point() and x.numel() > 0 and float(x.abs().max()) > max_abs:
            raise ValueError(where + " holds a value of magnitude {}; float inputs must lie within +-{} (normalised "
                             "pixels or embeddings are of order 1)".format(float(x.abs().max()), int(max_abs)))
    target = inputs[-1]
    if target.numel() > 0:
        low, high = int(target.min()), int(target.max())
        if num_classes < 0:  # CLIP: the text index of each image, within the batch
            if low < -1 or high >= target.size(0):
                raise ValueError("relfast (exported explainer): input 'target' holds text index {}, out of range for "
                                 "{} texts (-1 = the image's own text)".format(low if low < -1 else high,
                                                                              target.size(0)))
        elif low < -1 or high >= num_classes:
            bad = low if low < -1 else high
            raise ValueError("relfast (exported explainer): input 'target' holds class {}, out of range for a model "
                             "with {} classes [0, {}) (-1 = the predicted class)".format(bad, num_classes, num_classes))


def check_token_values(inputs: List[Tensor], names: List[str], sizes: List[int], messages: List[str],
                       masks: List[bool], sequence_input: int, max_positions: int, texts: List[str]) -> None:
    """Scripted checks of the text inputs' values, those of relfast.runtime with its messages
    (passed in: TorchScript formats no module-level string): indices within their embedding table
    [0, sizes[k]) (0: none), padding masks of 0s and 1s with a real token in every sample, and
    input ``sequence_input`` (-1: none) no longer than ``max_positions``. ``texts``: the sequence
    message, then the mask-values and all-padding messages."""
    if sequence_input >= 0 and inputs[sequence_input].size(1) > max_positions:
        raise ValueError("relfast (exported explainer): input '" + names[sequence_input] + "' "
                         + texts[0].format(inputs[sequence_input].size(1), max_positions))
    for k in range(len(sizes)):
        x = inputs[k]
        where = "relfast (exported explainer): input '" + names[k] + "' "
        if sizes[k] > 0 and x.numel() > 0:
            low, high = int(x.min()), int(x.max())
            if low < 0 or high >= sizes[k]:
                raise ValueError(where + messages[k].format(low if low < 0 else high, sizes[k], sizes[k]))
        if masks[k] and x.numel() > 0:
            if x.dtype != torch.bool:
                odd = x[(x != 0) & (x != 1)]
                if odd.numel() > 0:
                    if x.is_floating_point():
                        raise ValueError(where + texts[1].format(float(odd[0])))
                    raise ValueError(where + texts[1].format(int(odd[0])))
            empty = torch.nonzero(torch.logical_not((x != 0).any(dim=1))).flatten()
            if empty.numel() > 0:
                raise ValueError(where + texts[2].format(int(empty[0])))


def predicted_when_none(target: Optional[Tensor], first_input: Tensor) -> Tensor:
    """The scripted file's default target: -1 (the predicted class) for every sample."""
    if target is None:
        return torch.full([first_input.size(0)], -1, dtype=torch.long, device=first_input.device)
    return target


def to_torchscript(explainer: Explainer, example_inputs: Any, path: Union[str, Path], *,
                   dynamic_batch: Optional[bool] = None,
                   dynamic_sequence: Optional[bool] = None) -> Path:
    """Exports ``explainer`` (its model and method) to one TorchScript file.

    ``forward(*model inputs, target=None)`` returns ``(logits, relevance, explained_target)`` as
    :func:`relfast.export.to_onnx` does; the target is an int64 (B,) tensor (-1 = the predicted
    class), or left out (every sample's predicted class). Inputs are validated in the scripted
    code: the error reaches Python as ``torch.jit.Error`` whose last line is relfast's message
    naming the input (C++ sees a ``c10::Error``).
    The relfast ops stay ``relfast::`` calls (the fused kernels); the weights and the device are
    those of the model at export time. The input description is stored as the module's
    ``relfast_spec`` attribute (JSON string), and the parts C++ needs as ``relfast_input_names``,
    ``relfast_num_prefix_tokens`` and ``relfast_patch_grid`` (empty for text models).
    """
    path = checked_path(path, None, "to_torchscript")
    check_flags("to_torchscript", dynamic_batch=dynamic_batch, dynamic_sequence=dynamic_sequence)
    traced = trace(explainer, example_inputs, decompose=False, dynamic_batch=dynamic_batch,
                   dynamic_sequence=dynamic_sequence)
    graph = traced.graph
    spec = traced.spec
    nodes = graph.graph.find_nodes(op="placeholder")
    entries = spec["inputs"] + [spec["target"]]  # the placeholders' order: model inputs, then the target
    # `target` may be left out (None): every sample's predicted class, as in the ONNX runtime.
    target = nodes[-1]
    target.type, target.args = Optional[Tensor], (None,)
    with graph.graph.inserting_after(target):
        resolved = graph.graph.call_function(predicted_when_none, (target, nodes[0]))
    target.replace_all_uses_with(resolved, delete_user_cb=lambda user: user is not resolved)
    with graph.graph.inserting_after(resolved):
        checked = graph.graph.call_function(check_inputs, (nodes[:-1] + [resolved], [e["name"] for e in entries],
                                                           [e["dtype"] for e in entries],
                                                           [_script_shape(e["shape"]) for e in entries],
                                                           -1 if spec["target_kind"] == "text" else spec["num_classes"],
                                                           MAX_ABS_FLOAT_INPUT))
    # Text values, after the dtype and shape checks (so that they read the exported dtypes and shapes).
    names = [entry["name"] for entry in spec["inputs"]]
    limits, masks = index_limits(spec), [name in MASK_INPUTS for name in names]
    positions = spec["max_positions"] or 0
    sequence_input = names.index("input_ids") if positions and "input_ids" in names else -1
    if limits or any(masks) or sequence_input >= 0:
        with graph.graph.inserting_after(checked):
            graph.graph.call_function(check_token_values, (
                nodes[:-1], names, [limits[n][0] if n in limits else 0 for n in names],
                [limits[n][1] if n in limits else "" for n in names], masks, sequence_input, positions,
                [SEQUENCE_MESSAGE, MASK_VALUES_MESSAGE, MASK_EMPTY_MESSAGE]))
    # The weights become buffers detached from the user's parameters: the backward is explicit ops
    # in the graph, so autograd has nothing to record when the file runs.
    for name, value in list(graph.named_parameters(recurse=False)):
        delattr(graph, name)
        graph.register_buffer(name, value.detach())
    # TorchScript resolves overload packets (not overloads) and has no sym_size.
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.sym_size.int:
            node.target = torch.ops.aten.size
        elif isinstance(node.target, torch._ops.OpOverload):
            node.target = node.target.overloadpacket
    graph.recompile()
    # Plain attributes for C++ users (cpp/explain.cpp reads them) and the full description.
    type(graph).__annotations__ = {**getattr(type(graph), "__annotations__", {}), "relfast_patch_grid": List[int]}
    graph.relfast_spec = json.dumps(spec)
    graph.relfast_input_names = [entry["name"] for entry in spec["inputs"]]
    graph.relfast_num_prefix_tokens = int(spec["num_prefix_tokens"])
    graph.relfast_patch_grid = list(spec["patch_grid"] or [])
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, but C++ loads TorchScript
        warnings.filterwarnings("ignore", message="`torch.jit.", category=FutureWarning)
        # about torch.fx.GraphModule's own __init__, which is not scripted
        warnings.filterwarnings("ignore", message="The TorchScript type system doesn't support instance-level")
        scripted = torch.jit.script(graph)
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(path))
    return path


def _script_shape(shape: List[Any]) -> List[int]:
    return [d if isinstance(d, int) else _DIM_IDS[d] for d in shape]
