"""HuggingFace LLaVA (``LlavaForConditionalGeneration``): a CLIP vision tower whose token features,
through the projector, become the image tokens of a causal LM's token stream. Explained as a
causal LM (the target is the next token's id at the last real token, as for ``HFCausalLM``), with
the relevance the LM gives its image tokens continued into the vision tower: [P2]'s
encoder-decoder composition (SPEC.md, as DETR's encoder feeds its decoder), here with the
projector in place of a cross-attention.

How the maps are composed, per sample and target (``Ā = E_h[(∇A ⊙ A)^+]`` of each site, all
from the one backward of the explained logit):

1. The LM (N tokens, image placeholders included): rule 6, ``r = e_lastᵀ (I + Ā_L) ··· (I + Ā_1)``,
   the explained token's row, over the whole LM stream: ``maps["text"]``.
2. The projector maps vision token ``s(j)`` to the j-th image placeholder of the sample, token by
   token (``vision_feature_select_strategy`` "default": s(j) = j + 1, the patches, the CLS token
   dropped; "full": s(j) = j, CLS first). The entries of ``r`` on the placeholders, ``r_img``, are
   put on the vision tokens they came from: ``u = r_img · P`` (P the F×V selection matrix).
3. The vision tower (V = 1 + h·w tokens): rule 6 with the same target's gradients,
   ``R^ii = (I + Ā_{L_v}) ··· (I + Ā_1)``. The layers after ``vision_feature_layer`` feed nothing
   the LM reads: their gradient is 0, so ``Ā = 0`` and their factor is I.
4. ``maps["image"] = (u · R^ii)`` on the patch columns (the CLS column dropped), as (h, w).

Steps 1-4 are one row of the product of ``(I + Ā)`` over the joint chain of sites (the vision
layers, then the LM's), as rule 6 gives it when the image tokens are the vision tower's outputs:
the engine runs them as one streamed row (``ChainedStreams``). So the image map of a generated
token (``Explainer.generate``) is the row of its own target, like its text row.

Inputs: a processor's dict of ``input_ids`` (image placeholders expanded: one
``config.image_token_id`` token per image feature), ``attention_mask`` (padding left or right;
positions come from the mask, as for causal LMs) and ``pixel_values`` (B, C, H, W): one image
per sample, of the vision tower's size, image b for sample b. Method ``generic`` only, without
``start_layer`` / ``aggregate=False`` / ``full_matrix`` / ``use_lrp``.

Maps: ``maps["text"]`` (B, N) (``Explanation.relevance``): the LM row over its token stream; at
the image placeholders it holds ``r_img``, the relevance of the image tokens as the LM's inputs
(what step 2 continues into the tower); padding 0. ``maps["image"]`` (B, h, w): the patch map;
``image_map(upsample=True)`` upsamples it by the patch size. (B, K, ...) for K targets per sample.
"""
from torch import Tensor

from ..layout import TokenLayout
from ..streams import Stream
from .base import (ChainedStreams, check_images, check_tensors, check_tower_records, pair, patch_layout, register,
                   text_inputs)
from .hf_causal_lm import HFCausalLM

_NAMES = frozenset({"LlavaForConditionalGeneration"})
_KEYS = frozenset({"input_ids", "attention_mask", "pixel_values"})  # pixel_values taken out first
_VISION_TOWERS = frozenset({"CLIPVisionModel"})
_STRATEGIES = {"default": 1, "full": 0}  # the vision token the first image feature comes from


@register
class HFLlava(HFCausalLM):
    name = ("HuggingFace LLaVA (LlavaForConditionalGeneration with a CLIP vision tower; inputs: input_ids with the "
            "image placeholders, attention_mask, pixel_values)")
    class_names = _NAMES
    lrp = False
    exportable = False

    def __init__(self, model, layout=None):
        super().__init__(model, layout)
        self._check_layout()

    @classmethod
    def matches(cls, model):  # subclasses of the class too
        return hasattr(model, "config") and any(c.__name__ in _NAMES for c in type(model).__mro__)

    # ---- the model's layout, checked once ----

    def _parts(self):
        inner = getattr(self.model, "model", self.model)  # transformers >= 4.52 nests the parts in .model
        return inner.vision_tower, inner.language_model

    def _check_layout(self) -> None:
        config, name = self.model.config, type(self.model).__name__
        vision, _ = self._parts()
        if type(vision).__name__ not in _VISION_TOWERS:
            raise ValueError(f"relfast.Explainer: {name} has a {type(vision).__name__} vision tower; relfast explains "
                             f"LLaVA with a {' or '.join(sorted(_VISION_TOWERS))} tower (a class token, then the patch "
                             "grid)")
        layer = config.vision_feature_layer
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"relfast.Explainer: {name} reads its image features from vision layers {layer!r}; "
                             "relfast explains one feature layer (config.vision_feature_layer an int), whose tokens "
                             "the projector maps one for one")
        states = config.vision_config.num_hidden_layers + 1  # the embeddings, then each layer's output
        if not -states <= layer < states:
            raise ValueError(f"relfast.Explainer: {name}'s vision_feature_layer {layer} is out of range for a vision "
                             f"tower of {states - 1} layers [-{states}, {states})")
        if config.vision_feature_select_strategy not in _STRATEGIES:
            raise ValueError(f"relfast.Explainer: {name}'s vision_feature_select_strategy is "
                             f"{config.vision_feature_select_strategy!r}; expected 'default' (CLS dropped) or 'full'")

    def default_layout(self):
        return TokenLayout(prefix_tokens=0, explained_token="last")

    def image_layout(self) -> TokenLayout:
        """The vision tower's tokens: the class token, then the patch grid."""
        return patch_layout(self.model.config.vision_config, 1)

    def features_per_image(self) -> int:
        """F: image placeholders per image, one per vision token the projector reads."""
        return self.image_layout().num_tokens - _STRATEGIES[self.model.config.vision_feature_select_strategy]

    def vision_layers_used(self) -> int:
        """How many vision layers the features pass through (hidden state k is layer k's input)."""
        config = self.model.config
        return config.vision_feature_layer % (config.vision_config.num_hidden_layers + 1)

    def check_method(self, method, options):
        model = type(self.model).__name__
        if method != "generic":
            raise ValueError(f"relfast.Explainer: {model} is explained by method 'generic' only ([P2]'s rule through "
                             f"the language model, continued into the vision tower); got method {method!r}")
        given = [f"{key}={options[key]!r}" for key, default in (("start_layer", None), ("aggregate", True),
                                                                ("full_matrix", False), ("use_lrp", False))
                 if options[key] != default]
        if given:
            raise ValueError(f"relfast.Explainer: argument {given[0]} does not apply to {model}: its rows run through "
                             "every layer of the language model and of the vision tower")

    def num_classes(self):
        return self.model.config.text_config.vocab_size

    def vocab_size(self):
        return self.model.config.text_config.vocab_size

    def max_positions(self):
        return getattr(self.model.config.text_config, "n_positions", None)

    def attention_sites(self):
        config = self.model.config
        return config.vision_config.num_hidden_layers + config.text_config.num_hidden_layers

    def method_layers(self):
        return None  # no start_layer

    def check_attention_implementation(self):
        model = type(self.model).__name__
        for part, config in (("vision tower", self.model.config.vision_config),
                             ("language model", self.model.config.text_config)):
            implementation = getattr(config, "_attn_implementation", None) or "eager"
            if implementation not in ("eager", "sdpa"):
                raise ValueError(f"relfast.Explainer: the {model} model's {part} runs attention with "
                                 f"'{implementation}', which relfast cannot see; load it with attn_implementation="
                                 "'sdpa' (the default) or 'eager'")

    # ---- inputs ----

    def parse(self, inputs):
        if not hasattr(inputs, "keys"):
            check_tensors({"inputs": inputs})
            raise ValueError(f"relfast.Explainer: {type(self.model).__name__} takes a dict with 'input_ids' (image "
                             "placeholders expanded), 'attention_mask' and 'pixel_values' (a processor's output), got "
                             f"{type(inputs).__name__}")
        inputs = dict(inputs)
        if "pixel_values" not in inputs:
            raise ValueError("relfast.Explainer: argument 'inputs' must contain 'pixel_values' (one image per "
                             f"sample), got keys {sorted(inputs)}")
        pixels = inputs.pop("pixel_values")
        call = super().parse(text_inputs(inputs, _KEYS, self.model)[0])
        vision = self.model.config.vision_config
        images = check_images(pixels, (vision.num_channels, *pair(vision.image_size)))
        if images != call.batch:
            raise ValueError(f"relfast.Explainer: argument 'inputs' holds {images} images (pixel_values) for "
                             f"{call.batch} prompts; relfast explains one image per sample, image b in prompt b")
        call.kwargs["pixel_values"] = pixels
        return call

    def check_values(self, call):
        super().check_values(call)  # pixels finite and bounded; ids, mask
        ids, mask = call.kwargs["input_ids"], call.token_mask
        token, count = self.model.config.image_token_id, self.features_per_image()
        placeholders = ids == token
        per_sample = placeholders.sum(dim=1)
        wrong = (per_sample != count).nonzero().flatten()
        if wrong.numel():
            b = int(wrong[0])
            raise ValueError(f"relfast.Explainer: argument 'inputs' (input_ids) holds {int(per_sample[b])} image "
                             f"placeholder tokens (id {token}) in sample {b}; expected {count}, one per feature of its "
                             f"image ({self._feature_words()}): expand the image token with the model's processor "
                             f"(if the model generated that id, suppress it: generate(..., suppress_tokens=[{token}]))")
        if mask is not None and bool((placeholders & ~mask.to(placeholders.device)).any()):
            raise ValueError("relfast.Explainer: argument 'inputs' (attention_mask) masks out image placeholder "
                             "tokens; the image tokens of a sample must be real tokens")

    def _feature_words(self) -> str:
        grid = self.image_layout().patch_grid
        strategy = self.model.config.vision_feature_select_strategy
        return f"{grid[0]}x{grid[1]} patches" + (" and the class token" if strategy == "full" else "")

    def generation_inputs(self, call):
        return {"pixel_values": call.kwargs["pixel_values"]}

    # ---- the streams ----

    def plan(self, records, call):
        config = self.model.config
        vision_layers, text_layers = config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers
        vision_tokens, text_tokens = self.image_layout().num_tokens, call.num_tokens
        check_tower_records(records, call.batch, type(self.model).__name__,
                            [("vision", vision_layers, vision_tokens), ("language", text_layers, text_tokens)])
        ids = call.kwargs["input_ids"]
        call.rows = self.layout.explained_rows(call.batch, call.token_mask, text_tokens, ids.device)
        text = Stream("text", self.layout, text_tokens, list(range(vision_layers, vision_layers + text_layers)),
                      call.rows, call.token_mask)
        image = Stream("image", self.image_layout(), vision_tokens, list(range(self.vision_layers_used())))
        # (B, F): each sample's placeholder positions, in order (feature j of image b fills the j-th)
        positions = (ids == config.image_token_id).nonzero()[:, 1].view(call.batch, -1)
        first = _STRATEGIES[config.vision_feature_select_strategy]
        return ChainedStreams([text, image], [lambda rows: _onto_vision_tokens(rows, positions, first, vision_tokens)])

    def finish_maps(self, maps, call, raw=False):
        if "image" in maps:  # (..., V) rows over the vision tokens -> (..., h, w) on the patches
            maps["image"] = self.image_layout().to_grid(maps["image"])
        return maps


def _onto_vision_tokens(rows: Tensor, positions: Tensor, first: int, vision_tokens: int) -> Tensor:
    """(..., B, K, N) rows over the LM's tokens -> (..., B, K, V): each sample's entries on its
    image placeholders ``positions`` (B, F) put on vision tokens ``first .. first + F - 1``."""
    index = positions.to(rows.device)[:, None, :].expand(*rows.shape[:-1], positions.shape[1])
    out = rows.new_zeros(*rows.shape[:-1], vision_tokens)
    out[..., first:first + positions.shape[1]] = rows.gather(-1, index)
    return out

