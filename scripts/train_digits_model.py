"""Trains the digits model shipped in relfast/assets/digits_vit.pt.

    .venv/bin/python scripts/train_digits_model.py [--out relfast/assets/digits_vit.pt]

A small HF ViT (8 x 8 px, 2 px patches: 16 patches plus CLS, 4 layers, 1 channel) on the 1,297
training digits of ``relfast.data.load_digits`` (scikit-learn's real scans), AdamW, on the CPU;
prints accuracy on the 500 held-out digits. Stored in float16, loaded with
``relfast.models.load_model``.
"""
import argparse
import time

import torch

from relfast.data import load_digits, normalize


def config():
    from transformers import ViTConfig

    return ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
                     num_attention_heads=4, intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="relfast/assets/digits_vit.pt")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from transformers import ViTForImageClassification

    torch.manual_seed(args.seed)
    images, labels = load_digits("train")
    test_images, test_labels = load_digits("held_out")
    images, test_images = normalize(images), normalize(test_images)
    model = ViTForImageClassification(config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(labels))
        for i in range(0, len(labels), 64):
            batch = order[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(pixel_values=images[batch]).logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            model.eval()
            with torch.no_grad():
                accuracy = (model(pixel_values=test_images).logits.argmax(-1) == test_labels).float().mean().item()
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}, held-out accuracy {accuracy:.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    state = {k: v.half() for k, v in model.state_dict().items()}
    torch.save({"config": model.config.to_dict(), "state_dict": state}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
