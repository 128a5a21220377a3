"""Model + explainer as one ONNX graph, runnable by any ONNX Runtime build."""
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..explain.explainer import Explainer
from ..runtime import METADATA_KEY  # the runtime reads what this writes (it imports no torch)
from .graph import BATCH, SEQUENCE, check_flags, checked_path, trace

MIN_OPSET = 18  # torch.onnx's exporter writes opset 18 or newer (older requests are converted, often failing)


class _QuietEmptyIndexList(logging.Filter):
    """Drops onnx_ir's "Attribute type is ambiguous because it is an empty sequence ... Defaulted to
    INTS": onnxscript's aten.index_put lowering writes the dimensions left unindexed as an untyped
    int list, empty when every dimension is indexed (``x[rows, cols] = 1``, the backward of
    ``x[rows, cols]``). relfast's one-hot seeds and transformers' own code (CLIP's text pooling) do
    that, so it cannot be avoided; INTS is the list's type, so the message is harmless."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Attribute type is ambiguous because it is an empty sequence")


def _check_float32(explainer: Explainer) -> None:
    """ONNX files are written for float32 models: in other dtypes ONNX Runtime's CPU provider cannot
    run the graph (seen: float64 has no Erf kernel, float16 no ScatterElements with reduction 'add',
    bfloat16 not even Add; the generic method's graphs mix float32 into them and fail to load)."""
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in explainer.model.parameters() if p.is_floating_point()})
    if dtypes and dtypes != ["float32"]:
        raise ValueError(f"relfast.export.to_onnx: the {type(explainer.model).__name__} model's parameters are "
                         f"{', '.join(dtypes)}; ONNX export takes float32 models (in other dtypes ONNX Runtime cannot "
                         "run the graph): export model.float(), or use relfast.export.to_torchscript, which keeps "
                         "the model's dtype")


def to_onnx(explainer: Explainer, example_inputs: Any, path: Union[str, Path], *,
            dynamic_batch: Optional[bool] = None, dynamic_sequence: Optional[bool] = None,
            opset_version: Optional[int] = None, check: bool = True) -> Path:
    """Exports ``explainer`` (its model and method) to one ONNX file.

    The graph takes the model inputs (``pixel_values``; or ``input_ids``, ``attention_mask``, ...:
    the tensors of ``example_inputs``, in their order) and ``target`` (int64 (B,), -1 = the
    predicted class), and returns ``logits`` (B, C), ``relevance`` (float32 (B, N), or (B, N, N)
    with ``full_matrix``) and ``explained_target`` (the classes explained); two-stream models add
    their other maps and outputs (CLIP: ``text_relevance``, ``target`` = the text index of each
    image; DETR: ``queries_relevance``, ``class_logits``, ``pred_boxes``, ``target`` = query
    indices, ``logits`` (B, Q) each query's best real-class logit). The relfast ops are decomposed
    into standard ONNX ops through their ``relfast.reference`` definitions, so no custom-op library
    is needed. The input description used by :class:`relfast.runtime.OnnxExplainer` to validate
    inputs is stored in the model's metadata (key ``"relfast"``, JSON).

    Args:
        explainer: a ``relfast.Explainer`` of a float32 model (method ``generic``, ``rollout``,
            ``raw_attention``, ``attn_gradcam``, ``transformer_attribution`` or ``attnlrp``;
            ``full_matrix`` and ``aggregate`` are kept).
        example_inputs: a tensor or a dict of tensors as the explainer takes them; any batch size.
        path: the .onnx file to write (its folder is created if missing).
        dynamic_batch: the batch size is free (default; DETR: fixed, its position embeddings are
            cached by shape); False fixes it to the example's.
        dynamic_sequence: text models: the sequence length is free (default for text).
        opset_version: ONNX opset, >= 18 (default: the exporter's).
        check: run ``onnx.checker`` on the written file.

    Returns:
        the path written.
    """
    import onnx

    path = checked_path(path, ".onnx", "to_onnx")
    check_flags("to_onnx", dynamic_batch=dynamic_batch, dynamic_sequence=dynamic_sequence, check=check)
    if opset_version is not None and (isinstance(opset_version, bool) or not isinstance(opset_version, int)
                                      or opset_version < MIN_OPSET):
        raise ValueError(f"relfast.export.to_onnx: argument 'opset_version' must be an int >= {MIN_OPSET} (the "
                         f"exporter's oldest opset) or None, got {opset_version!r}")
    if isinstance(explainer, Explainer):  # else trace names the argument
        _check_float32(explainer)
    traced = trace(explainer, example_inputs, decompose=True, dynamic_batch=dynamic_batch,
                   dynamic_sequence=dynamic_sequence)
    dims = {BATCH: torch.export.Dim(BATCH, min=1), SEQUENCE: torch.export.Dim(SEQUENCE, min=2)}

    def dynamic(shape):
        return {i: dims[d] for i, d in enumerate(shape) if isinstance(d, str)} or None

    dynamic_shapes = [dynamic(entry["shape"]) for entry in traced.spec["inputs"]]
    dynamic_shapes.append(dynamic(traced.spec["target"]["shape"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    traced.graph.eval()  # the graph has no training behaviour; this silences the exporter's warning
    quiet, ir_logger = _QuietEmptyIndexList(), logging.getLogger("onnx_ir._convenience")
    ir_logger.addFilter(quiet)  # for this export only
    try:
        with warnings.catch_warnings():
            # The exporter names each dynamic axis once; inputs sharing "batch" make it warn about that.
            warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
            program = torch.onnx.export(traced.graph, traced.example_args, dynamo=True,
                                        input_names=traced.input_names, output_names=traced.spec["outputs"],
                                        dynamic_shapes=tuple(dynamic_shapes), opset_version=opset_version,
                                        verbose=False)
    finally:
        ir_logger.removeFilter(quiet)
    program.model.metadata_props[METADATA_KEY] = json.dumps(traced.spec)
    program.save(str(path))
    if check:
        onnx.checker.check_model(str(path))
    return path
