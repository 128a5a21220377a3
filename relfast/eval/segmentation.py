"""[P1]'s segmentation test: how well a relevance map, read as a foreground mask, covers the object.

Each map is upsampled to the image (bilinear, by the patch size), min-max normalised and
thresholded at its mean. Pixel accuracy and the IoU of both classes (background, foreground) are
accumulated over the whole data set (total intersection / total union per class); mIoU is their
mean. mAP is the mean over images of the average precision of the normalised map against the
mask (scikit-learn), over the images whose mask has both classes.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import Tensor

from . import checks


@dataclass
class SegmentationScores:
    """Attributes: pixel_accuracy, miou, mean_ap (in [0, 1]); iou: (background, foreground);
    images_in_ap: how many images the mAP averages."""

    pixel_accuracy: float
    miou: float
    mean_ap: float
    iou: tuple
    images_in_ap: int


def sample_scores(maps: Tensor, masks: Tensor) -> Dict[str, np.ndarray]:
    """Each image's share of the scores, from maps (B, H, W) in [0, 1] and masks (B, H, W) bool:
    "correct" and "pixels" (B,), "intersection" and "union" (B, 2) (background, foreground), all
    counts, and "average_precision" (B,), NaN where the mask lacks one of the classes. Counts add
    up the same however the images are batched."""
    from sklearn.metrics import average_precision_score

    where = "relfast.eval.SegmentationTotals.add"
    if not isinstance(maps, Tensor) or maps.dim() != 3 or not maps.dtype.is_floating_point:
        raise ValueError(f"{where}: argument 'maps' must be a float tensor (B, H, W), got "
                         f"{getattr(maps, 'shape', type(maps).__name__)}")
    if not bool(torch.isfinite(maps).all()):
        raise ValueError(f"{where}: argument 'maps' holds NaN or infinite values")
    masks = checks.binary(masks, "masks", where, maps.shape)  # another shape would broadcast silently
    maps, masks = maps.detach().double().cpu(), masks.cpu()
    predicted = maps > maps.mean(dim=(1, 2), keepdim=True)
    intersection = np.zeros((maps.shape[0], 2), dtype=np.int64)
    union = np.zeros_like(intersection)
    for cls, (pred, truth) in enumerate(((~predicted, ~masks), (predicted, masks))):
        intersection[:, cls] = (pred & truth).flatten(1).sum(dim=1).numpy()
        union[:, cls] = (pred | truth).flatten(1).sum(dim=1).numpy()
    precisions = np.full(maps.shape[0], np.nan)
    for b, (heat, truth) in enumerate(zip(maps, masks)):
        if truth.any() and not truth.all():  # average precision needs both classes
            precisions[b] = average_precision_score(truth.flatten().numpy(), heat.flatten().numpy())
    return {"correct": (predicted == masks).flatten(1).sum(dim=1).numpy().astype(np.int64),
            "pixels": np.full(maps.shape[0], masks[0].numel() if len(masks) else 0, dtype=np.int64),
            "intersection": intersection, "union": union, "average_precision": precisions}


def segmentation_maps(out, size) -> Tensor:
    """The explanation's maps as the test reads them: min-max normalised, at the images' ``size``."""
    maps = out.image_map(upsample=True)  # min-max normalised, at the patch grid's pixel size
    if tuple(maps.shape[1:]) != tuple(size):
        maps = torch.nn.functional.interpolate(maps[:, None], size=tuple(size), mode="bilinear",
                                               align_corners=False)[:, 0]
    return maps


class SegmentationTotals:
    """Running sums over images; ``add`` one batch of normalised maps and masks."""

    def __init__(self):
        self.correct = self.pixels = 0
        self.intersection = np.zeros(2)
        self.union = np.zeros(2)
        self.precisions = []

    def add(self, maps: Tensor, masks: Tensor) -> None:
        """maps: (B, H, W) in [0, 1]; masks: (B, H, W) bool, the object."""
        self.add_samples(sample_scores(maps, masks))

    def add_samples(self, samples: Dict[str, np.ndarray]) -> None:
        """Per-image counts of :func:`sample_scores` (from any batching, in the images' order)."""
        self.correct += int(samples["correct"].sum())
        self.pixels += int(samples["pixels"].sum())
        self.intersection += samples["intersection"].sum(axis=0)
        self.union += samples["union"].sum(axis=0)
        precisions = samples["average_precision"]
        self.precisions.extend(float(p) for p in precisions[~np.isnan(precisions)])

    def scores(self) -> SegmentationScores:
        """The scores so far; mean_ap is NaN (``images_in_ap`` 0) when no mask had both classes."""
        if not self.pixels:
            raise ValueError("relfast.eval.SegmentationTotals.scores: no images were added; there is nothing to score")
        iou = tuple(float(i / u) if u else 0.0 for i, u in zip(self.intersection, self.union))
        return SegmentationScores(self.correct / max(self.pixels, 1), float(np.mean(iou)),
                                  float(np.mean(self.precisions)) if self.precisions else float("nan"), iou,
                                  len(self.precisions))


def segmentation(explainer, images: Tensor, masks: Tensor, *, preprocess: Optional[Callable[[Tensor], Tensor]] = None,
                 target: str = "predicted", labels: Optional[Tensor] = None, batch_size: int = 32,
                 progress: bool = True) -> SegmentationScores:
    """[P1]'s segmentation test of ``explainer`` (an image classifier's, or a reference's).

    Args:
        images: (N, C, H, W), N >= 1; the model gets ``preprocess(images)``.
        masks: (N, H, W) bool, the object's pixels.
        target: "predicted" (explain the predicted class, as [P1]) or "label" (``labels``, (N,)).
    """
    from tqdm import tqdm

    where = "relfast.eval.segmentation"
    family = checks.classifier(explainer, where, "image")
    if not isinstance(images, Tensor) or images.dim() != 4 or images.dtype == torch.bool or images.is_complex():
        raise ValueError(f"{where}: argument 'images' must be a tensor (N, C, H, W) of pixel values, got "
                         f"{getattr(images, 'dtype', '')} {getattr(images, 'shape', type(images).__name__)}")
    checks.not_empty(images.shape[0], "images", where)
    masks = checks.binary(masks, "masks", where, (images.shape[0], *images.shape[2:]))
    target = checks.choice(target, "target", where, ("predicted", "label"))
    if target == "label":
        labels = checks.class_labels(labels, images.shape[0], where, family.num_classes())
    elif labels is not None:  # they would be ignored
        raise ValueError(f"{where}: argument 'labels' is used with target='label' only; pass target='label' to "
                         "explain them, or leave 'labels' out")
    preprocess = checks.optional_callable(preprocess, "preprocess", where) or (lambda x: x)
    batch_size = checks.positive_int(batch_size, "batch_size", where)
    progress = checks.flag(progress, "progress", where)
    starts = range(0, images.shape[0], batch_size)
    for start in starts:  # the model's own checks (shape, channels, finite values), before any forward
        checks.model_inputs(family, preprocess(images[start:start + batch_size]), "images", where)
    totals = SegmentationTotals()
    for start in tqdm(starts, desc="segmentation", unit="batch", disable=not progress):
        batch = images[start:start + batch_size]
        explained = None if target == "predicted" else labels[start:start + batch_size]
        out = explainer(preprocess(batch), target=explained)
        totals.add(segmentation_maps(out, batch.shape[2:]), masks[start:start + batch_size])
    return totals.scores()
