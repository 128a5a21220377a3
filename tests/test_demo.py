"""The images demo (examples/demo_explain_images.py): its figures show the predicted class's map
plainly, and the raw samples it writes are what the CLI explains."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from relfast import viz
from relfast.data import CLASSES

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo_explain_images.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo_explain_images", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def written(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    demo.main(str(out))
    return out


def test_the_predicted_class_panel_is_not_blank(demo):
    images, _, _, maps, titles = demo.explain_samples()
    for i in range(len(images)):
        predicted, other = maps[i]
        assert float(predicted.max() - predicted.min()) > 0  # the explanation itself is not flat
        figure = viz.side_by_side_figure(images[i], list(maps[i]), titles[i], label=demo.UNITS)
        try:
            panel = np.asarray(figure.axes[1].get_images()[0].get_array(), dtype=np.float64)
            # a colour scale of its own: its hottest pixel reaches the colour map's top, whatever
            # the counterfactual's magnitude (one shared scale left it near black)
            assert panel.std() > 0.05, (i, panel.std())
            hottest = np.unravel_index(int(predicted.argmax()), predicted.shape)
            top = np.asarray(plt.get_cmap(viz.DEFAULT_CMAP)(1.0)[:3])
            assert np.abs(panel[hottest] - top).max() < 0.35, panel[hottest]
            assert "predicted" in figure.axes[1].get_title()
        finally:
            plt.close(figure)


def test_the_demo_writes_figures_and_raw_samples(written):
    figures = sorted(written.glob("shapes_*.png"))
    samples = sorted((written / "samples").glob("shapes_*.png"))
    assert len(figures) == len(samples) == 4
    assert all(viz.is_relfast_figure(f) for f in figures)
    for sample in samples:
        assert not viz.is_relfast_figure(sample)
        assert plt.imread(sample).shape[:2] == (64, 64)  # the model's input size, no resizing
        assert sample.stem.split("_")[-1] in CLASSES


def test_the_cli_explains_a_raw_sample_as_the_demo_did(demo, written, tmp_path):
    images, labels, predicted, _, _ = demo.explain_samples()
    sample = sorted((written / "samples").glob("shapes_0_*.png"))[0]
    result = subprocess.run([sys.executable, "-m", "relfast.cli", "explain", "--image", str(sample), "--out",
                             str(tmp_path / "heat.png")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"predicted {CLASSES[int(predicted[0])]}" in result.stdout
    assert sample.stem.endswith(CLASSES[int(labels[0])])
