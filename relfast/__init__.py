"""relfast: fast, batched, exportable gradient-weighted attention relevance for transformers.

Importing the package loads the compiled ``relfast._C`` library, which registers the
``torch.ops.relfast`` operators; ``relfast.ops`` holds their documented wrappers and
``relfast.reference`` their plain-PyTorch definitions; ``relfast.Explainer`` explains models;
``relfast.export`` writes a model and its explainer as one ONNX or TorchScript file.

Where torch is not installed (a serving image), only ``relfast.runtime`` is available: it runs
exported ONNX files with numpy and onnxruntime.
"""
__version__ = "0.1.0"

try:
    import torch  # noqa: F401  (the extension links against torch's libraries)
except ImportError:  # serving without PyTorch: relfast.runtime only
    __all__ = ["runtime"]
else:
    from . import _C  # noqa: F401  (registers the relfast:: operators)
    from . import data, models, ops, reference, viz  # matplotlib and transformers load lazily
    from .explain import Explainer, Explanation, TokenLayout

    __all__ = ["ops", "reference", "Explainer", "Explanation", "TokenLayout", "viz", "data", "models", "export", "runtime",
               "eval"]


def __getattr__(name):  # relfast.export / .runtime / .eval load on first use (onnx, scikit-image lazily)
    if name in ("export", "runtime", "eval"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'relfast' has no attribute {name!r}")
