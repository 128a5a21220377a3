"""[P2] supplement, Algorithm 1: DETR segmentation masks from per-query relevance maps.

For each query whose largest softmax probability over the real classes (DETR's last class,
"no object", excluded) is above ``threshold``: its map ``R^qi[j]`` is min-max scaled to 0..255 and
binarised with Otsu's threshold (scikit-image), upsampled bilinearly to ``mask_size`` and kept
where ``sigmoid > 0.5`` (where the upsampled binary map is above 0), then upsampled to
``image_size`` by nearest neighbour. Other queries get empty masks. The result has the layout
DETR's segmentation post-processing gives its evaluator: (B, Q, 1, H, W).
"""
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks


def _size(value, name: str) -> Tuple[int, int]:
    if (not isinstance(value, (tuple, list, torch.Size)) or len(value) != 2
            or not all(checks.is_int(v) and v > 0 for v in value)):
        raise ValueError(f"relfast.eval.detr_masks: argument '{name}' must be (height, width), two positive ints, "
                         f"got {value!r}")
    return int(value[0]), int(value[1])


def _otsu_binary(relevance_map: np.ndarray) -> np.ndarray:
    """The map scaled to 0..255 (uint8, as the reference does) and split at Otsu's threshold."""
    from skimage.filters import threshold_otsu

    low, high = float(relevance_map.min()), float(relevance_map.max())
    if high <= low:  # a flat map has no foreground
        return np.zeros(relevance_map.shape, dtype=np.float32)
    scaled = ((relevance_map - low) / (high - low) * 255).astype(np.uint8)
    return (scaled > threshold_otsu(scaled)).astype(np.float32)


def detr_masks(relevance: Tensor, logits: Tensor, mask_size: Sequence[int], image_size: Sequence[int],
               threshold: float = 0.5) -> Tensor:
    """Algorithm 1 of [P2]'s supplement.

    Args:
        relevance: (B, Q, h, w) each query's relevance over the image tokens (``R^qi`` reshaped to
            the backbone's grid), or (Q, h, w) for one image.
        logits: (B, Q, C + 1) DETR's class logits, the last class "no object" (or (Q, C + 1)).
        mask_size: (height, width) the masks are first upsampled to (DETR's target mask size).
        image_size: (height, width) of the original image.
        threshold: the class probability a query needs for a mask.

    Returns:
        bool (B, Q, 1, H, W) (or (Q, 1, H, W) for one image); queries below the threshold get
        all-False masks, so an image without confident detections gives an empty result, not an
        error.
    """
    where = "relfast.eval.detr_masks"
    single = isinstance(relevance, Tensor) and relevance.dim() == 3
    if not isinstance(relevance, Tensor) or relevance.dim() not in (3, 4) or not relevance.dtype.is_floating_point:
        raise ValueError(f"{where}: argument 'relevance' must be a float tensor (B, Q, h, w) or (Q, h, w), got "
                         f"{getattr(relevance, 'shape', type(relevance).__name__)}")
    if single:
        relevance = relevance.unsqueeze(0)
        logits = logits.unsqueeze(0) if isinstance(logits, Tensor) else logits
    if (not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != relevance.shape[:2]
            or logits.shape[-1] < 2):
        raise ValueError(f"{where}: argument 'logits' must be (B, Q, C + 1) with the (B, Q) of 'relevance' "
                         f"{tuple(relevance.shape[:2])} and at least one real class plus 'no object', got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    if 0 in relevance.shape:  # no image, no query or an empty grid: nothing to segment
        raise ValueError(f"{where}: argument 'relevance' is empty (shape {tuple(relevance.shape)}); it needs at least "
                         "one image, one query and a non-empty grid")
    if logits.dtype == torch.bool or logits.is_complex():
        raise ValueError(f"{where}: argument 'logits' must hold real class logits, got {logits.dtype}")
    if not bool(torch.isfinite(relevance).all()) or not bool(torch.isfinite(logits).all()):
        raise ValueError(f"{where}: arguments 'relevance' and 'logits' must be finite")
    mask_size, image_size = _size(mask_size, "mask_size"), _size(image_size, "image_size")
    if isinstance(threshold, Tensor) and threshold.numel() == 1 and threshold.dtype.is_floating_point:
        threshold = threshold.item()
    if not 0 <= checks.real_number(threshold, "threshold", where) < 1:
        raise ValueError(f"{where}: argument 'threshold' must lie in [0, 1), got {threshold!r}")
    threshold = float(threshold)

    batch, queries = relevance.shape[:2]
    keep = logits.detach().float().softmax(dim=-1)[..., :-1].amax(dim=-1) > threshold  # (B, Q)
    masks = torch.zeros(batch, queries, 1, *image_size, dtype=torch.bool)
    maps = relevance.detach().float().cpu().numpy()
    for b, j in keep.nonzero().tolist():
        binary = torch.from_numpy(_otsu_binary(maps[b, j]))[None, None]
        upsampled = F.interpolate(binary, size=mask_size, mode="bilinear", align_corners=False)
        kept = (upsampled.sigmoid() > 0.5).float()
        masks[b, j] = F.interpolate(kept, size=image_size, mode="nearest")[0].bool()
    masks = masks.to(relevance.device)
    return masks[0] if single else masks
