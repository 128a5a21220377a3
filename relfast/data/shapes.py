"""Shapes: a synthetic image set whose objects have known masks.

Each image holds one object (a disc, a square, a triangle or a cross, at random size and position)
on a grey textured background. The label is the object's colour (red, green, blue or yellow, with
some jitter); the mask is the object's pixels. Only the object carries the class, so a model that
classifies these must look at it, and a faithful explanation puts its relevance on the mask: the
property the default model's tests check.
"""
from typing import Tuple

import torch
from torch import Tensor

CLASSES = ("red", "green", "blue", "yellow")
_HUES = torch.tensor([[0.85, 0.15, 0.15], [0.15, 0.75, 0.2], [0.15, 0.3, 0.9], [0.9, 0.85, 0.15]])


def _object_masks(n: int, size: int, gen: torch.Generator) -> Tensor:
    radius = torch.empty(n).uniform_(0.18, 0.3, generator=gen) * size
    cy = radius + torch.rand(n, generator=gen) * (size - 2 * radius)
    cx = radius + torch.rand(n, generator=gen) * (size - 2 * radius)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y = coords.view(1, size, 1) - cy.view(n, 1, 1)
    x = coords.view(1, 1, size) - cx.view(n, 1, 1)
    r = radius.view(n, 1, 1)
    disc = x ** 2 + y ** 2 <= r ** 2
    square = (x.abs() <= 0.8 * r) & (y.abs() <= 0.8 * r)
    triangle = (y <= 0.8 * r) & (y >= -r) & (x.abs() <= (y + r) * 0.6)
    cross = ((x.abs() <= 0.3 * r) & (y.abs() <= r)) | ((y.abs() <= 0.3 * r) & (x.abs() <= r))
    shapes = torch.stack([disc, square, triangle, cross], dim=1)  # (n, 4, S, S)
    return shapes[torch.arange(n), torch.randint(0, 4, (n,), generator=gen)]


def make_shapes(n: int, image_size: int = 64, seed: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (images (n, 3, S, S) float32 in [0, 1], labels (n,) int64, masks (n, S, S) bool).
    Models take ``normalize(images)``."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (n,), generator=gen)
    masks = _object_masks(n, image_size, gen)
    # Background: a smooth grey field plus pixel noise, so the object is not the only structure.
    coarse = torch.rand(n, 1, 4, 4, generator=gen) * 0.6 + 0.2
    background = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear",
                                                 align_corners=False).expand(-1, 3, -1, -1)
    background = background + 0.05 * torch.randn(n, 3, image_size, image_size, generator=gen)
    colour = (_HUES[labels] + 0.08 * torch.randn(n, 3, generator=gen)).view(n, 3, 1, 1)
    images = torch.where(masks.unsqueeze(1), colour.expand(-1, -1, image_size, image_size), background)
    return images.clamp(0, 1), labels, masks


def normalize(images: Tensor) -> Tensor:
    """[0, 1] pixels to the model's input range, as HF's ViT image processor does: (x - 0.5) / 0.5."""
    return (images - 0.5) / 0.5
