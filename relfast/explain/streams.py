"""Models with several token streams: how a family tells the engine which attention site
belongs to which stream, and what a multi-stream explanation reads out.

Three shapes of model, three plans:

- one stream (ViT, BERT, a causal LM, VisualBERT's joint text + regions): no plan; the family may
  still cut the explained row into named maps (``Family.split_maps``).
- :class:`IndependentStreams`: encoders that never attend to each other (CLIP's image and text
  towers), joined only at the output. Every method runs on each stream as on a one-stream
  model, with the stream's own sites, explained rows and layout.
- :class:`CrossPlan`: streams that attend to each other (LXMERT's co-attention, DETR's decoder).
  The [P2] rules 6-11 replay the sites in the plan's order (:mod:`relfast.explain.methods.bimodal`).
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

from torch import Tensor

from .layout import TokenLayout


@dataclass
class Stream:
    """One token stream of a call.

    Attributes:
        name: the map it gives ("image", "text", "queries").
        layout: its tokens (prefix, patch grid) for ``image_map`` and the viz helpers.
        size: N, its number of tokens in this call.
        sites: (independent streams) the indices of its self-attention records, forward order.
        rows: (B,) int64, the explained token of each sample (independent streams).
        token_mask: (B, N) bool, its real tokens (None: all).
    """

    name: str
    layout: TokenLayout
    size: int
    sites: List[int] = field(default_factory=list)
    rows: Optional[Tensor] = None
    token_mask: Optional[Tensor] = None


@dataclass
class IndependentStreams:
    streams: List[Stream]


@dataclass(frozen=True)
class SelfAttention:
    """Rules 6-7: stream ``stream`` attends to itself at record ``site``."""

    stream: str
    site: int


@dataclass(frozen=True)
class CoAttention:
    """Rules 10-11, one or both directions of one layer, all deltas from the state before it:
    each entry ``(s, q, site)`` is stream s attending to stream q at record ``site``.
    ``rule_11=False``: only rule 10 (DETR's decoder, where the image never attends back)."""

    directions: Tuple[Tuple[str, str, int], ...]
    rule_11: bool = True


@dataclass(frozen=True)
class Readout:
    """A map of the explanation: row ``rows`` of the relevance matrix ``R^{s q}``. ``rows`` is a
    (B,) tensor, or "target" for the explained target index (DETR's queries); ``zero_own``
    zeroes the explained token's own entry (LXMERT's ``R^tt[0, 0] = 0``)."""

    name: str
    s: str
    q: str
    rows: Union[Tensor, str]
    zero_own: bool = False


@dataclass
class CrossPlan:
    """Streams that attend to each other: the sites in the order the rules apply them."""

    streams: List[Stream]
    steps: List[Union[SelfAttention, CoAttention]]
    readouts: List[Readout]

    def sizes(self) -> Dict[str, int]:
        return {stream.name: stream.size for stream in self.streams}
