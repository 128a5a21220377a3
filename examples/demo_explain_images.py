"""Heatmaps from the embedded default model: writes PNGs to out/ (or the folder given).

For a few fresh Shapes images it explains the predicted class and a counterfactual class with
relfast's generic method and writes the papers' side-by-side view (input, predicted, other class),
one PNG per image: each map on its own colour scale (its own colour bar), since the two classes'
relevance can differ tenfold and one scale would blank the smaller map. The same images are
written raw (64x64, the model's input) to out/samples/, named by their true class, to try the CLI:

    relfast explain --image out/samples/shapes_0_blue.png --out heat.png
"""
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import relfast
import relfast.viz
from relfast.data import CLASSES, make_shapes, normalize
from relfast.models import default_model

UNITS = "relevance, unitless"  # R[CLS, patch] of the generic method, upsampled to pixels


def explain_samples(count=4, seed=31):
    """(images, labels, predicted, maps (N, 2, 64, 64): predicted and counterfactual class, titles)."""
    model = default_model()
    images, labels, _ = make_shapes(count, seed=seed)
    with torch.no_grad():
        predicted = model(pixel_values=normalize(images)).logits.argmax(-1)
    other = (predicted + 1) % len(CLASSES)
    explanation = relfast.Explainer(model)(normalize(images), target=torch.stack([predicted, other], dim=1))
    maps = explanation.image_map(upsample=True, normalize=False)
    titles = []
    for i in range(count):
        scores = explanation.logits[i]
        titles.append([f"{CLASSES[int(predicted[i])]} (predicted, logit {float(scores[predicted[i]]):.1f})",
                       f"{CLASSES[int(other[i])]} (not predicted, logit {float(scores[other[i]]):.1f})"])
    return images, labels, predicted, maps, titles


def main(out_dir="out"):
    out = Path(out_dir)
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    images, labels, predicted, maps, titles = explain_samples()
    for i in range(len(images)):
        raw = samples / f"shapes_{i}_{CLASSES[int(labels[i])]}.png"
        plt.imsave(raw, images[i].permute(1, 2, 0).numpy())  # the model's input as is, for the CLI
        path = relfast.viz.save_side_by_side(images[i], list(maps[i]), titles[i], out / f"shapes_{i}.png", label=UNITS)
        print(f"{path}: true class {CLASSES[int(labels[i])]}, predicted {CLASSES[int(predicted[i])]}")
    print(f"raw inputs (64x64) for `relfast explain --image`: {samples}/")


if __name__ == "__main__":
    main(*sys.argv[1:])
