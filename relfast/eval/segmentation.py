"""[P1]'s segmentation test: how well a relevance map, read as a foreground mask, covers the object.

Each map is upsampled to the image (bilinear, by the patch size), min-max normalised and
thresholded at its mean. Pixel accuracy and the IoU of both classes (background, foreground) are
accumulated over the whole data set (total intersection / total union per class); mIoU is their
mean. mAP is the mean over images of the average precision of the normalised map against the
mask (scikit-learn), over the images whose mask has both classes.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor


@dataclass
class SegmentationScores:
    """Attributes: pixel_accuracy, miou, mean_ap (in [0, 1]); iou: (background, foreground);
    images_in_ap: how many images the mAP averages."""

    pixel_accuracy: float
    miou: float
    mean_ap: float
    iou: tuple
    images_in_ap: int


class SegmentationTotals:
    """Running sums over images; ``add`` one batch of normalised maps and masks."""

    def __init__(self):
        self.correct = self.pixels = 0
        self.intersection = np.zeros(2)
        self.union = np.zeros(2)
        self.precisions = []

    def add(self, maps: Tensor, masks: Tensor) -> None:
        """maps: (B, H, W) in [0, 1]; masks: (B, H, W) bool, the object."""
        from sklearn.metrics import average_precision_score

        maps, masks = maps.detach().double().cpu(), masks.bool().cpu()
        predicted = maps > maps.mean(dim=(1, 2), keepdim=True)
        self.correct += int((predicted == masks).sum())
        self.pixels += masks.numel()
        for cls, (pred, truth) in enumerate(((~predicted, ~masks), (predicted, masks))):
            self.intersection[cls] += int((pred & truth).sum())
            self.union[cls] += int((pred | truth).sum())
        for heat, truth in zip(maps, masks):
            if truth.any() and not truth.all():  # average precision needs both classes
                self.precisions.append(average_precision_score(truth.flatten().numpy(), heat.flatten().numpy()))

    def scores(self) -> SegmentationScores:
        iou = tuple(float(i / u) if u else 0.0 for i, u in zip(self.intersection, self.union))
        return SegmentationScores(self.correct / max(self.pixels, 1), float(np.mean(iou)),
                                  float(np.mean(self.precisions)) if self.precisions else float("nan"), iou,
                                  len(self.precisions))


def segmentation(explainer, images: Tensor, masks: Tensor, *, preprocess: Optional[Callable[[Tensor], Tensor]] = None,
                 target: str = "predicted", labels: Optional[Tensor] = None, batch_size: int = 32,
                 progress: bool = True) -> SegmentationScores:
    """[P1]'s segmentation test of ``explainer`` (a vision model's).

    Args:
        images: (N, C, H, W) in [0, 1]; the model gets ``preprocess(images)``.
        masks: (N, H, W) bool, the object's pixels.
        target: "predicted" (explain the predicted class, as [P1]) or "label" (``labels``).
    """
    from tqdm import tqdm

    where = "relfast.eval.segmentation"
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"{where}: argument 'images' must be a tensor (N, C, H, W), got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if not isinstance(masks, Tensor) or tuple(masks.shape) != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"{where}: argument 'masks' must have shape {(images.shape[0], *images.shape[2:])}, got "
                         f"{getattr(masks, 'shape', type(masks).__name__)}")
    if target not in ("predicted", "label") or (target == "label" and labels is None):
        raise ValueError(f"{where}: argument 'target' must be 'predicted', or 'label' with 'labels'")
    if not explainer.layout.is_vision or explainer.layout.patch_size is None:
        raise ValueError(f"{where}: the explainer's model is not a vision model with a patch grid and size")
    preprocess = preprocess or (lambda x: x)
    totals = SegmentationTotals()
    for start in tqdm(range(0, images.shape[0], batch_size), desc="segmentation", unit="batch", disable=not progress):
        batch = images[start:start + batch_size]
        explained = None if target == "predicted" else labels[start:start + batch_size]
        out = explainer(preprocess(batch), target=explained)
        maps = out.image_map(upsample=True)  # min-max normalised, at the patch grid's pixel size
        maps = torch.nn.functional.interpolate(maps[:, None], size=batch.shape[2:], mode="bilinear",
                                               align_corners=False)[:, 0] if maps.shape[1:] != batch.shape[2:] else maps
        totals.add(maps, masks[start:start + batch_size])
    return totals.scores()
