"""How attention is seen during a call, without editing or re-configuring the model."""
from .mode import AttentionCapture
from .records import AttentionRecord, ProbabilityRecord, SdpaRecord

__all__ = ["AttentionCapture", "AttentionRecord", "ProbabilityRecord", "SdpaRecord"]
