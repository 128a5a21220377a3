"""HuggingFace VisualBERT (``VisualBertForQuestionAnswering``, ``VisualBertForVisualReasoning``):
one stream over [text; regions] ([P2], SPEC.md "VisualBERT").

The generic rule runs over the joint sequence as for any encoder. The explained row is the token
the head reads: question answering pools the last text token before [SEP]
(``attention_mask.sum(1) - 2``), visual reasoning the [CLS] token. ``maps["text"]`` is that row on
the text tokens with the row's own entry zeroed, ``maps["image"]`` the row on the region tokens.
VisualBERT's attention is an explicit softmax, which the capture records.
"""
import torch

from ..layout import TokenLayout
from .base import Family, ModelCall, check_batch, check_text, register, text_inputs

_NAMES = frozenset({"VisualBertForQuestionAnswering", "VisualBertForVisualReasoning"})
_VISUAL_KEYS = ("visual_embeds", "visual_attention_mask", "visual_token_type_ids")
_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids", *_VISUAL_KEYS})


@register
class HFVisualBert(Family):
    name = "HuggingFace VisualBERT (" + ", ".join(sorted(_NAMES)) + ")"
    softmax_capture = True
    lrp = False
    exportable = False

    @classmethod
    def matches(cls, model):
        return type(model).__name__ in _NAMES and hasattr(model, "config")

    def default_layout(self):
        return TokenLayout(prefix_tokens=0)

    def map_layout(self, name):
        return TokenLayout(prefix_tokens=1 if name == "text" else 0)

    def num_classes(self):
        return self.model.config.num_labels

    def attention_sites(self):
        return self.model.config.num_hidden_layers

    def parse(self, inputs):
        inputs = dict(inputs) if hasattr(inputs, "keys") else inputs
        if not isinstance(inputs, dict) or "visual_embeds" not in inputs:
            raise ValueError("relfast.Explainer: VisualBERT takes a dict with the tokenizer's 'input_ids' and "
                             "'attention_mask' and the regions' 'visual_embeds' (B, regions, visual_embedding_dim)")
        visual = {key: inputs.pop(key) for key in _VISUAL_KEYS if key in inputs}
        text, batch = text_inputs(inputs, allowed=_KEYS, model=self.model)
        if "attention_mask" not in text:
            raise ValueError("relfast.Explainer: argument 'inputs' must contain 'attention_mask': VisualBERT's head "
                             "reads the token it gives")
        embeds = visual["visual_embeds"]
        if check_batch(visual, "visual_embeds") != batch:
            raise ValueError(f"relfast.Explainer: argument 'inputs' holds {batch} texts but {embeds.shape[0]} "
                             "'visual_embeds'; the batches must match")
        width = self.model.config.visual_embedding_dim
        if embeds.dim() != 3 or embeds.shape[2] != width or embeds.shape[1] == 0 or not embeds.dtype.is_floating_point:
            raise ValueError(f"relfast.Explainer: argument 'inputs' ('visual_embeds') must be a floating-point tensor "
                             f"(B, regions >= 1, {width}), got {embeds.dtype} {tuple(embeds.shape)}")
        for key in ("visual_attention_mask", "visual_token_type_ids"):
            if key in visual and tuple(visual[key].shape) != tuple(embeds.shape[:2]):
                raise ValueError(f"relfast.Explainer: argument 'inputs' ('{key}') must have shape "
                                 f"{tuple(embeds.shape[:2])}, got {tuple(visual[key].shape)}")
        text_tokens, regions = text["input_ids"].shape[1], embeds.shape[1]
        text_mask = text["attention_mask"].bool()
        region_mask = visual["visual_attention_mask"].bool() if "visual_attention_mask" in visual else \
            torch.ones(batch, regions, dtype=torch.bool, device=text_mask.device)
        return ModelCall({**text, **visual}, batch, num_tokens=text_tokens + regions,
                         token_mask=torch.cat([text_mask, region_mask], dim=1), extras={"text_tokens": text_tokens})

    def check_values(self, call):
        super().check_values(call)
        config = self.model.config
        check_text(call.kwargs, config.vocab_size, config.max_position_embeddings, config.type_vocab_size)
        lengths = call.kwargs["attention_mask"].sum(dim=1)
        if type(self.model).__name__ == "VisualBertForQuestionAnswering" and bool((lengths < 2).any()):
            raise ValueError("relfast.Explainer: argument 'inputs' holds a text of fewer than 2 real tokens (sample "
                             f"{int((lengths < 2).nonzero()[0])}); VisualBERT's question-answering head reads the "
                             "token before the last real one, so every text needs [CLS] ... [SEP]")

    def explained_rows(self, call, num_tokens, device):
        if type(self.model).__name__ == "VisualBertForVisualReasoning":
            return torch.zeros(call.batch, dtype=torch.long, device=device)  # the pooler's [CLS]
        return (call.kwargs["attention_mask"].sum(1) - 2).long().to(device)  # what the QA head gathers

    def split_maps(self, relevance, call, raw=False):
        text_tokens = call.extras["text_tokens"]
        text = relevance[..., :text_tokens].clone()
        if not raw:
            rows = call.rows.to(text.device)
            samples = torch.arange(text.shape[0], device=text.device)
            text[samples, ..., rows] = 0  # the explained token's own entry
        return {"text": text, "image": relevance[..., text_tokens:]}
