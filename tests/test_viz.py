import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib import colormaps

import relfast
from relfast import viz


def test_overlay_colours_follow_the_heatmap():
    image = torch.rand(3, 32, 32)
    heat = torch.zeros(8, 8)
    heat[2, 5] = 1.0  # one hot patch
    blended = viz.overlay(image, heat, alpha=1.0, cmap="viridis")  # alpha 1: the colormap alone
    assert blended.shape == (32, 32, 3)
    hottest = np.unravel_index(np.argmin(np.abs(blended - colormaps["viridis"](1.0)[:3]).sum(-1)), (32, 32))
    assert hottest[0] // 4 == 2 and hottest[1] // 4 == 5, hottest
    plain = viz.overlay(image, heat, alpha=0.0)
    np.testing.assert_allclose(plain, (image.permute(1, 2, 0).numpy() - image.min().item()) /
                               (image.max() - image.min()).item(), rtol=1e-5, atol=1e-6)


def test_save_overlay_and_side_by_side_write_pngs(tmp_path):
    image = np.random.rand(40, 48, 3)
    path = viz.save_overlay(image, np.random.rand(5, 6), tmp_path / "heat.png")
    assert plt.imread(path).shape[:2] == (40, 48)
    one = plt.imread(viz.save_side_by_side(image, [np.random.rand(5, 6)], ["a"], tmp_path / "one.png"))
    two = plt.imread(viz.save_side_by_side(image, [np.random.rand(5, 6)] * 2, ["a", "b"], tmp_path / "two.png"))
    assert two.shape[1] > one.shape[1]


def test_text_html_scales_and_escapes():
    page = viz.text_html(["<b>", "cat", "the"], torch.tensor([0.5, 2.0, 0.0]), title="x & y")
    assert "&lt;b&gt;" in page and "x &amp; y" in page
    assert 'rgba(220, 30, 30, 1.000); padding: 2px 3px; margin: 1px; border-radius: 3px">cat' in page
    assert "rgba(220, 30, 30, 0.000)" in page


def test_explanation_to_png_end_to_end(tmp_path):
    import transformers  # installed by requirements.txt
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, num_labels=3)
    model = transformers.ViTForImageClassification(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    out = relfast.Explainer(model)(pixels, target=[0, 2])
    maps = out.image_map(upsample=True)  # (2, 2, 32, 32)
    path = viz.save_side_by_side(pixels[0], [maps[0, 0], maps[0, 1]], ["class 0", "class 2"], tmp_path / "two.png")
    assert plt.imread(path).ndim == 3


@pytest.mark.parametrize("call,words", [
    (lambda: viz.overlay(np.zeros((4, 4, 5)), np.zeros((2, 2))), "'image'"),
    (lambda: viz.overlay(np.zeros((3, 4, 4)), np.zeros((2, 2, 2))), "'heatmap'"),
    (lambda: viz.text_html(["a"], [1.0, 2.0]), "1 tokens but 2 scores"),
    (lambda: viz.save_side_by_side(np.zeros((4, 4)), [np.zeros((2, 2))], [], "x.png"), "1 heatmaps but 0 titles"),
])
def test_bad_input(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_a_value_range_puts_maps_on_one_colour_scale():
    image = torch.rand(3, 16, 16)
    strong = torch.linspace(0, 1, 16).expand(16, 16)
    weak = strong * 0.25
    cmap = colormaps[viz.DEFAULT_CMAP]
    alone = viz.overlay(image, weak, alpha=1.0)  # scaled alone: as hot as the strong map
    np.testing.assert_allclose(alone, viz.overlay(image, strong, alpha=1.0), atol=1e-6)
    shared = viz.overlay(image, weak, alpha=1.0, value_range=(0.0, 1.0))
    np.testing.assert_allclose(shared[0, -1], cmap(0.25)[:3], atol=1e-6)  # its hottest pixel is a quarter up the scale


def test_side_by_side_with_a_flat_map_and_per_map_scales(tmp_path):
    image = np.random.rand(32, 32, 3)
    shared = viz.save_side_by_side(image, [np.zeros((4, 4)), np.random.rand(4, 4)], ["zero", "b"], tmp_path / "s.png")
    alone = viz.save_side_by_side(image, [np.zeros((4, 4)), np.random.rand(4, 4)], ["zero", "b"], tmp_path / "a.png",
                                  shared_scale=False)
    for path in (shared, alone):
        picture = plt.imread(path)
        assert picture.shape[1] > 3 * picture.shape[0] * 0.9  # input, two panels and the colour bar side by side


def test_regions_heatmap_takes_the_largest_covering_box():
    heat = viz.regions_heatmap(torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 1.0, 1.0]]), torch.tensor([2.0, 3.0]),
                               (8, 12))
    assert heat.shape == (8, 12)
    assert heat[0, 0] == 2.0 and heat[3, 4] == 3.0 and heat[7, 11] == 3.0
    assert heat[7, 0] == 0.0  # no box covers the lower left corner
    in_pixels = viz.regions_heatmap(np.array([[2, 1, 4, 3]]), np.array([5.0]), (6, 6))
    assert in_pixels[1:3, 2:4].tolist() == [[5.0, 5.0], [5.0, 5.0]] and in_pixels.sum() == 20.0


def test_text_and_image_and_detections_write_pngs(tmp_path):
    image = np.random.rand(32, 32, 3)
    path = viz.save_text_and_image(image, np.random.rand(4, 4), ["a", "dog", "on", "grass"],
                                   torch.tensor([0.1, 0.9, 0.0, 0.4]), tmp_path / "pair.png", title="a dog")
    assert plt.imread(path).ndim == 3
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.2, 0.2]])
    one = plt.imread(viz.save_detections(image, boxes[:1], [np.random.rand(4, 4)], ["q0"], tmp_path / "one.png"))
    two = plt.imread(viz.save_detections(image, boxes, [np.random.rand(4, 4)] * 2, ["q0", "q1"], tmp_path / "two.png"))
    assert two.shape[1] > one.shape[1]


@pytest.mark.parametrize("call,words", [
    (lambda: viz.regions_heatmap(np.zeros((2, 4)), np.zeros(3), (4, 4)), "one box per score"),
    (lambda: viz.save_text_and_image(np.zeros((4, 4)), np.zeros((2, 2)), ["a"], [1.0, 2.0], "x.png"),
     "1 tokens but 2 scores"),
    (lambda: viz.save_detections(np.zeros((4, 4)), np.zeros((2, 4)), [np.zeros((2, 2))], ["a"], "x.png"),
     "2 boxes, 1 heatmaps and 1 titles"),
])
def test_bad_two_stream_picture_input(call, words):
    with pytest.raises(ValueError, match=words):
        call()
