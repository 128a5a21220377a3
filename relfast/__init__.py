"""relfast: fast, batched, exportable gradient-weighted attention relevance for transformers.

``relfast.ops`` holds the documented wrappers of the ``torch.ops.relfast`` operators (importing
it loads the compiled ``relfast._C`` library, which registers them), ``relfast.reference`` their
plain-PyTorch definitions; ``relfast.Explainer`` explains models; ``relfast.export`` writes a
model and its explainer as one ONNX or TorchScript file.

Everything loads on first use: ``import relfast`` alone imports neither torch nor the kernels,
so the command line answers ``--help`` and flag mistakes at once. Where torch is not installed
(a serving image), ``relfast.runtime`` runs exported ONNX files with numpy and onnxruntime.
"""
__version__ = "0.1.0"

__all__ = ["ops", "reference", "Explainer", "Explanation", "TokenLayout", "viz", "data", "models", "export", "runtime",
           "eval"]
_SUBMODULES = frozenset({"ops", "reference", "viz", "data", "models", "explain", "export", "runtime", "eval", "cli", "serve"})
_FROM_EXPLAIN = frozenset({"Explainer", "Explanation", "TokenLayout"})


def __getattr__(name):
    import importlib

    if name in _FROM_EXPLAIN:
        return getattr(importlib.import_module(".explain", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'relfast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
