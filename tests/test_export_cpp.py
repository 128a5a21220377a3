"""The C++ example cpp/explain.cpp (built with CMakeLists.txt, linked with relfast_ops) serves a
file from relfast.export.to_torchscript without Python: same logits and relevance as the eager
explainer, the top patch it prints is the eager map's, and bad input exits with relfast's message."""
import re

import pytest
import torch

import relfast
import relfast.export

from cpp_build import build_target, run, skip_without_toolchain

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")

skip_without_toolchain()

LOGITS_RTOL, RELEVANCE_RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def explain_exe():
    return build_target("relfast_explain")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export_cpp")
    explainer = relfast.Explainer(relfast.models.default_model(), "generic")
    path = relfast.export.to_torchscript(explainer, torch.randn(1, 3, 64, 64), folder / "model_explained.pt")
    return dict(folder=folder, explainer=explainer, path=path)


def rel_err(got, expected):
    return float((got.double() - expected.double()).abs().max() / expected.double().abs().max())


@pytest.mark.parametrize("batch", [1, 2, 5, 16])
def test_cpp_matches_eager_and_prints_top_patch(explain_exe, exported, batch):
    folder = exported["folder"]
    pixels = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    torch.save(pixels, folder / f"pixels{batch}.pt")
    out_path = folder / f"out{batch}.pt"
    proc = run([explain_exe, "-o", out_path, exported["path"], folder / f"pixels{batch}.pt"], "relfast_explain",
               timeout=300)
    logits, relevance, explained = torch.load(out_path)
    eager = exported["explainer"](pixels)
    assert rel_err(logits, eager.logits) <= LOGITS_RTOL
    assert rel_err(relevance, eager.relevance) <= RELEVANCE_RTOL
    assert torch.equal(explained, eager.target)

    lines = re.findall(r"sample (\d+) predicted (\d+) explained (\d+) top_patch (\d+) (\d+) relevance (\S+)",
                       proc.stdout)
    assert len(lines) == batch, proc.stdout
    maps = eager.image_map()  # (B, 8, 8)
    for i, predicted, target, row, col, value in lines:
        i = int(i)
        assert int(predicted) == int(eager.logits[i].argmax()) and int(target) == int(eager.target[i])
        best = int(maps[i].flatten().argmax())
        assert (int(row), int(col)) == divmod(best, maps.shape[-1]), f"sample {i}: {proc.stdout}"
        assert abs(float(value) - float(maps[i].max())) <= 1e-4 * float(maps[i].max())


def test_cpp_explicit_target_and_bad_input(explain_exe, exported):
    folder = exported["folder"]
    pixels = torch.randn(3, 3, 64, 64)
    torch.save(pixels, folder / "pixels_t.pt")
    proc = run([explain_exe, "--target", "2", "-o", folder / "out_t.pt", exported["path"], folder / "pixels_t.pt"],
               "relfast_explain", timeout=300)
    _, relevance, explained = torch.load(folder / "out_t.pt")
    assert explained.tolist() == [2, 2, 2] and proc.stdout.count("explained 2 ") == 3
    assert rel_err(relevance, exported["explainer"](pixels, target=2).relevance) <= RELEVANCE_RTOL

    bad = run([explain_exe, "--target", "7", exported["path"], folder / "pixels_t.pt"], "relfast_explain",
              timeout=300, expect_success=False)
    assert bad.returncode == 2
    assert ("relfast_explain: error: relfast (exported explainer): input 'target' holds class 7, out of range for a "
            "model with 4 classes") in bad.stderr, bad.stderr
    torch.save(torch.randn(2, 3, 32, 32), folder / "small.pt")
    bad = run([explain_exe, exported["path"], folder / "small.pt"], "relfast_explain", timeout=300,
              expect_success=False)
    assert bad.returncode == 2 and "input 'pixel_values' must have shape (B, 3, 64, 64)" in bad.stderr, bad.stderr
