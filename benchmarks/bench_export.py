"""Serving an exported explainer: latency of one explanation call, batch 1 and 8, on the CPU, for
the embedded default model (64 px, 4 layers) and a ViT-B/16-shaped model (224 px, 12 layers,
hidden 768, random weights), one group per (model, batch) (``export-<model>-b<B>``):

* ``ort_plain``: ONNX Runtime running the plain model (``torch.onnx.export`` of the classifier,
  SDPA attention): production inference without explanation, the yardstick;
* ``ort_explain``: ONNX Runtime running the file from ``relfast.export.to_onnx`` (method
  "generic": logits and relevance in one call), through ``relfast.runtime.OnnxExplainer`` with
  its input validation;
* ``torchscript_explain``: the file from ``relfast.export.to_torchscript`` (fused relfast ops);
* ``eager_explain``: ``relfast.Explainer(model)(pixels)`` in PyTorch.

Each exported file is checked against the eager explainer before it is timed. Targets: ORT
explanation no slower than eager explanation and at most 2.5x ORT plain inference (the table at
the end of the session, conftest.py). Both runtimes use all cores (2 here).
"""
import numpy as np
import pytest
import torch

import relfast
import relfast.export
from relfast.runtime import OnnxExplainer

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")

BATCHES = (1, 8)
IMPLS = ("ort_plain", "ort_explain", "torchscript_explain", "eager_explain")
ROUNDS = {("default", 1): 50, ("default", 8): 30, ("vitb16", 1): 7, ("vitb16", 8): 3}


def build(name):
    if name == "default":
        return relfast.models.default_model()
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)).float().eval()


@pytest.fixture(scope="module", params=("default", "vitb16"))
def served(request, tmp_path_factory):
    """The model, its explainer and the three files, exported once per model."""
    name = request.param
    model = build(name)
    explainer = relfast.Explainer(model, "generic")
    folder = tmp_path_factory.mktemp(f"export-{name}")
    size = model.config.image_size
    example = torch.randn(1, 3, size, size)
    explained = OnnxExplainer(relfast.export.to_onnx(explainer, example, folder / "explained.onnx"),
                              providers=["CPUExecutionProvider"])
    script = torch.jit.load(str(relfast.export.to_torchscript(explainer, example, folder / "explained.pt")))

    import onnxruntime as ort

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).logits

    batch = torch.export.Dim("batch", min=1)
    plain_path = folder / "plain.onnx"
    torch.onnx.export(Logits(model), (torch.randn(2, 3, size, size),), str(plain_path), dynamo=True,
                      input_names=["pixel_values"], output_names=["logits"], dynamic_shapes=({0: batch},))
    plain = ort.InferenceSession(str(plain_path), providers=["CPUExecutionProvider"])
    return dict(name=name, model=model, explainer=explainer, explained=explained, script=script, plain=plain,
                size=size)


@pytest.fixture(params=BATCHES, ids=lambda b: f"b{b}")
def batch(request):
    return request.param


def rel_err(got, expected):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("impl", IMPLS)
def test_export(benchmark, export_results, served, batch, impl):
    size = served["size"]
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    array = pixels.numpy()
    eager = served["explainer"](pixels)
    if impl == "ort_plain":
        (logits,) = served["plain"].run(None, {"pixel_values": array})
        assert rel_err(logits, eager.logits) <= 1e-4
        fn = lambda: served["plain"].run(None, {"pixel_values": array})  # noqa: E731
    elif impl == "ort_explain":
        logits, relevance = served["explained"](array)
        assert rel_err(logits, eager.logits) <= 1e-5 and rel_err(relevance, eager.relevance) <= 1e-4
        fn = lambda: served["explained"](array)  # noqa: E731
    elif impl == "torchscript_explain":
        target = torch.full((batch,), -1)
        with torch.no_grad():
            logits, relevance, _ = served["script"](pixels, target)
        assert rel_err(logits, eager.logits) <= 1e-5 and rel_err(relevance, eager.relevance) <= 1e-4

        def fn():
            with torch.no_grad():
                return served["script"](pixels, target)
    else:
        fn = lambda: served["explainer"](pixels)  # noqa: E731

    benchmark.group = f"export-{served['name']}-b{batch}"
    benchmark.extra_info.update(model=served["name"], batch=batch, impl=impl)
    benchmark.pedantic(fn, rounds=ROUNDS[(served["name"], batch)], iterations=1, warmup_rounds=2)
    if benchmark.stats is not None:  # None under --benchmark-disable
        export_results[(served["name"], batch)][impl] = benchmark.stats.stats.median
