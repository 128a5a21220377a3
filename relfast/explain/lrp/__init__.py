"""[P1] relevance propagation on unmodified models: the rules (``rules.py``; the rule sets and
the papers' code's own rules in ``paper_rules.py``), the forward that applies them (``mode.py``)
and the per-call pass methods use (``relevance_pass.py``)."""
from .mode import RelevanceCapture
from .paper_rules import RULE_SET_NAMES, RuleSet
from .relevance_pass import RelevancePass

__all__ = ["RelevanceCapture", "RelevancePass", "RuleSet", "RULE_SET_NAMES"]
