"""The explanation as one traced graph: model forward, input-gradient backward and relevance.

``torch.export``/``torch.onnx.export`` cannot trace ``torch.autograd.grad`` (backward-saved
tensors become fake constants), so the joint forward + backward is traced with ``make_fx``, which
records the aten ops autograd actually runs, the streaming hooks' relfast ops included. The
resulting ``torch.fx.GraphModule`` takes the model inputs and a target and returns
``(logits, relevance, explained_target)``, then for models with several token streams the other
maps (``text_relevance``, ``queries_relevance``) and the family's own outputs (DETR:
``class_logits``, ``pred_boxes``); see ``relfast.export.onnx`` and ``relfast.export.torchscript``.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch._decomp import get_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

from .. import reference
from ..explain.attnlrp import written_out_attention
from ..explain.explainer import Explainer
from ..explain.methods import ATTENTION_METHODS
from ..explain.targets import Targets

OUTPUT_NAMES = ("logits", "relevance", "explained_target")
TARGET_NAME = "target"
BATCH, SEQUENCE = "batch", "sequence"

# relfast op -> its plain-PyTorch definition: graphs for runtimes without the relfast library.
REFERENCE_DECOMPOSITIONS = {getattr(torch.ops.relfast, name).default: getattr(reference, name)
                            for name in reference.__all__}
# ... plus the backward ops the ONNX exporter has no function for (SiLU's: the Llama, Qwen2 and
# Mistral MLPs), so that the decomposed graph holds only ops every ONNX runtime has.
PORTABLE_DECOMPOSITIONS = {**REFERENCE_DECOMPOSITIONS, **get_decompositions([torch.ops.aten.silu_backward])}


@dataclass
class TracedExplanation:
    """A traced explainer and what a runtime needs to know about its inputs.

    Attributes:
        graph: (*model inputs, target) -> (logits, relevance, explained_target).
        example_args: the arguments it was traced with (batch >= 2).
        spec: JSON-able description: method, inputs (name, dtype, shape with "batch"/"sequence"
            for dynamic dimensions), the target, outputs and model facts (classes, vocabulary,
            patch grid) used to validate inputs before running.
    """

    graph: torch.fx.GraphModule
    example_args: Tuple[Tensor, ...]
    spec: Dict[str, Any] = field(default_factory=dict)

    @property
    def input_names(self) -> List[str]:
        return [entry["name"] for entry in self.spec["inputs"]] + [TARGET_NAME]


def checked_path(path: Union[str, Path], suffix: str, writer: str) -> Path:
    """The file an exporter will write, checked before any tracing: not a folder, and with the
    format's suffix (``suffix`` ".onnx"; None: any suffix but ".onnx")."""
    where = f"relfast.export.{writer}: argument 'path'"
    if not isinstance(path, (str, Path)):
        raise ValueError(f"{where} must be a file path (str or pathlib.Path), got {type(path).__name__}")
    path = Path(path)
    example = "model" + (suffix or ".pt")
    if path.is_dir() or str(path).endswith(("/", "\\")):
        raise ValueError(f"{where} is a folder ({path}); give the file to write, e.g. {path / example}")
    if suffix and path.suffix.lower() != suffix:
        raise ValueError(f"{where} must end in {suffix}, got '{path.name}'")
    if not suffix and path.suffix.lower() in (".onnx", ""):
        raise ValueError(f"{where} must name a TorchScript file such as {example}, got '{path.name}'"
                         + (" (.onnx is what relfast.export.to_onnx writes)" if path.suffix else ""))
    return path


def check_flags(writer: str, **flags: Any) -> None:
    """Boolean options (None allowed where the option has an automatic default)."""
    for name, value in flags.items():
        if not (isinstance(value, bool) or (value is None and name in ("dynamic_sequence", "dynamic_batch"))):
            raise ValueError(f"relfast.export.{writer}: argument '{name}' must be True or False"
                             + (" (or None: automatic)" if name in ("dynamic_sequence", "dynamic_batch") else "")
                             + f", got {value!r}")


def _named_inputs(explainer: Explainer, example_inputs: Any) -> Dict[str, Tensor]:
    vision = explainer.layout.is_vision
    if isinstance(example_inputs, Tensor):
        return {"pixel_values" if vision else "input_ids": example_inputs}
    if isinstance(example_inputs, dict) or hasattr(example_inputs, "keys"):
        named = {k: v for k, v in dict(example_inputs).items() if isinstance(v, Tensor)}
        if named:
            return named
    raise ValueError("relfast.export: argument 'example_inputs' must be a tensor or a dict of tensors (what a HF "
                     f"processor/tokenizer returns), got {type(example_inputs).__name__}")


def _trace_batch(named: Dict[str, Tensor]) -> int:
    """A batch size >= 2 (0 and 1 would be specialised into the graph) that equals no other input
    dimension (make_fx gives equal sizes one symbol, which would tie them together)."""
    other_sizes = {s for t in named.values() for s in t.shape[1:]}
    return next(b for b in range(2, 64) if b not in other_sizes)


# Methods whose exported file matches the eager explainer (tests/test_export.py,
# tests/test_export_attnlrp.py). The plain-LRP baselines trace too, but ONNX Runtime's float32
# arithmetic moves their safe divisions by up to a few percent of the map. attnlrp takes the
# families its rules are written for (relfast.explain.attnlrp.check_family refuses the others when
# the explainer is made).
EXPORTABLE_METHODS = ATTENTION_METHODS + ("transformer_attribution", "attnlrp")


def _check_exportable(explainer: Explainer, named: Dict[str, Tensor], dynamic_sequence: bool) -> None:
    if explainer.method not in EXPORTABLE_METHODS:
        raise ValueError(f"relfast.export: method {explainer.method!r} is not exportable yet; exportable: "
                         f"{', '.join(EXPORTABLE_METHODS)}")
    if getattr(explainer._method, "layers", False):
        raise ValueError("relfast.export: the explainer's option layers=True (per-layer relevance) is not exportable "
                         "yet: the file returns the input relevance only; export an explainer made without it")
    if explainer.family.needs_callable_target:
        raise ValueError(f"relfast.export: the {type(explainer.model).__name__} model has no classification head; "
                         "its explanations need a callable target, which an exported graph cannot take")
    batches = {t.shape[0] if t.dim() else None for t in named.values()}
    if len(batches) != 1 or None in batches or 0 in batches:
        raise ValueError("relfast.export: argument 'example_inputs' must hold tensors with the same non-empty batch "
                         f"dimension, got shapes {[tuple(t.shape) for t in named.values()]}")
    if not explainer.family.exportable:
        raise ValueError(f"relfast.export: exporting a {type(explainer.model).__name__} explainer is not supported yet")
    if dynamic_sequence:
        for name, t in named.items():
            if not _is_text(t) and t.dim() == 2:
                continue
            if _is_text(t) and t.shape[1] < 2:
                raise ValueError(f"relfast.export: text input '{name}' must have shape (B, N) with N >= 2 for a "
                                 f"dynamic sequence length, got {tuple(t.shape)}")


def _explanation_function(explainer: Explainer, names: List[str], seen: Dict[str, Any]):
    """The traced function; ``seen`` receives the output names and the maps' layouts."""
    def explain(*args: Tensor):
        *model_args, target = args
        inputs = dict(zip(names, model_args)) if len(names) > 1 else model_args[0]
        # In the graph: -1 selects the predicted class (DETR: the best query; CLIP: text b for image b).
        # attnlrp's attention as plain ops (its fused-kernel backward has no ONNX or portable form)
        with written_out_attention():
            result = explainer._explain(inputs, Targets(graph_tensor=target), traced=True)
        extra_maps = {f"{name}_relevance": value for name, value in list(result.maps.items())[1:]}
        extra = {**extra_maps, **explainer.family.export_outputs(result.output)}
        seen["outputs"] = list(OUTPUT_NAMES) + list(extra)
        seen["maps"] = {name: output for name, output in zip(result.maps, ["relevance", *extra_maps])}
        seen["layouts"] = result.layouts
        return (result.scores, result.relevance, result.explained, *extra.values())

    return explain


def _is_text(t: Tensor) -> bool:
    """Token inputs (ids, masks, type ids): integer (B, N); their N is the sequence length."""
    return t.dim() == 2 and not t.dtype.is_floating_point


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def trace(explainer: Explainer, example_inputs: Any, *, decompose: bool, dynamic_batch: Optional[bool] = None,
          dynamic_sequence: Optional[bool] = None) -> TracedExplanation:
    """Traces ``explainer`` on ``example_inputs`` into one graph.

    Args:
        decompose: replace relfast ops by their ``relfast.reference`` definitions (for runtimes
            without the relfast library, e.g. ONNX), and the backward ops ONNX lacks by plain
            ones; else keep them as ``relfast::`` calls.
        dynamic_batch: the batch size stays a free dimension (else the example's is fixed);
            default True, except for DETR (its position embeddings are cached by shape).
        dynamic_sequence: text models: the sequence length stays free (default True for text).
    """
    if not isinstance(explainer, Explainer):
        raise ValueError(f"relfast.export: argument 'explainer' must be a relfast.Explainer, got "
                         f"{type(explainer).__name__}")
    named = _named_inputs(explainer, example_inputs)
    fixed_batch = explainer.family.fixed_batch_export
    if dynamic_batch and fixed_batch:
        raise ValueError(f"relfast.export: a {type(explainer.model).__name__} explainer exports with a fixed batch "
                         f"({fixed_batch}); pass dynamic_batch=False")
    dynamic_batch = not fixed_batch if dynamic_batch is None else dynamic_batch
    text = any(_is_text(t) for t in named.values())
    dynamic_sequence = text if dynamic_sequence is None else dynamic_sequence
    if dynamic_sequence and not text:
        raise ValueError("relfast.export: 'dynamic_sequence' applies to text models; a vision model's number of "
                         "tokens is fixed by its image size")
    _check_exportable(explainer, named, dynamic_sequence)
    # The example's values as the explainer checks a call's (finite, within range, token ids in
    # the vocabulary); the traced graph itself reads no values.
    try:
        explainer.family.check_values(explainer.family.parse(example_inputs if isinstance(example_inputs, Tensor)
                                                              else named))
    except ValueError as error:
        raise ValueError(f"relfast.export: argument 'example_inputs' is not a valid input of the explainer ({error})") \
            from None
    names = list(named)
    example_batch = next(iter(named.values())).shape[0]
    batch = _trace_batch(named) if dynamic_batch else example_batch
    rows = torch.arange(batch) % example_batch
    device = next(iter(named.values())).device
    args = tuple(t[rows.to(t.device)].contiguous() for t in named.values())
    args += (torch.full((batch,), -1, dtype=torch.long, device=device),)

    seen: Dict[str, Any] = {}
    explain = _explanation_function(explainer, names, seen)
    # fake, not real, tensors for fixed shapes: HF code then skips its value-dependent shortcuts
    graph = make_fx(explain, tracing_mode="symbolic" if dynamic_batch or dynamic_sequence else "fake",
                    _allow_non_fake_inputs=True,
                    decomposition_table=PORTABLE_DECOMPOSITIONS if decompose else None)(*args)
    # The exporter and TorchScript see the graph's own argument names.
    for node, name in zip(graph.graph.find_nodes(op="placeholder"), names + [TARGET_NAME]):
        node.name = node.target = name
    graph.recompile()

    def shape_of(t: Tensor) -> List[Any]:
        dims: List[Any] = list(t.shape)
        if dynamic_batch:
            dims[0] = BATCH
        if dynamic_sequence and _is_text(t):
            dims[1] = SEQUENCE
        return dims

    logits = graph.graph.output_node().args[0][0].meta["val"]  # the traced output's (fake) tensor
    first_layout = next(iter(seen["layouts"].values()))
    spec = {
        "format": "relfast-explained-model/1",
        "method": explainer.method,
        "full_matrix": explainer.full_matrix,
        "model": type(explainer.model).__name__,
        "inputs": [{"name": n, "dtype": _dtype_name(t.dtype), "shape": shape_of(t)} for n, t in named.items()],
        "target": {"name": TARGET_NAME, "dtype": "int64", "shape": [BATCH if dynamic_batch else batch],
                   "default": -1},
        "outputs": seen["outputs"],
        "maps": seen["maps"],
        "num_classes": int(logits.shape[-1]),
        "target_kind": explainer.family.target_kind,
        "vocab_size": explainer.family.vocab_size() if text else None,
        # the eager explainer's bound on token_type_ids, checked by the runtimes where the file takes them
        "type_vocab_size": getattr(getattr(explainer.model, "config", None), "type_vocab_size", None) if text else None,
        "max_positions": explainer.family.max_positions(),
        "num_prefix_tokens": first_layout.prefix_tokens,
        "patch_grid": list(first_layout.patch_grid) if first_layout.is_vision else None,
        "patch_size": list(first_layout.patch_size) if first_layout.patch_size else None,
    }
    return TracedExplanation(graph, args, spec)
