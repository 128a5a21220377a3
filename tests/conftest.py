"""Fixtures shared by test files."""
import pytest
import torch

import relfast
import relfast.export


@pytest.fixture(scope="session")
def default_files(tmp_path_factory):
    """The shipped model's generic explainer exported once as ONNX and as TorchScript."""
    explainer = relfast.Explainer(relfast.models.default_model(), "generic")
    folder = tmp_path_factory.mktemp("default_export")
    example = torch.randn(1, 3, 64, 64)
    return dict(onnx=relfast.export.to_onnx(explainer, example, folder / "m.onnx"),
                script=relfast.export.to_torchscript(explainer, example, folder / "m.pt"))
