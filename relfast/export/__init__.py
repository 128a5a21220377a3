"""Exporters: a model and its explainer as one graph, served without Python hooks.

- :func:`to_onnx`: one ONNX file (relfast ops as standard ONNX ops) for any ONNX Runtime; run it
  with :class:`relfast.runtime.OnnxExplainer`, which needs only numpy and onnxruntime.
- :func:`to_torchscript`: one TorchScript file with the fused ``relfast::`` ops, for
  ``torch.jit.load`` and C++ (libtorch + ``relfast_ops``).

Both take the model inputs and a target (int64 (B,), -1 = the predicted class) and return
``(logits, relevance, explained_target)``; the batch (and, for text, the sequence length) is dynamic.
Causal LMs export the same way (``input_ids``, ``attention_mask``, left padding included): the
logits are the next-token logits at each sample's last real token and the target is a token id.
"""
from .graph import TracedExplanation, trace
from .onnx import to_onnx
from .torchscript import to_torchscript

__all__ = ["to_onnx", "to_torchscript", "trace", "TracedExplanation", "PARITY_LOGITS", "parity_relevance"]

PARITY_LOGITS = 1e-5  # largest relative error of an exported file's logits against the eager explainer


def parity_relevance(method: str, format: str) -> float:
    """The largest relative error (to the map's maximum) an exported file's relevance may show
    against the eager float32 explainer. 1e-4, except ONNX ``transformer_attribution``: its LRP
    pass amplifies float32 rounding (the sum rule splits relevance into large shares of opposite
    sign that cancel later), so ONNX Runtime's differently rounded convolution moves the map by up
    to ~1.5e-4 where eager float32 is itself ~1.5e-4 from float64; two such paths may differ by
    3e-4 (measured in tests/test_export.py::test_onnx_rounding_is_eager_float32s)."""
    return 3e-4 if format == "onnx" and method == "transformer_attribution" else 1e-4
