"""Evaluation protocols of the papers: [P1]'s perturbation and segmentation tests
(``perturbation``, ``segmentation``) and [P2]'s Algorithm 1, segmentation masks of DETR's
detections from their relevance maps (``detr_masks``)."""
from .detr import detr_masks
from .perturbation import PerturbationCurve, area_under_curve, perturbation, perturbation_curve
from .rationale import rationale_ap
from .segmentation import SegmentationScores, SegmentationTotals, segmentation

__all__ = ["detr_masks", "perturbation", "perturbation_curve", "area_under_curve", "PerturbationCurve",
           "segmentation", "SegmentationScores", "SegmentationTotals", "rationale_ap"]
