"""relfast.Explainer: explanations of unmodified models, batched, for any target.

Thin on purpose: it resolves the model's family and the method once, then each call runs one
:class:`~relfast.explain.session.Session`. The default method is [P2]'s generic rule; each
method's file in ``relfast.explain.methods`` states its rule.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import Tensor

from .families import Family, family_for
from .generate import GenerationExplanation, explain_generation
from .layout import TokenLayout, min_max
from .methods import METHODS, make_method
from .session import Session
from .targets import Targets, TargetSpec

__all__ = ["Explainer", "Explanation", "METHODS"]


@dataclass
class Explanation:
    """What an explainer returns.

    Attributes:
        logits: (B, C) the scores the target indexes: class logits; a causal LM's next-token
            logits at the explained position; a headless encoder's token embeddings (B, N, D).
        target: (B,) or (B, K) classes explained (None for a callable target); DETR: the queries;
            CLIP: (P,) the text index of each explained pair (its image index is ``pairs[:, 0]``).
        relevance: float32, the explained token's row of R over all N input tokens: (B, N), or
            (B, K, N) for K targets per sample; with ``full_matrix=True`` all rows, (B, N, N).
            VisualBERT: the row over text and regions together. Models with separate streams
            (CLIP, LXMERT, DETR): the first of ``maps`` (CLIP, DETR: "image"; LXMERT: "text").
        layout: the model's token layout (prefix tokens, patch grid, patch size).
        full_matrix: ``relevance`` holds all rows of R.
        pixel_level: ``relevance`` is over the input's pixels, (B[, K], H, W) (method ``lrp`` on
            images), not over tokens.
        maps: the relevance by token stream, float32: ``"image"`` (patches, regions or DETR's
            feature positions), ``"text"``, ``"queries"`` (DETR), each (B[, K], N_stream) over
            the stream's tokens. One-stream models: ``{"image" or "text": relevance}``. LLaVA:
            ``"text"`` (B[, K], N) over the LM's tokens and ``"image"`` (B[, K], h, w), already on
            the patch grid (``relfast.explain.families.hf_llava``).
        layouts: the token layout of each map.
        output: the model's own output, detached, for models whose scores are not all of it
            (DETR's logits and boxes); else None.
        pairs: CLIP: (P, 2) the (image, text) index of each explained pair (row p of the maps and
            logits is pair p); else None.
        layers: method ``attnlrp`` with ``layers=True``: the latent relevance of each layer, by
            map name as ``maps``, float32 (B, L, N_stream) or (B, K, L, N_stream): entry l is the
            relevance of the hidden states entering transformer block l (its residual stream),
            ``x ⊙ ∇x`` summed over the width, per token (prefix tokens such as a class token
            included: inside the model they carry relevance), from the same backward as ``maps``
            (CLIP: "image" over the vision tower's L blocks, "text" over the text tower's). Else None.
    """

    logits: Tensor
    target: Optional[Tensor]
    relevance: Tensor
    layout: TokenLayout
    full_matrix: bool = False
    pixel_level: bool = False
    maps: Dict[str, Tensor] = field(default_factory=dict)
    layouts: Dict[str, TokenLayout] = field(default_factory=dict)
    output: Any = None
    pairs: Optional[Tensor] = None
    layers: Optional[Dict[str, Tensor]] = None

    def __post_init__(self):
        if not self.maps:  # built by hand: the one stream's map
            self.maps = {"image" if self.layout.is_vision or self.pixel_level else "text": self.relevance}
        if not self.layouts:
            self.layouts = {name: self.layout for name in self.maps}

    def image_map(self, upsample: bool = False, normalize: bool = True) -> Tensor:
        """Vision models: the patch map (B[, K], h_p, w_p), prefix tokens dropped. With
        ``upsample=True``: bilinear upsampling by the patch size (align_corners=False) to pixels,
        then (``normalize=True``) min-max normalisation of each map to [0, 1], as the reference
        code does; ``normalize=False`` keeps the relevance values (to compare maps on one scale)."""
        if self.full_matrix:
            raise ValueError("relfast.Explanation.image_map: this explanation holds all rows of R (full_matrix=True); "
                             "a patch map is one row: use relevance[:, row] or explain with full_matrix=False")
        if self.pixel_level:  # already at the input's resolution
            return min_max(self.relevance) if upsample and normalize else self.relevance
        if "image" not in self.maps:
            raise ValueError(f"relfast.Explanation.image_map: this explanation has no image map (maps: "
                             f"{sorted(self.maps)})")
        layout = self.layouts["image"]
        image = self.maps["image"]
        # a map with one dimension more than the rows is a patch grid already (LLaVA's (B[, K], h, w))
        grid = image if image.dim() == self.relevance.dim() + 1 else layout.to_grid(image)
        return layout.to_pixels(grid, normalize) if upsample else grid


def _flag(name: str, value: Any) -> bool:
    """A boolean option, checked: "False" or "no" would read as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"relfast.Explainer: argument '{name}' must be True or False, got {value!r}")
    return bool(value)


class Explainer:
    """Explains predictions of an unmodified model.

    Args:
        model: a model of a supported family (``relfast.explain.families``), in eval mode, with
            the attention it was loaded with (SDPA, eager, timm fused, nn.MultiheadAttention).
            Any other module whose attention runs through ``scaled_dot_product_attention`` (or
            ``nn.MultiheadAttention``) is explained given ``layout``.
        method: "generic" ([P2], default); [P1]'s "transformer_attribution" (LRP-weighted
            attention gradients); or the [P1] baselines "rollout", "raw_attention",
            "attn_gradcam", "lrp" (LRP to the input: a pixel map for images) and
            "partial_lrp" (the last attention map's LRP relevance); "attnlrp" (AttnLRP, Achtibat
            et al. 2024: token or patch relevance from one forward and one backward).
        layout: a :class:`relfast.TokenLayout` describing the model's tokens; required for models
            of no listed family, and overrides a family's own.
        start_layer: the first layer of rollout's product (default 0) or of
            transformer_attribution's (default 1, as the reference's image evaluation; its BERT
            evaluation uses the last layer, -1); negative counts from the end.
        aggregate: False gives the "w/o aggregation" ablation of the generic rule (``R ← Ā·R``).
        full_matrix: return all rows of R (token-level tasks) instead of the explained row.
        use_lrp: the generic rule "with LRP" ([P2] supplement §4): heads averaged as in
            transformer attribution, ``E_h[(∇A ⊙ R_A)^+]``, over every layer.
        normalize, cross_self_attention: models with cross-attention (LXMERT, DETR): False gives
            the "w/o norm." and "Eq. 10 w/o self-attention" ablations of [P2] (supplement Table 1).
        rules: the LRP rules of "lrp" and "partial_lrp": "paper" (default; what the papers' public
            code computes for these baselines) or "textbook" (plain LRP: one αβ denominator, no
            halved products); docs/METHODS.md states both.
        layers: method "attnlrp" only: also the relevance of each layer's hidden states
            (``Explanation.layers``), from the same backward.

    Nothing of the model is changed, during or after a call; one explainer may be called from
    several threads at once.
    """

    def __init__(self, model: torch.nn.Module, method: str = "generic", *, layout: Optional[TokenLayout] = None,
                 start_layer: Optional[int] = None, aggregate: bool = True, full_matrix: bool = False,
                 use_lrp: bool = False, normalize: bool = True, cross_self_attention: bool = True,
                 rules: Optional[str] = None, layers: bool = False):
        if not isinstance(method, str):
            raise ValueError(f"relfast.Explainer: argument 'method' must be a method name (a str), got "
                             f"{type(method).__name__}")
        aggregate, full_matrix, use_lrp, normalize, cross_self_attention = (
            _flag(name, value) for name, value in (("aggregate", aggregate), ("full_matrix", full_matrix),
                                                   ("use_lrp", use_lrp), ("normalize", normalize),
                                                   ("cross_self_attention", cross_self_attention)))
        layers = _flag("layers", layers)
        if not aggregate and method != "generic":
            raise ValueError("relfast.Explainer: argument 'aggregate=False' is an ablation of method 'generic' only")
        if full_matrix and method not in ("generic", "rollout"):
            raise ValueError(f"relfast.Explainer: 'full_matrix=True' needs a method with a relevance matrix "
                             f"('generic' or 'rollout'), got {method!r}")
        self.family: Family = family_for(model, layout)
        self.family.check_method(method, dict(start_layer=start_layer, aggregate=aggregate, full_matrix=full_matrix,
                                              use_lrp=use_lrp))
        model_name = type(model).__name__
        cross_given = [name for name, value in (("normalize", normalize), ("cross_self_attention", cross_self_attention))
                       if value is not True]
        if cross_given and not self.family.cross_attention:
            raise ValueError(f"relfast.Explainer: argument '{cross_given[0]}' is an ablation of the co-attention rules "
                             f"(models with cross-attention: LXMERT, DETR); {model_name} has none")
        if self.family.cross_attention and (method != "generic" or use_lrp or full_matrix):
            raise ValueError(f"relfast.Explainer: {model_name} has cross-attention, which method 'generic' explains "
                             f"([P2] rules 6-11); got method {method!r}"
                             + (" with use_lrp=True" if use_lrp else "") + (" with full_matrix=True" if full_matrix else ""))
        if (use_lrp or method in ("transformer_attribution", "lrp", "partial_lrp")) and not self.family.lrp:
            raise ValueError(f"relfast.Explainer: method {method!r}{' with use_lrp=True' if use_lrp else ''} needs LRP "
                             f"rules for every layer, which relfast does not have for {model_name}; use "
                             "'generic', 'rollout', 'raw_attention' or 'attn_gradcam'")
        if self.family.cross_attention and start_layer is not None:
            raise ValueError(f"relfast.Explainer: argument 'start_layer' does not apply to {model_name}: the "
                             "co-attention rules run over every layer")
        if start_layer is None:
            start_layer = self.family.default_start_layer(method)
        self._method = make_method(method, start_layer=start_layer, aggregate=None if aggregate else False,
                                   full_matrix=True if full_matrix else None, use_lrp=use_lrp or None,
                                   normalize=None if normalize else False,
                                   cross_self_attention=None if cross_self_attention else False, rules=rules,
                                   layers=True if layers else None)
        self._method.check_family(self.family)
        self.model = model
        self.method = method
        layers = self.family.method_layers()
        if layers is not None:
            self._method.check_layers(layers)

    @property
    def layout(self) -> TokenLayout:
        return self.family.layout

    @property
    def full_matrix(self) -> bool:
        return self._method.full_matrix

    def __call__(self, inputs: Any, target: TargetSpec = None) -> Explanation:
        """Explain ``inputs`` (a tensor, or the dict a HF processor/tokenizer returns).

        ``target``: None (argmax per sample), an int, a (B,) tensor, K classes for every sample
        (a list of ints) or per sample (a (B, K) tensor or list of lists) -> relevance (B, K, N);
        or a callable mapping the model's scores (logits (B, C); token embeddings (B, N, D) for
        encoders without a head) to the explained scalar per sample (B,). Causal LMs: token ids
        of the next token. CLIP: the pairs (None: image b with text b; the text index of each
        image; "all"). DETR: query indices (None: the query whose best real class has the highest
        logit), K per image as for classes.
        """
        if self.family.needs_callable_target and not callable(target):
            raise ValueError(f"relfast.Explainer: a model without a classification head ({type(self.model).__name__}) "
                             "needs a callable 'target' mapping its output to one scalar per sample")
        targets = self.family.parse_target(target)
        result = self._explain(inputs, targets)
        return Explanation(result.scores, result.explained, result.relevance, self.layout, self.full_matrix,
                           pixel_level=self._method.pixel_level and self.layout.is_vision, maps=result.maps,
                           layouts=result.layouts, output=result.output, pairs=result.pairs, layers=result.layers)

    def _explain(self, inputs: Any, targets: Targets, traced: bool = False):
        """One session (a ``SessionResult``). ``relfast.export`` traces this with ``traced=True``."""
        return Session(self.family, self._method, targets, traced=traced).run(inputs)

    def generate(self, inputs: Any, max_new_tokens: int, *, chunk_size: Optional[int] = None, tokenizer: Any = None,
                 **generate_kwargs) -> "GenerationExplanation":
        """Causal LMs: generate with the model's own ``generate`` and explain every generated token
        against the prompt and the tokens before it (``relfast.explain.generate``).

        ``inputs``: the prompt batch (input_ids and attention_mask, padded on the left); the other
        keyword arguments go to ``model.generate`` as given (greedy or sampled, cache and
        generation config as configured). One forward over prompt + answer serves all T rows; their
        backwards run ``chunk_size`` generated tokens at a time as one batched backward (default
        8; memory grows with it, the result does not change). ``tokenizer``: also decode the answer
        and the tokens. Methods "generic" (``start_layer``, ``aggregate`` apply) and "attnlrp".
        Returns a :class:`relfast.explain.generate.GenerationExplanation`, relevance (B, T, N).
        LLaVA: ``inputs`` also hold the prompts' ``pixel_values``; method "generic"; the result's
        ``image`` (B, T, h, w) is each generated token's patch map."""
        return explain_generation(self, inputs, max_new_tokens, chunk_size=chunk_size, tokenizer=tokenizer,
                                  **generate_kwargs)
