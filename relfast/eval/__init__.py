"""Evaluation protocols of the papers. So far: [P2]'s Algorithm 1, segmentation masks of DETR's
detections from their relevance maps (``detr_masks``)."""
from .detr import detr_masks

__all__ = ["detr_masks"]
