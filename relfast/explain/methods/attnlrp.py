"""AttnLRP (Achtibat et al., ICML 2024): relevance of the input tokens from one forward under the
AttnLRP rules and one ordinary backward per target, ``R = x ⊙ ∇x`` at the input embeddings summed
over their width (``relfast.explain.attnlrp`` states the rules). The model's attention runs as it
was loaded (SDPA stays the fused kernel, forward and backward; eager stays eager).

Output: (B, N) over the tokens (causal LMs: the next-token logit at the last real token; padding
0); images: per patch, from the patch embedding's output, prefix tokens (parameters, not inputs) 0;
(B, K, N) for K targets per sample.
"""
import torch

from ..attnlrp import AttnLrpPass, check_family
from .base import Method, Run


class AttnLrp(Method):
    name = "attnlrp"
    needs_gradients = False  # its own forward is the call's only forward
    uses_relevance_pass = True
    option_defaults = {}

    def check_family(self, family) -> None:
        check_family(family)

    def relevance_pass(self, family, call, sites=None) -> AttnLrpPass:
        return AttnLrpPass(family, call)  # AttnLRP's rules instead of [P1]'s

    def relevance(self, run: Run) -> torch.Tensor:
        relevance_pass = run.relevance_pass

        def one_target(k: int, retain_graph: bool) -> torch.Tensor:
            return relevance_pass.input_relevance(run.explained_scalar(k), run.token_mask, run.layout.prefix_tokens,
                                                  retain_graph=retain_graph)

        return run.for_each_target(one_target)
