"""scikit-learn's handwritten digits (1,797 real 8 x 8 scans, 16 grey levels; shipped inside
scikit-learn, nothing is downloaded), split once into a training and a held-out part.

The split is a fixed permutation (seed 0): the first 1,297 images train the digits model
(``scripts/train_digits_model.py``), the last 500 are held out for evaluation.
"""
from typing import Tuple

import torch
from torch import Tensor

TRAIN_SIZE = 1297


def load_digits(split: str = "held_out") -> Tuple[Tensor, Tensor]:
    """(images (N, 1, 8, 8) float32 in [0, 1], labels (N,) int64) of ``split`` ("train" or
    "held_out"). Models take ``normalize(images)`` (the same (x - 0.5) / 0.5 as Shapes)."""
    from sklearn.datasets import load_digits as sklearn_digits

    if split not in ("train", "held_out"):
        raise ValueError(f"relfast.data.load_digits: argument 'split' must be 'train' or 'held_out', got {split!r}")
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    chosen = order[:TRAIN_SIZE] if split == "train" else order[TRAIN_SIZE:]
    return images[chosen], labels[chosen]
