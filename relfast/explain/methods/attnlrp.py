"""AttnLRP (Achtibat et al., ICML 2024): relevance of the input tokens from one forward under the
AttnLRP rules and one ordinary backward per target, ``R = x ⊙ ∇x`` at the input embeddings summed
over their width (``relfast.explain.attnlrp`` states the rules). The model's attention runs as it
was loaded (SDPA stays the fused kernel, forward and backward; eager stays eager).

Output: (B, N) over the tokens (causal LMs: the next-token logit at the last real token; padding
0); images: per patch, from the patch embedding's output, prefix tokens (parameters, not inputs) 0;
(B, K, N) for K targets per sample. CLIP: each tower's map from the pair's similarity logit (one
backward for both); the maps are the relevance as computed (``raw_maps``: no normalisation by the
family's readout). Option ``layers``: also the relevance of the hidden states entering each
block, (B[, K], L, N) per stream, from the same backward (``Explanation.layers``).
"""
from typing import Dict, List, Optional

import torch

from ..attnlrp import AttnLrpPass, check_family
from .base import Method, Run


class AttnLrp(Method):
    name = "attnlrp"
    needs_gradients = False  # its own forward is the call's only forward
    uses_relevance_pass = True
    raw_maps = True  # signed relevance that sums to the logit: kept as computed
    option_defaults = {"layers": False}
    layers = False

    def check_family(self, family) -> None:
        check_family(family)

    def relevance_pass(self, family, call) -> AttnLrpPass:
        return AttnLrpPass(family, call, layers=self.layers)  # AttnLRP's rules instead of [P1]'s

    def relevance(self, run: Run) -> torch.Tensor:
        relevance_pass = run.relevance_pass
        per_layer: List[Optional[torch.Tensor]] = []

        def one_target(k: int, retain_graph: bool) -> torch.Tensor:
            relevance, layers = relevance_pass.relevance(k, lambda: run.explained_scalar(k), run.stream,
                                                         run.token_mask, run.layout.prefix_tokens,
                                                         retain_graph=retain_graph)
            per_layer.append(layers)
            return relevance

        result = run.for_each_target(one_target)
        if self.layers:
            layers = torch.stack(per_layer, dim=1) if run.targets.per_sample_k else per_layer[0]
            relevance_pass.layer_maps[run.stream.name if run.stream is not None else None] = layers.detach().float()
        return result

    def layer_maps(self, run: Run, maps: Dict[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
        if not self.layers:
            return None
        found = run.relevance_pass.layer_maps
        if None in found:  # one stream: named as its map
            return {next(iter(maps)): found[None]}
        return {name: found[name] for name in maps if name in found}
