import re

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


def _with(value):
    """A 4x4 map holding one ``value`` (NaN or inf) among finite entries."""
    heat = np.random.default_rng(0).random((4, 4))
    heat[1, 2] = value
    return heat


IMAGE = np.random.default_rng(1).random((16, 16, 3))
BOXES = np.array([[0.5, 0.5, 0.5, 0.5]])
# writer: (call writing to `path`, the entry point and argument its message names)
NON_FINITE = {
    "save_overlay nan map": (lambda path: viz.save_overlay(IMAGE, _with(np.nan), path),
                             "relfast.viz.save_overlay: argument 'heatmap'"),
    "save_overlay inf image": (lambda path: viz.save_overlay(np.full((8, 8, 3), np.inf), _with(0.0), path),
                               "relfast.viz.save_overlay: argument 'image'"),
    "save_side_by_side second map": (lambda path: viz.save_side_by_side(IMAGE, [_with(0.0), _with(-np.inf)],
                                                                        ["a", "b"], path),
                                     "relfast.viz.save_side_by_side: argument 'heatmaps[1]'"),
    "save_text_html nan score": (lambda path: viz.save_text_html([(["a", "b"], [1.0, 2.0]),
                                                                  (["c", "d"], [np.nan, 1.0], "t")], path),
                                 "relfast.viz.save_text_html (row 1): argument 'scores'"),
    "save_text_and_image nan map": (lambda path: viz.save_text_and_image(IMAGE, _with(np.nan), ["a"], [1.0], path),
                                    "relfast.viz.save_text_and_image: argument 'heatmap'"),
    "save_text_and_image inf score": (lambda path: viz.save_text_and_image(IMAGE, _with(0.0), ["a", "b"],
                                                                           torch.tensor([1.0, float("inf")]), path),
                                      "relfast.viz.save_text_and_image: argument 'scores'"),
    "save_detections nan map": (lambda path: viz.save_detections(IMAGE, BOXES, [_with(np.nan)], ["q0"], path),
                                "relfast.viz.save_detections: argument 'heatmaps[0]'"),
    "save_detections nan box": (lambda path: viz.save_detections(IMAGE, np.array([[0.5, np.nan, 0.5, 0.5]]),
                                                                 [_with(0.0)], ["q0"], path),
                                "relfast.viz.save_detections: argument 'boxes'"),
}


@pytest.mark.parametrize("case", sorted(NON_FINITE))
def test_writers_refuse_non_finite_values_before_writing(tmp_path, case):
    call, words = NON_FINITE[case]
    path = tmp_path / ("out.html" if "html" in case else "out.png")
    with pytest.raises(ValueError, match=re.escape(words) + ".*NaN or infinite"):
        call(path)
    assert not path.exists(), "nothing is written"


@pytest.mark.parametrize("call,words", [
    (lambda: viz.overlay(IMAGE, _with(np.nan)), "relfast.viz.overlay: argument 'heatmap' holds 1 NaN"),
    (lambda: viz.text_html(["a"], [np.inf]), "relfast.viz.text_html: argument 'scores' holds 1 NaN or infinite"),
    (lambda: viz.regions_heatmap(np.array([[0, 0, 1, 1]]), [np.nan], (4, 4)), "regions_heatmap: argument 'scores'"),
    (lambda: viz.regions_heatmap(np.array([[0, 0, np.inf, 1]]), [1.0], (4, 4)), "regions_heatmap: argument 'boxes'"),
    (lambda: viz.regions_heatmap(np.array([[0, 0, 1, 1]]), [1.0], (0, 4)), "argument 'size' must be (H, W)"),
    (lambda: viz.overlay(IMAGE, np.zeros((0, 4))), "'heatmap' must be a non-empty 2-D map"),
    (lambda: viz.overlay(IMAGE, _with(0.0), alpha=1.5), "relfast.viz.overlay: argument 'alpha' must be a number in"),
    (lambda: viz.overlay(IMAGE, _with(0.0), cmap="no_such_map"), "argument 'cmap' must be the name of a matplotlib"),
    (lambda: viz.overlay(IMAGE, _with(0.0), value_range=(0.0, np.nan)), "'value_range' must be two finite numbers"),
    (lambda: viz.save_side_by_side(IMAGE, [], [], "x.png"), "argument 'heatmaps' is empty"),
    (lambda: viz.save_text_html([(["a"],)], "x.html"), "row 0 is tuple of 1 items"),
    (lambda: viz.save_detections(IMAGE, np.zeros(3), [], [], "x.png"), "argument 'boxes' must be (K, 4)"),
])
def test_bad_values_name_the_entry_point_and_argument(call, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        call()


def _panel_pixels(figure, k):
    return np.asarray(figure.axes[k].get_images()[0].get_array(), dtype=np.float64)


def test_side_by_side_gives_each_map_its_own_scale_by_default():
    # a map 20 times smaller than the other (the predicted class beside a counterfactual) must not
    # be drawn nearly blank: each panel its own scale and colour bar, in the maps' units
    image = np.full((32, 32, 3), 0.5)  # flat: the panels' variation is the heat's alone
    blob = np.exp(-((np.arange(32)[:, None] - 10) ** 2 + (np.arange(32)[None] - 20) ** 2) / 30.0)
    small, large = 0.001 * blob, 0.02 * blob[::-1]
    own = viz.side_by_side_figure(image, [small, large], ["small", "large"], label="relevance, unitless")
    shared = viz.side_by_side_figure(image, [small, large], ["small", "large"], shared_scale=True)
    try:
        assert _panel_pixels(own, 1).std() > 3 * _panel_pixels(shared, 1).std()
        assert _panel_pixels(own, 1).std() == pytest.approx(_panel_pixels(own, 2).std(), rel=0.05)
        images = [a.get_images() for a in own.axes]
        bars = [a for a, i in zip(own.axes, images) if not i and a.get_ylabel()]
        assert len(bars) == 2 and all("own scale" in b.get_ylabel() and "unitless" in b.get_ylabel() for b in bars)
        limits = sorted(b.get_ylim()[1] for b in bars)
        assert limits == pytest.approx([small.max(), large.max()], rel=1e-3)
        shared_bars = [a for a in shared.axes if not a.get_images() and a.get_ylabel()]
        assert len(shared_bars) == 1 and "one scale for all maps" in shared_bars[0].get_ylabel()
    finally:
        plt.close(own)
        plt.close(shared)


def test_side_by_side_heat_does_not_take_the_objects_colour():
    # a saturated yellow object where the map is zero stays grey in the panel: only heat is coloured
    image = np.zeros((32, 32, 3))
    image[8:24, 8:24] = (1.0, 0.9, 0.1)
    heat = np.zeros((32, 32))
    heat[0:6, 0:6] = 1.0
    figure = viz.side_by_side_figure(image, [heat], ["m"])
    try:
        panel = _panel_pixels(figure, 1)
        inside = panel[16, 16]
        assert np.ptp(inside) < 0.02, inside  # grey: no channel stands out
        assert np.ptp(panel[2, 2]) > 0.2  # the heat is coloured
    finally:
        plt.close(figure)


def test_saved_figures_are_marked_and_inputs_are_not(tmp_path):
    image = np.random.rand(16, 16, 3)
    plain = tmp_path / "input.png"
    plt.imsave(plain, image)
    saved = [viz.save_side_by_side(image, [np.random.rand(4, 4)], ["a"], tmp_path / "a.png"),
             viz.save_overlay(image, np.random.rand(4, 4), tmp_path / "b.png"),
             viz.save_text_and_image(image, np.random.rand(4, 4), ["a"], [1.0], tmp_path / "c.png")]
    assert all(viz.is_relfast_figure(p) for p in saved)
    assert not viz.is_relfast_figure(plain)
    assert not viz.is_relfast_figure(tmp_path / "missing.png")
