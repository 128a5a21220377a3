"""CLIP (similarity and both maps) and DETR (detections and query maps) exported to ONNX and
TorchScript: the files equal the eager explainer (relative error <= 1e-4) for several targets
and batch sizes, the ONNX runtime checks their targets before running, and both files refuse the
CLIP texts the eager explainer refuses."""
import numpy as np
import pytest
import torch

import bimodal_models as models
import relfast
from relfast.runtime import OnnxExplainer

TOLERANCE = 1e-4


def float32(inputs):
    return {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}


def relative(got, expected):
    expected = np.asarray(expected)
    return float(np.abs(np.asarray(got) - expected).max() / max(np.abs(expected).max(), 1e-30))


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    explainer = relfast.Explainer(models.clip().float())
    example = float32(models.clip_inputs(2, 2, seed=0))
    return (explainer, relfast.export.to_onnx(explainer, example, folder / "clip.onnx"),
            relfast.export.to_torchscript(explainer, example, folder / "clip.pt"))


def clip_numpy(length=9):
    return {k: v.numpy() for k, v in float32(models.clip_inputs(2, 2, seed=1, length=length)).items()}


def clip_text_with(**change):
    return {**clip_numpy(), **change}


def mask_with(row, value):
    mask = clip_text_with()["attention_mask"].copy()
    mask[row] = value
    return mask


# case -> (CLIP inputs, words in every entry point's message): the text tower's vocabulary (60) and
# 16 learned positions, and its padding mask, checked by both files before they run
BAD_CLIP_TEXT = {
    "token id beyond the vocabulary": (clip_text_with(input_ids=np.full((2, 9), models.VOCAB)),
                                       f"holds token id {models.VOCAB}, outside the model's vocabulary"),
    "longer than the positions": (clip_numpy(length=17), "holds sequences of 17 tokens; the model has 16 positions"),
    "all-padding text": (clip_text_with(attention_mask=mask_with(1, 0)), "every sample needs at least one real token"),
    "mask value 3": (clip_text_with(attention_mask=mask_with(0, 3)), "must hold only 0 (padding) and 1 (real), got 3"),
}


@pytest.mark.parametrize("case", sorted(BAD_CLIP_TEXT))
def test_clip_files_refuse_what_eager_refuses(clip_files, case):
    explainer, onnx_path, script_path = clip_files
    inputs, words = BAD_CLIP_TEXT[case]
    with pytest.raises(ValueError) as eager:
        explainer({k: torch.from_numpy(v) for k, v in inputs.items()})
    runtime = OnnxExplainer(onnx_path)
    runtime.session = None  # refused before ONNX Runtime is reached
    with pytest.raises(ValueError) as served:
        runtime.run(inputs)
    with pytest.raises(torch.jit.Error) as scripted:  # not "index out of range in self" from inside the graph
        torch.jit.load(str(script_path))(*[torch.from_numpy(v) for v in inputs.values()])
    messages = [str(eager.value), str(served.value), str(scripted.value).splitlines()[-1]]
    assert all(words in message for message in messages), messages
    assert messages[1].startswith("relfast.runtime.OnnxExplainer: input '")
    assert "relfast (exported explainer): input '" in messages[2]


@pytest.fixture(scope="module")
def detr_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detr")
    explainer = relfast.Explainer(models.detr().float())
    example = float32(models.detr_inputs(3, seed=0))
    return (explainer, relfast.export.to_onnx(explainer, example, folder / "detr.onnx"),
            relfast.export.to_torchscript(explainer, example, folder / "detr.pt"))


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_clip_onnx_equals_eager(clip_files, batch):
    explainer, onnx_path, _ = clip_files
    runtime = OnnxExplainer(onnx_path)
    assert runtime.spec["maps"] == {"image": "relevance", "text": "text_relevance"}
    inputs = float32(models.clip_inputs(batch, batch, seed=batch))
    for target in (None, np.arange(batch)[::-1].copy()):
        outputs = runtime.run({k: v.numpy() for k, v in inputs.items()}, target=target)
        eager = explainer(inputs, target=None if target is None else torch.from_numpy(target))
        assert relative(outputs["relevance"], eager.maps["image"]) <= TOLERANCE
        assert relative(outputs["text_relevance"], eager.maps["text"]) <= TOLERANCE
        assert relative(outputs["logits"], eager.logits) <= TOLERANCE
        assert outputs["logits"].shape == (batch, 1)
    assert runtime.image_map(outputs["relevance"]).shape == (batch, 4, 4)


def test_clip_torchscript_equals_eager(clip_files):
    explainer, _, script_path = clip_files
    scripted = torch.jit.load(str(script_path))
    inputs = float32(models.clip_inputs(3, 3, seed=7))
    target = torch.tensor([1, -1, 0])
    logits, relevance, explained, text = scripted(*inputs.values(), target)
    eager = explainer(inputs, target=torch.tensor([1, 1, 0]))
    assert relative(relevance, eager.maps["image"]) <= TOLERANCE
    assert relative(text, eager.maps["text"]) <= TOLERANCE
    with pytest.raises(Exception, match="text index 3, out of range for 3 texts"):
        scripted(*inputs.values(), torch.tensor([0, 3, 1]))


@pytest.mark.parametrize("target", [None, [5, 0, 2]])
def test_detr_onnx_and_torchscript_equal_eager(detr_files, target):
    explainer, onnx_path, script_path = detr_files
    runtime = OnnxExplainer(onnx_path)
    assert runtime.spec["maps"] == {"image": "relevance", "queries": "queries_relevance"}
    assert runtime.spec["patch_grid"] == list(models.DETR_GRID)
    inputs = float32(models.detr_inputs(3, seed=4))
    eager = explainer(inputs, target=None if target is None else torch.tensor(target))
    outputs = runtime.run(inputs["pixel_values"].numpy(), target=None if target is None else np.array(target))
    assert outputs["explained_target"].tolist() == eager.target.tolist()
    assert relative(outputs["relevance"], eager.maps["image"]) <= TOLERANCE
    assert relative(outputs["queries_relevance"], eager.maps["queries"]) <= TOLERANCE
    assert relative(outputs["pred_boxes"], eager.output.pred_boxes) <= TOLERANCE
    assert relative(outputs["class_logits"], eager.output.logits) <= TOLERANCE
    assert runtime.image_map(outputs["relevance"]).shape == (3, *models.DETR_GRID)
    scripted = torch.jit.load(str(script_path))
    script_target = torch.full((3,), -1) if target is None else torch.tensor(target)
    _, relevance, _, queries, _, boxes = scripted(inputs["pixel_values"], script_target)
    assert relative(relevance, eager.maps["image"]) <= TOLERANCE
    assert relative(queries, eager.maps["queries"]) <= TOLERANCE


def test_runtime_checks_pair_and_query_targets(clip_files, detr_files):
    clip = OnnxExplainer(clip_files[1])
    inputs = {k: v.numpy() for k, v in float32(models.clip_inputs(2, 2, seed=1)).items()}
    with pytest.raises(ValueError, match="text index 2, out of range for 2 texts"):
        clip.run(inputs, target=np.array([0, 2]))
    detr = OnnxExplainer(detr_files[1])
    pixels = float32(models.detr_inputs(3, seed=1))["pixel_values"].numpy()
    with pytest.raises(ValueError, match="query 6, out of range for a model with 6 queries"):
        detr.run(pixels, target=6)
    with pytest.raises(ValueError, match=r"dimension 0 must be 3"):
        detr.run(pixels[:2])  # DETR's file has the example's fixed batch


def test_detr_refuses_a_dynamic_batch_and_two_stream_families_without_export(tmp_path):
    example = float32(models.detr_inputs(2, seed=0))
    with pytest.raises(ValueError, match="fixed batch .*dynamic_batch=False"):
        relfast.export.to_onnx(relfast.Explainer(models.detr().float()), example, tmp_path / "d.onnx",
                               dynamic_batch=True)
    with pytest.raises(ValueError, match="not supported yet"):
        relfast.export.to_onnx(relfast.Explainer(models.lxmert().float()), float32(models.lxmert_inputs(2, 0)),
                               tmp_path / "l.onnx")
    assert not list(tmp_path.iterdir())
