"""HuggingFace CLIP (``CLIPModel``): the image-text similarity logit of a pair, explained on both
towers ([P2], SPEC.md "CLIP").

The two encoders never attend to each other, so each is explained as a one-stream model
(``IndependentStreams``): the image map is the vision CLS row of R, the text map the row of the
EOT token (the token CLIP pools), kept on columns 1..EOT-1 and divided by their sum.

Pairs: a batch of B_i images and B_t texts; ``target`` picks the pairs explained: None pairs image
b with text b (equal batch sizes), a (B_i,) tensor or list gives the text of each image, and
``"all"`` explains all B_i x B_t pairs (maps (B_i·B_t, N), pair p = (p // B_t, p % B_t)). Each pair
is one row of the engine's batch (its own image and text forward), so every pair's gradient is
its own; the explanation's ``pairs`` says which is which and ``logits`` (P, 1) holds each pair's
similarity logit.

Method ``attnlrp`` keeps the same maps, pairs and targets, but each map is AttnLRP relevance of the
pair's logit as computed (``raw``: per patch, per token, not divided by a sum; each tower's sums to
half the logit: ``relfast.explain.attnlrp``).
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..layout import TokenLayout
from ..streams import IndependentStreams, Stream
from ..targets import Targets
from .base import (HFFamily, ModelCall, check_images, check_tensors, check_tower_records, image_call, pair,
                   patch_layout, register, text_inputs)

_KEYS = frozenset({"pixel_values", "input_ids", "attention_mask", "position_ids"})


@dataclass(frozen=True)
class PairTarget:
    """The parsed ``target=`` of a CLIP call: a text index per image, all pairs, or None (b with b)."""

    texts: Optional[Tensor] = None
    all_pairs: bool = False


@register
class HFClip(HFFamily):
    name = "HuggingFace CLIP (CLIPModel; target: the text of each image, or 'all' pairs)"
    class_names = frozenset({"CLIPModel"})
    lrp = False
    target_kind = "text"

    def default_layout(self):
        return patch_layout(self.model.config.vision_config, 1)

    def default_start_layer(self, method):
        return -1 if method == "generic" else None  # the reference explains CLIP's last layer only

    def _layers(self):
        config = self.model.config
        return config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers

    def attention_sites(self):
        return sum(self._layers())

    def method_layers(self):
        return min(self._layers())

    def max_positions(self):
        return self.model.config.text_config.max_position_embeddings

    def vocab_size(self):
        return self.model.config.text_config.vocab_size

    def parse_target(self, target):
        if target is None:
            return PairTarget()
        if isinstance(target, str):
            if target != "all":
                raise ValueError(f"relfast.Explainer: argument 'target' for CLIP must be None, 'all', or the text index "
                                 f"of each image; got {target!r}")
            return PairTarget(all_pairs=True)
        if callable(target) and not isinstance(target, Tensor):
            raise ValueError("relfast.Explainer: CLIP explains its image-text similarity; argument 'target' must be "
                             "None, 'all', or the text index of each image, not a callable")
        texts = Targets.parse(target, None).fixed
        if texts.dim() == 2:
            if texts.shape[0] != 1:
                raise ValueError(f"relfast.Explainer: argument 'target' for CLIP must be one text index per image "
                                 f"(B_images,), got shape {tuple(texts.shape)}")
            texts = texts[0]
        return PairTarget(texts=texts.reshape(-1) if texts.dim() else texts.reshape(1))

    def parse(self, inputs):
        if not hasattr(inputs, "keys"):
            check_tensors({"inputs": inputs})
            raise ValueError("relfast.Explainer: CLIP takes a dict with 'pixel_values' and 'input_ids' (a processor's "
                             f"output), got {type(inputs).__name__}")
        inputs = dict(inputs)
        if "pixel_values" not in inputs:
            raise ValueError(f"relfast.Explainer: argument 'inputs' must contain 'pixel_values', got keys "
                             f"{sorted(inputs)}")
        pixels = inputs.pop("pixel_values")
        text, texts = text_inputs(inputs, allowed=_KEYS, model=self.model)
        vision = self.model.config.vision_config
        images = check_images(pixels, (vision.num_channels, *pair(vision.image_size)))
        return ModelCall({"pixel_values": pixels, **text}, images, num_tokens=text["input_ids"].shape[1],
                         extras={"images": images, "texts": texts})

    def check_values(self, call):
        super().check_values(call)  # text values against vocab_size() and max_positions(): the text tower's
        check_eot(call.kwargs["input_ids"], call.token_mask, self.model.config.text_config.eos_token_id)

    def prepare(self, call, target):
        """One row per explained pair: image ``image_index[p]`` with text ``text_index[p]``."""
        images, texts = call.extras["images"], call.extras["texts"]
        if isinstance(target, Targets):  # an exported graph's target: the text of each image, -1 = its own
            if target.graph_tensor is None:
                raise TypeError("relfast: CLIP takes a PairTarget or an exported graph's target")
            image_index = torch.arange(images, device=target.graph_tensor.device)
            text_index = torch.where(target.graph_tensor < 0, image_index, target.graph_tensor)
        elif target.all_pairs:
            image_index = torch.arange(images).repeat_interleave(texts)
            text_index = torch.arange(texts).repeat(images)
        elif target.texts is not None:
            text_index = target.texts.expand(images) if target.texts.numel() == 1 else target.texts
            if text_index.shape[0] != images:
                raise ValueError(f"relfast.Explainer: argument 'target' holds {text_index.shape[0]} text indices but "
                                 f"the batch has {images} images (one text index per image)")
            low, high = int(text_index.min()), int(text_index.max())
            if low < 0 or high >= texts:
                raise ValueError(f"relfast.Explainer: argument 'target' holds text index {low if low < 0 else high}, "
                                 f"out of range for {texts} texts [0, {texts})")
            image_index = torch.arange(images)
        else:
            if images != texts:
                raise ValueError(f"relfast.Explainer: the text and image batches have different sizes ({texts} texts, "
                                 f"{images} images); pass target= the text index of each image, or 'all'")
            image_index = text_index = torch.arange(images)
        kwargs = {key: value[(image_index if key == "pixel_values" else text_index).to(value.device)]
                  for key, value in call.kwargs.items()}
        mask = kwargs.get("attention_mask")
        pairs = torch.stack([image_index, text_index], dim=1)
        expanded = ModelCall(kwargs, pairs.shape[0], num_tokens=call.num_tokens,
                             token_mask=None if mask is None else mask.bool(), pairs=pairs, extras=call.extras)
        # the explained scalar is column 0 of each row's (P, 1) scores; an exported graph keeps its tensor form
        index = torch.zeros_like(target.graph_tensor) if isinstance(target, Targets) else torch.tensor(0)
        return expanded, Targets(graph_tensor=index) if isinstance(target, Targets) else Targets(fixed=index)

    def scores(self, output, call):
        similarity = output.logits_per_image  # pair p: image p with text p (gather: its backward traces functionally)
        own = torch.arange(similarity.shape[0], device=similarity.device)
        return similarity.gather(1, own[:, None])

    def plan(self, records, call):
        vision_layers, text_layers = self._layers()
        image_tokens, text_tokens = self.layout.num_tokens, call.num_tokens
        check_tower_records(records, call.batch, "CLIP",
                            [("vision", vision_layers, image_tokens), ("text", text_layers, text_tokens)])
        ids = call.kwargs["input_ids"]
        image = Stream("image", self.layout, image_tokens, list(range(vision_layers)),
                       torch.zeros(call.batch, dtype=torch.long, device=ids.device))
        text = Stream("text", TokenLayout(prefix_tokens=1), text_tokens,
                      list(range(vision_layers, vision_layers + text_layers)),
                      eot_rows(ids, self.model.config.text_config.eos_token_id), call.token_mask)
        call.extras["eot"] = text.rows
        return IndependentStreams([image, text])

    def finish_maps(self, maps, call, raw=False):
        if not raw:  # attnlrp: every token's relevance, as computed (it sums to the pair's logit)
            maps["text"] = words_between(maps["text"], call.extras["eot"])
        return maps


def check_eot(ids: Tensor, token_mask: Optional[Tensor], eos_token_id: int) -> None:
    """Every text holds its end token among its real tokens: CLIP pools that token, and without
    it pools position 0 (the start token), whose map over the words is empty."""
    if eos_token_id == 2:  # older checkpoints pool the largest id: always some token
        return
    present = ids == eos_token_id
    if token_mask is not None:
        present &= token_mask.to(present.device)
    missing = (~present.any(dim=1)).nonzero().flatten()
    if missing.numel():
        raise ValueError(f"relfast.Explainer: argument 'inputs' (input_ids) holds a text without the end token "
                         f"(eos_token_id {eos_token_id}) among its real tokens (text {int(missing[0])}); CLIP reads "
                         "the text at that token: tokenize with the CLIP tokenizer, which appends it")


def eot_rows(ids: Tensor, eos_token_id: int) -> Tensor:
    """The token CLIP pools (as its text model does): the largest id when the config's
    eos_token_id is 2 (older checkpoints), else the first eos_token_id."""
    if eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


def words_between(text: Tensor, eot: Tensor) -> Tensor:
    """The EOT row on columns 1..EOT-1, divided by their sum (0 where it sums to 0); (B[, K], N)."""
    positions = torch.arange(text.shape[-1], device=text.device)
    eot = eot.to(text.device).view(-1, *([1] * (text.dim() - 1)))
    kept = text * ((positions >= 1) & (positions < eot))
    total = kept.sum(dim=-1, keepdim=True)
    return torch.where(total != 0, kept / torch.where(total != 0, total, 1), 0)


@register
class HFClipVision(HFFamily):
    """CLIP's image tower alone (``CLIPVisionModel[WithProjection]``): a callable target maps its
    pooled (projected) embedding (B, D) to the explained scalar, e.g. the similarity to a fixed
    text embedding. The map is the CLS row, as for ``CLIPModel``."""

    name = "HuggingFace CLIP image tower (CLIPVisionModel[WithProjection]) with a callable target"
    class_names = frozenset({"CLIPVisionModel", "CLIPVisionModelWithProjection"})
    needs_callable_target = True
    lrp = False

    def default_layout(self):
        return patch_layout(self.model.config, 1)

    def default_start_layer(self, method):
        return -1 if method == "generic" else None

    def parse(self, inputs):
        return image_call(inputs, self.model.config)

    def scores(self, output, call):
        embeds = getattr(output, "image_embeds", None)
        return embeds if embeds is not None else output.pooler_output


@register
class HFClipText(HFFamily):
    """CLIP's text tower alone (``CLIPTextModel[WithProjection]``): a callable target maps its
    pooled (projected) embedding to the explained scalar; the map is the EOT row on the words, as
    for ``CLIPModel``."""

    name = "HuggingFace CLIP text tower (CLIPTextModel[WithProjection]) with a callable target"
    class_names = frozenset({"CLIPTextModel", "CLIPTextModelWithProjection"})
    needs_callable_target = True
    lrp = False

    def default_layout(self):
        return TokenLayout(prefix_tokens=1)

    def default_start_layer(self, method):
        return -1 if method == "generic" else None

    def max_positions(self):
        return self.model.config.max_position_embeddings

    def parse(self, inputs):
        inputs, batch = text_inputs(inputs, model=self.model)
        mask = inputs.get("attention_mask")
        return ModelCall(inputs, batch, num_tokens=inputs["input_ids"].shape[1],
                         token_mask=None if mask is None else mask.bool())

    def check_values(self, call):
        super().check_values(call)
        check_eot(call.kwargs["input_ids"], call.token_mask, self.model.config.eos_token_id)

    def explained_rows(self, call, num_tokens, device):
        return eot_rows(call.kwargs["input_ids"], self.model.config.eos_token_id).to(device)

    def split_maps(self, relevance, call, raw=False):
        return {"text": relevance if raw else words_between(relevance, call.rows)}

    def scores(self, output, call):
        embeds = getattr(output, "text_embeds", None)
        return embeds if embeds is not None else output.pooler_output
