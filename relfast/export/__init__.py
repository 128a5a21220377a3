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

__all__ = ["to_onnx", "to_torchscript", "trace", "TracedExplanation"]
