"""Where the digits model's CLS token looks, layer by layer (docs/EVALUATION.md): on 200 held-out
digits, the head-mean CLS attention row's correlation with each patch's ink, its entropy, its
largest patch share, and the attention mass all tokens put on CLS (a sink would show there).

    .venv/bin/python scripts/digits_attention_by_layer.py
"""
import torch

import relfast
from relfast.data import load_digits, normalize


def main():
    model = relfast.models.digits_model()
    model.set_attn_implementation("eager")  # our own copy: output_attentions needs eager
    images, _ = load_digits("held_out")
    images = images[:200]
    with torch.no_grad():
        attentions = model(normalize(images), output_attentions=True).attentions
    ink = torch.nn.functional.avg_pool2d(images, 2).flatten(1)  # (200, 16): ink per 2 x 2 patch
    for layer, attention in enumerate(attentions):
        mean = attention.mean(1)  # (B, 17, 17)
        cls_row = mean[:, 0]
        correlation = torch.stack([torch.corrcoef(torch.stack([cls_row[b, 1:], ink[b]]))[0, 1]
                                   for b in range(len(images))]).nanmean()
        entropy = -(cls_row * cls_row.clamp_min(1e-12).log()).sum(1).mean()
        print(f"layer {layer}: correlation with ink {correlation:.2f}, entropy {entropy:.2f}, largest patch share "
              f"{cls_row[:, 1:].max(1).values.mean():.2f}, mass on CLS {mean[:, :, 0].mean():.3f}")


if __name__ == "__main__":
    main()
