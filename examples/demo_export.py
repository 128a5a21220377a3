"""Deployment in one call: exports the embedded default model with its explainer to ONNX, serves it
with ONNX Runtime (numpy in, numpy out) and writes the served heatmaps to out/ (or the folder given).

    python examples/demo_export.py [out_dir]
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

import relfast
import relfast.export
import relfast.viz
from relfast.data import CLASSES, make_shapes, normalize
from relfast.models import default_model
from relfast.runtime import OnnxExplainer


def main(out_dir="out"):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    explainer = relfast.Explainer(default_model(), "generic")
    images, labels, _ = make_shapes(4, seed=41)
    pixels = normalize(images)
    start = time.perf_counter()
    path = relfast.export.to_onnx(explainer, pixels[:1], out / "shapes_explained.onnx")
    print(f"exported {path} in {time.perf_counter() - start:.1f} s")

    session = OnnxExplainer(path)  # numpy + onnxruntime: what a serving image needs
    logits, relevance = session(pixels.numpy())
    eager = explainer(pixels)
    error = np.abs(relevance - eager.relevance.numpy()).max() / np.abs(eager.relevance.numpy()).max()
    print(f"ONNX Runtime ({', '.join(session.providers)}) vs eager PyTorch: max relative error of the relevance "
          f"{error:.1e}")
    # the served (4, 8, 8) patch maps, upsampled as Explanation.image_map does
    maps = explainer.layout.to_pixels(torch.from_numpy(session.image_map(relevance)), normalize=False)
    for i in range(len(images)):
        best = int(logits[i].argmax())
        predicted = CLASSES[best]
        title = f"served: {predicted} (predicted, logit {float(logits[i, best]):.1f})"
        target = relfast.viz.save_side_by_side(images[i], [maps[i]], [title], out / f"served_{i}.png",
                                               label="relevance, unitless")
        print(f"{target}: true class {CLASSES[int(labels[i])]}, served prediction {predicted}")


if __name__ == "__main__":
    main(*sys.argv[1:])
