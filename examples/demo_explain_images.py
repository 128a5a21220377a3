"""Heatmaps from the embedded default model: writes PNGs to out/ (or the folder given).

For a few fresh Shapes images it explains the predicted class and a counterfactual class with
relfast's generic method and writes the papers' side-by-side view (input, predicted, other class),
one PNG per image.
"""
import sys
from pathlib import Path

import torch

import relfast
import relfast.viz
from relfast.data import CLASSES, make_shapes, normalize
from relfast.models import default_model


def main(out_dir="out"):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = default_model()
    images, labels, _ = make_shapes(4, seed=31)
    logits = model(pixel_values=normalize(images)).logits
    predicted = logits.argmax(-1)
    other = (predicted + 1) % len(CLASSES)
    explanation = relfast.Explainer(model)(normalize(images), target=torch.stack([predicted, other], dim=1))
    maps = explanation.image_map(upsample=True, normalize=False)  # (4, 2, 64, 64), one colour scale per image
    for i in range(len(images)):
        scores = explanation.logits[i]
        titles = [f"{CLASSES[int(predicted[i])]} (predicted, logit {float(scores[predicted[i]]):.1f})",
                  f"{CLASSES[int(other[i])]} (logit {float(scores[other[i]]):.1f})"]
        path = relfast.viz.save_side_by_side(images[i], [maps[i, 0], maps[i, 1]], titles, out / f"shapes_{i}.png")
        print(f"{path}: true class {CLASSES[int(labels[i])]}, predicted {CLASSES[int(predicted[i])]}")


if __name__ == "__main__":
    main(*sys.argv[1:])
