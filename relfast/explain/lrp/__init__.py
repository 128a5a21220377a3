"""[P1] relevance propagation on unmodified models: the rules (``rules.py``), the forward that
applies them (``mode.py``) and the per-call pass methods use (``relevance_pass.py``)."""
from .mode import RelevanceCapture
from .relevance_pass import RelevancePass

__all__ = ["RelevanceCapture", "RelevancePass"]
