"""What the engine needs from a model family, and the registry of families.

Adding a family is one small file: subclass :class:`Family`, implement ``matches``, ``parse``
(inputs -> a :class:`ModelCall`, every check before any work) and, where the model's output is
not the (B, C) scores, ``scores``; set its :class:`TokenLayout`; decorate it with ``@register``.
The engine sees the attention itself (``relfast.explain.capture``): a family never touches it.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import torch
from torch import Tensor

from ...runtime import MAX_ABS_FLOAT_INPUT  # numpy only: the bound every entry point applies
from ..layout import TokenLayout
from ..streams import Stream
from ..targets import Targets

_FAMILIES: List[Type["Family"]] = []


def register(cls: Type["Family"]) -> Type["Family"]:
    _FAMILIES.append(cls)
    return cls


@dataclass
class ModelCall:
    """One parsed call of the model.

    Attributes:
        kwargs: the model's keyword inputs (positional: under ``args``).
        batch: B.
        num_tokens: N when the inputs fix it (text: the sequence length), else None.
        token_mask: (B, N) bool, the real tokens (text with padding), or None (all real).
        args: positional inputs (models called as ``model(x)``).
    """

    kwargs: Dict[str, Any]
    batch: int
    num_tokens: Optional[int] = None
    token_mask: Optional[Tensor] = None
    args: Tuple[Any, ...] = ()
    rows: Optional[Tensor] = field(default=None, repr=False)  # (B,) explained tokens, set after the forward
    pairs: Optional[Tensor] = None  # CLIP: (P, 2) the (image, text) index of each explained pair
    extras: Dict[str, Any] = field(default_factory=dict, repr=False)  # what a family keeps between its steps


@dataclass
class ChainedStreams:
    """A plan (beside ``relfast.explain.streams``' ``IndependentStreams`` and ``CrossPlan``) for
    streams that feed one another instead of attending to each other: a stream's tokens are made,
    token by token, from another stream's outputs (LLaVA: the vision tower's outputs, through the
    per-token projector, are the image tokens of the LM's stream). Rule 6's explained rows run
    backward through ``streams[0]``'s sites (the stream the explained output reads), then
    ``seeds[0]`` carries them onto ``streams[1]``'s tokens and they go on through its sites, and
    so on: one row of the product of ``(I + Ā)`` over the joint chain of sites. Each stream's rows
    are a map (``maps[stream.name]``, ``Family.finish_maps`` then reads them out).

    Attributes:
        streams: in the order the rows traverse them, the explained stream first; each with its
            ``sites`` (record indices, forward order; a stream's sites all come after those of
            the streams after it in this list, as the model runs them) and ``size``.
        seeds: ``len(streams) - 1`` functions from rows over stream i's tokens to rows over stream
            i+1's, (..., B, K, N_i) -> (..., B, K, N_{i+1}), leading dimensions kept: each entry
            on a token made from stream i+1 placed on the token it was made from.
    """

    streams: List[Stream]
    seeds: List[Callable[[Tensor], Tensor]]


class Family:
    """A model family: how to call the model, where its tokens come from, what its scores are.

    Class attributes:
        name: shown in errors and in the list of supported families.
        needs_callable_target: models without a head (their output is not class scores).
        hf_attention: HuggingFace models: the attention implementation is read from the config
            (``sdpa`` or ``eager``; others are refused).
        softmax_capture: also record explicit attention softmaxes (eager attention: HF ``eager``,
            hand-written, timm with ``fused_attn=False``).
    """

    name = "?"
    needs_callable_target = False
    hf_attention = False
    softmax_capture = False
    cross_attention = False  # its streams attend to each other (rules 6-11; method 'generic' only)
    lrp = True  # the LRP relevance pass knows its layers
    keeps_output = False  # the Explanation keeps the model's (detached) output
    exportable = True  # relfast.export traces it (tested families only)
    fixed_batch_export = ""  # why its export needs a fixed batch ("" = it does not)
    target_kind = "class"  # what the target indexes: "class", "query" (DETR), "text" (CLIP: per image)

    def __init__(self, model: torch.nn.Module, layout: Optional[TokenLayout] = None):
        self.model = model
        self.layout = layout if layout is not None else self.default_layout()

    @classmethod
    def matches(cls, model: torch.nn.Module) -> bool:
        raise NotImplementedError

    def default_layout(self) -> TokenLayout:
        return TokenLayout()

    def num_classes(self) -> Optional[int]:
        """Classes the target indexes (None: not known before the forward)."""
        return None

    def method_layers(self) -> Optional[int]:
        """The layers a method's ``start_layer`` counts (each stream's, where they differ: the fewest)."""
        return self.attention_sites()

    def default_start_layer(self, method: str) -> Optional[int]:
        """The family's own default of the ``start_layer`` option (None: the method's)."""
        return None

    def vocab_size(self) -> Optional[int]:
        return getattr(getattr(self.model, "config", None), "vocab_size", None)

    def export_outputs(self, output: Any) -> Dict[str, Tensor]:
        """Outputs of the model an exported graph returns beside the maps (DETR's boxes)."""
        return {}

    def max_positions(self) -> Optional[int]:
        """Text models with learned absolute positions: the longest sequence they take."""
        return None

    def attention_sites(self) -> Optional[int]:
        """How many attention sites one forward must show (None: not known)."""
        return None

    def check_method(self, method: str, options: Dict[str, Any]) -> None:
        """Refuse, when the explainer is made, a method or an option the family cannot explain
        (``options``: the explainer's ``start_layer``, ``aggregate``, ``full_matrix``, ``use_lrp``
        as given). Default: every method and option is taken."""

    def generation_inputs(self, call: ModelCall) -> Dict[str, Tensor]:
        """Models that generate: the prompt batch's inputs other than its token ids and mask, which
        ``generate`` and the explained forward over prompt + answer take as given (LLaVA:
        ``pixel_values``). Default: none."""
        return {}

    def check_attention_implementation(self) -> None:
        """HF models: refuse an attention implementation relfast cannot see (read at every call,
        never changed). The capture sees ``sdpa`` calls and ``eager`` softmaxes alike, so a model
        mixing the two across layers is explained as it runs."""
        if not self.hf_attention:
            return
        config = getattr(self.model, "config", None)
        implementation = getattr(config, "_attn_implementation", None) or "eager"
        if implementation not in ("eager", "sdpa"):
            raise ValueError(f"relfast.Explainer: the {type(self.model).__name__} model runs attention with "
                             f"'{implementation}', which relfast cannot see; load it with attn_implementation='sdpa' "
                             "(the default) or 'eager'")

    def parse(self, inputs: Any) -> ModelCall:
        raise NotImplementedError

    def check_input_types(self, call: ModelCall) -> None:
        """Floating-point inputs (pixels, embeddings; not masks) in the model's dtype, and every
        input on the model's device: a mismatch fails deep inside most models (timm, torchvision,
        DETR, VisualBERT, LXMERT), or is silently cast by some."""
        parameter = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        if parameter is None:
            return
        named = list(call.kwargs.items()) + [(f"inputs[{i}]", a) for i, a in enumerate(call.args)]
        for name, value in named:
            if not isinstance(value, Tensor):
                continue
            if value.device != parameter.device:
                raise ValueError(f"relfast.Explainer: argument 'inputs' ('{name}') is on {value.device} but the model "
                                 f"is on {parameter.device}; move the inputs with .to('{parameter.device}')")
            if value.is_floating_point() and not name.endswith("mask") and value.dtype != parameter.dtype:
                raise ValueError(f"relfast.Explainer: argument 'inputs' ('{name}') is {value.dtype} but the model "
                                 f"computes in {parameter.dtype}; cast the inputs with .to({parameter.dtype})")

    def check_values(self, call: ModelCall) -> None:
        """Checks that read the inputs' values (before any work): floating-point inputs finite and
        within ``MAX_ABS_FLOAT_INPUT`` (the bound the ONNX runtime applies too)."""
        named = list(call.kwargs.items()) + [(f"inputs[{i}]", a) for i, a in enumerate(call.args)]
        for name, value in named:
            if not isinstance(value, Tensor) or not value.dtype.is_floating_point or value.numel() == 0:
                continue
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"relfast.Explainer: argument 'inputs' ('{name}') holds NaN or infinite values")
            largest = float(value.detach().abs().max())
            if largest > MAX_ABS_FLOAT_INPUT:
                raise ValueError(f"relfast.Explainer: argument 'inputs' ('{name}') holds a value of magnitude "
                                 f"{largest:.3g}; float inputs must lie within ±{MAX_ABS_FLOAT_INPUT:g} (normalised "
                                 "pixels or embeddings are of order 1; far larger ones overflow inside the model)")

    def forward(self, call: ModelCall) -> Any:
        """Runs the model on the parsed call: its output."""
        return self.model(*call.args, **call.kwargs)

    def scores(self, output: Any, call: ModelCall) -> Tensor:
        """The (B, C) values a target indexes (a callable target receives them)."""
        return output.logits

    def plain_scores(self, inputs: Any) -> Tensor:
        """The model's scores for ``inputs`` as a plain no-grad forward (no capture): what the
        evaluation protocols measure accuracy and occlusion with."""
        call = self.parse(inputs)
        with torch.no_grad():
            output = self.forward(call)
            return self.scores(output, call)

    # ---- several token streams (see relfast.explain.streams); one-stream families keep these ----

    def prepare(self, call: ModelCall, targets: Targets) -> Tuple[ModelCall, Targets]:
        """The call and targets as the engine runs them (CLIP: one row per explained pair)."""
        return call, targets

    def parse_target(self, target: Any) -> Targets:
        """The ``target=`` argument, checked before any work."""
        return Targets.parse(target, self.num_classes())

    def plan(self, records: List[Any], call: ModelCall) -> Optional[Any]:
        """None for one stream; else an ``IndependentStreams`` or ``CrossPlan`` over ``records``
        (checked here: every site seen, of the shapes the model's streams give)."""
        return None

    def explained_rows(self, call: ModelCall, num_tokens: int, device) -> Tensor:
        """(B,) int64: the explained token of each sample (the layout's, unless the head reads another)."""
        return self.layout.explained_rows(call.batch, call.token_mask, num_tokens, device)

    def explained_row_weights(self, call: ModelCall, device) -> Optional[Tensor]:
        """(B, N) weights when the head reads a weighted mean of tokens rather than one token
        (then the explained row is that mean of rows); None for one token (``explained_rows``)."""
        return None

    def split_maps(self, relevance: Tensor, call: ModelCall, raw: bool = False) -> Dict[str, Tensor]:
        """One stream's explained rows as named maps. ``raw``: the method's maps are relevance to
        keep as computed (attnlrp), without the family's readout normalisation."""
        return {"image" if self.layout.is_vision else "text": relevance}

    def map_layout(self, name: str) -> TokenLayout:
        return self.layout

    def finish_maps(self, maps: Dict[str, Tensor], call: ModelCall, raw: bool = False) -> Dict[str, Tensor]:
        """Multi-stream maps as the model's reference reads them out (``raw``: as ``split_maps``)."""
        return maps


def family_for(model: torch.nn.Module, layout: Optional[TokenLayout] = None) -> Family:
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"relfast.Explainer: argument 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if layout is not None and not isinstance(layout, TokenLayout):
        raise ValueError(f"relfast.Explainer: argument 'layout' must be a relfast.TokenLayout, got "
                         f"{type(layout).__name__}")
    for cls in _FAMILIES:
        if cls.matches(model):
            return cls(model, layout)
    if layout is not None:
        from .sdpa_module import AnyAttentionModule

        return AnyAttentionModule(model, layout)
    families = "; ".join(cls.name for cls in _FAMILIES)
    raise ValueError(
        f"relfast.Explainer: unsupported model {type(model).__name__}. Supported families: {families}. Any other "
        "module whose attention runs through torch's scaled_dot_product_attention (or nn.MultiheadAttention) is "
        "explained when you describe its tokens: relfast.Explainer(model, layout=relfast.TokenLayout(prefix_tokens=1, "
        "patch_grid=(14, 14), patch_size=16)); a new family is one small file in relfast/explain/families/.")


def check_tower_records(records: List[Any], batch: int, model: str, towers: List[Tuple[str, int, int]]) -> None:
    """Records of towers that run one after the other (CLIP's vision then text, LLaVA's vision then
    language): ``towers`` = [(name, layers, tokens)] in forward order; each tower's maps must be
    (batch, heads, tokens, tokens), and there must be as many as its layers."""
    expected = sum(layers for _, layers, _ in towers)
    if len(records) != expected:
        counts = " and ".join(f"{layers} {name}" for name, layers, _ in towers)
        raise ValueError(f"relfast.Explainer: the {model} model has {counts} attention layers but {len(records)} "
                         "attention maps were seen in its forward")
    sizes = [tokens for _, layers, tokens in towers for _ in range(layers)]
    for i, (record, n) in enumerate(zip(records, sizes)):
        if len(record.shape) != 4 or record.shape[0] != batch or tuple(record.shape[-2:]) != (n, n):
            raise ValueError(f"relfast.Explainer: {model} attention map {i} has shape {tuple(record.shape)}, "
                             f"expected ({batch}, heads, {n}, {n})")


def check_batch(inputs: Dict[str, Tensor], key: str) -> int:
    """The batch size of ``inputs[key]``, rejecting empty batches before any work."""
    if key not in inputs:
        raise ValueError(f"relfast.Explainer: argument 'inputs' must contain '{key}', got keys {sorted(inputs)}")
    check_tensors({key: inputs[key]})
    if inputs[key].dim() == 0:
        raise ValueError(f"relfast.Explainer: argument 'inputs' ('{key}') must be a tensor with a batch dimension")
    batch = inputs[key].shape[0]
    if batch == 0:
        raise ValueError(f"relfast.Explainer: argument 'inputs' holds an empty batch ('{key}' has shape "
                         f"{tuple(inputs[key].shape)}); there is nothing to explain")
    return batch


def check_tensors(inputs: Dict[str, Any]) -> None:
    """Every input a torch tensor (numpy arrays and lists fail obscurely inside models)."""
    for key, value in inputs.items():
        if not isinstance(value, Tensor):
            hint = "; convert it with torch.from_numpy(...)" if type(value).__module__ == "numpy" else ""
            raise ValueError(f"relfast.Explainer: argument 'inputs' ('{key}') must be a torch.Tensor, got "
                             f"{type(value).__module__}.{type(value).__name__}{hint}")


def check_keys(inputs: Dict[str, Any], allowed: frozenset, model: torch.nn.Module) -> None:
    """A misspelled key (``attn_mask``) would be dropped or ignored by the model: refuse it."""
    unknown = sorted(set(inputs) - set(allowed))
    cached = [key for key in unknown if key in ("past_key_values", "use_cache", "cache_position")]
    if cached:
        raise ValueError(f"relfast.Explainer: argument 'inputs' holds '{cached[0]}': relfast explains the whole "
                         "sequence in one forward, without a key/value cache; pass the full input_ids (and "
                         "attention_mask) instead")
    if unknown:
        raise ValueError(f"relfast.Explainer: argument 'inputs' has key(s) {unknown} that relfast does not pass to "
                         f"{type(model).__name__}; expected keys among {sorted(allowed)}")


def check_images(pixels: Any, expected_chw: Tuple[int, ...]) -> int:
    """The batch size of an image batch (B, C, H, W) of the shape the model takes, checked before
    any work (empty batches and non-finite values rejected)."""
    batch = check_batch({"pixel_values": pixels}, "pixel_values")
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != tuple(expected_chw):
        raise ValueError(f"relfast.Explainer: argument 'inputs' (pixel_values) must have shape (B, "
                         f"{', '.join(map(str, expected_chw))}) for this model, got {tuple(pixels.shape)}")
    if not pixels.dtype.is_floating_point:
        raise ValueError(f"relfast.Explainer: argument 'inputs' (pixel_values) must be a floating-point tensor "
                         f"(normalised as the model expects), got {pixels.dtype}")
    return batch


def pair(value) -> Tuple[int, int]:
    """An HF config's image or patch size (an int or a pair) as (height, width)."""
    return (value, value) if isinstance(value, int) else tuple(value)


def patch_layout(config: Any, prefix_tokens: int) -> TokenLayout:
    """The token layout of a ViT-style HF config (``image_size``, ``patch_size``)."""
    image, patch = pair(config.image_size), pair(config.patch_size)
    return TokenLayout(prefix_tokens=prefix_tokens, patch_grid=(image[0] // patch[0], image[1] // patch[1]),
                       patch_size=patch)


def image_call(inputs: Any, config: Any) -> ModelCall:
    """An image batch for a ViT-style HF config, checked (channels, size, dtype, non-empty)."""
    pixels = image_inputs(inputs)
    return ModelCall({"pixel_values": pixels}, check_images(pixels, (config.num_channels, *pair(config.image_size))))


def image_inputs(inputs: Any, key: str = "pixel_values") -> Tensor:
    """An image batch given as a tensor or as a processor's dict (holding only ``key``)."""
    if isinstance(inputs, Tensor):
        return inputs
    if hasattr(inputs, "keys"):
        inputs = dict(inputs)
        if key not in inputs:
            raise ValueError(f"relfast.Explainer: argument 'inputs' must contain '{key}', got keys {sorted(inputs)}")
        unknown = sorted(set(inputs) - {key})
        if unknown:
            raise ValueError(f"relfast.Explainer: argument 'inputs' has key(s) {unknown} that an image model does not "
                             f"take; expected only '{key}'")
        return inputs[key]
    check_tensors({"inputs": inputs})
    raise ValueError(f"relfast.Explainer: argument 'inputs' must be an image tensor (B, C, H, W) or a dict with "
                     f"'{key}', got {type(inputs).__name__}")


TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids"})


def text_inputs(inputs: Any, allowed: frozenset = TEXT_KEYS, model: Optional[torch.nn.Module] = None):
    """A tokenizer's dict (or bare input_ids) as a dict, and its batch size, validated: tensors
    only, known keys, integer ids (B, N) with N >= 1, masks of the ids' shape."""
    if hasattr(inputs, "keys"):
        inputs = dict(inputs)
    elif isinstance(inputs, Tensor):
        inputs = {"input_ids": inputs}
    else:
        check_tensors({"inputs": inputs})
    if model is not None:  # before the tensor check: a cache object is refused as a cache
        check_keys(inputs, allowed, model)
    check_tensors(inputs)
    batch = check_batch(inputs, "input_ids")
    ids = inputs["input_ids"]
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError("relfast.Explainer: argument 'inputs' (input_ids) must be an integer tensor of shape (B, N), "
                         f"got {ids.dtype} {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("relfast.Explainer: argument 'inputs' (input_ids) holds empty sequences (N = 0); there is "
                         "nothing to explain")
    for key in ("attention_mask", "token_type_ids", "position_ids"):
        if key in inputs and tuple(inputs[key].shape) != tuple(ids.shape):
            raise ValueError(f"relfast.Explainer: argument 'inputs' ({key}) must have the shape of input_ids "
                             f"{tuple(ids.shape)}, got {tuple(inputs[key].shape)}")
    return inputs, batch


def check_token_ids(ids: Tensor, vocab_size: Optional[int], max_positions: Optional[int]) -> None:
    """Ids inside the vocabulary; sequences no longer than the model's learned positions."""
    if vocab_size is not None and ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"relfast.Explainer: argument 'inputs' (input_ids) holds token id {low if low < 0 else high}"
                             f", outside the model's vocabulary [0, {vocab_size})")
    if max_positions is not None and ids.shape[1] > max_positions:
        raise ValueError(f"relfast.Explainer: argument 'inputs' (input_ids) holds sequences of {ids.shape[1]} tokens; "
                         f"the model has {max_positions} positions")


def check_mask(mask: Optional[Tensor], key: str = "attention_mask", what: str = "real token") -> None:
    """A padding mask of 0s and 1s (other values would shift positions or weight tokens), with at
    least one real entry per sample (an all-padding sample has nothing to explain)."""
    if mask is None or mask.numel() == 0:
        return
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        odd = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
        raise ValueError(f"relfast.Explainer: argument 'inputs' ({key}) must hold only 0 (padding) and 1 (real), got "
                         f"{odd:g}")
    if not bool(mask.flatten(1).bool().any(dim=1).all()):
        raise ValueError(f"relfast.Explainer: argument 'inputs' holds a sample whose {key} is all zeros; every "
                         f"sample needs at least one {what}")


def check_index_range(inputs: Dict[str, Any], key: str, size: Optional[int], what: str) -> None:
    """An index input (token_type_ids, position_ids) inside the embedding table it reads."""
    value = inputs.get(key)
    if size is None or not isinstance(value, Tensor) or value.numel() == 0:
        return
    low, high = int(value.min()), int(value.max())
    if low < 0 or high >= size:
        raise ValueError(f"relfast.Explainer: argument 'inputs' ({key}) holds {low if low < 0 else high}, outside the "
                         f"model's {size} {what} [0, {size})")


def check_text(inputs: Dict[str, Any], vocab_size: Optional[int], max_positions: Optional[int],
               type_vocab_size: Optional[int] = None) -> None:
    """Every value check of a text batch: ids, mask, token types and explicit positions."""
    check_token_ids(inputs["input_ids"], vocab_size, max_positions)
    check_mask(inputs.get("attention_mask"))
    check_index_range(inputs, "token_type_ids", type_vocab_size, "token types")
    check_index_range(inputs, "position_ids", max_positions, "positions")


class HFFamily(Family):
    """HuggingFace models, matched by class name (``class_names``); the attention implementation
    and the number of layers come from the config."""

    hf_attention = True
    softmax_capture = True  # eager layers: their softmax (a 4-D softmax over the keys) is the map
    class_names: frozenset = frozenset()

    @classmethod
    def matches(cls, model):
        return type(model).__name__ in cls.class_names and hasattr(model, "config")

    def attention_sites(self):
        return getattr(self.model.config, "num_hidden_layers", None)

    def check_values(self, call: ModelCall) -> None:
        super().check_values(call)
        if "input_ids" in call.kwargs:  # text: ids, masks, token types and positions in range
            check_text(call.kwargs, self.vocab_size(), self.max_positions(),
                       getattr(self.model.config, "type_vocab_size", None))


def is_instance(model: torch.nn.Module, module_name: str, class_name: str) -> bool:
    """isinstance against a class of an optional library (False when it is not installed)."""
    import importlib

    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return False
    return isinstance(model, cls)
