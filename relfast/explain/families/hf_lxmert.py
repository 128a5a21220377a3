"""HuggingFace LXMERT (``LxmertForQuestionAnswering``): text and regions with co-attention,
explained with [P2] rules 6-11 in the reference's layer order (SPEC.md "LXMERT layer order").

LXMERT's attention is an explicit softmax, recorded by the capture in forward order: the
language layers, the vision layers, then per cross layer text→regions, regions→text (the
direction HF does not return), language self, vision self. The rules take them in that order;
the last cross layer contributes only its text co-attention and language self-attention (its
vision side reaches no output the head reads). ``maps["text"]`` is ``R^tt[0]`` with its own entry
zeroed, ``maps["image"]`` is ``R^ti[0]`` over the regions.
"""
import torch

from ..layout import TokenLayout
from ..streams import CoAttention, CrossPlan, Readout, SelfAttention, Stream
from .base import Family, ModelCall, check_batch, check_text, register, text_inputs

_VISUAL_KEYS = ("visual_feats", "visual_pos", "visual_attention_mask")
_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", *_VISUAL_KEYS})


@register
class HFLxmert(Family):
    name = "HuggingFace LXMERT (LxmertForQuestionAnswering)"
    softmax_capture = True
    cross_attention = True
    lrp = False
    exportable = False

    @classmethod
    def matches(cls, model):
        return type(model).__name__ == "LxmertForQuestionAnswering" and hasattr(model, "config")

    def default_layout(self):
        return TokenLayout(prefix_tokens=1)

    def num_classes(self):
        return self.model.config.num_qa_labels

    def _layers(self):
        config = self.model.config
        return config.l_layers, config.r_layers, config.x_layers

    def attention_sites(self):
        language, vision, cross = self._layers()
        return language + vision + 4 * cross

    def parse(self, inputs):
        inputs = dict(inputs) if hasattr(inputs, "keys") else inputs
        if not isinstance(inputs, dict) or "visual_feats" not in inputs or "visual_pos" not in inputs:
            raise ValueError("relfast.Explainer: LXMERT takes a dict with the tokenizer's 'input_ids' and the regions' "
                             "'visual_feats' (B, regions, visual_feat_dim) and 'visual_pos' (B, regions, 4)")
        visual = {key: inputs.pop(key) for key in _VISUAL_KEYS if key in inputs}
        text, batch = text_inputs(inputs, allowed=_KEYS, model=self.model)
        config = self.model.config
        if check_batch(visual, "visual_feats") != batch:
            raise ValueError(f"relfast.Explainer: argument 'inputs' holds {batch} texts but "
                             f"{visual['visual_feats'].shape[0]} 'visual_feats'; the batches must match")
        feats = visual["visual_feats"]
        for key, width in (("visual_feats", config.visual_feat_dim), ("visual_pos", config.visual_pos_dim)):
            value = visual[key]
            if value.dim() != 3 or value.shape[2] != width or not value.dtype.is_floating_point \
                    or tuple(value.shape[:2]) != (batch, feats.shape[1]) or value.shape[1] == 0:
                raise ValueError(f"relfast.Explainer: argument 'inputs' ('{key}') must be a floating-point tensor "
                                 f"({batch}, regions >= 1, {width}), got {value.dtype} {tuple(value.shape)}")
        if "visual_attention_mask" in visual and tuple(visual["visual_attention_mask"].shape) != tuple(feats.shape[:2]):
            raise ValueError(f"relfast.Explainer: argument 'inputs' ('visual_attention_mask') must have shape "
                             f"{tuple(feats.shape[:2])}, got {tuple(visual['visual_attention_mask'].shape)}")
        mask = text.get("attention_mask")
        return ModelCall({**text, **visual}, batch, num_tokens=text["input_ids"].shape[1],
                         token_mask=None if mask is None else mask.bool(), extras={"regions": feats.shape[1]})

    def check_values(self, call):
        super().check_values(call)
        config = self.model.config
        check_text(call.kwargs, config.vocab_size, config.max_position_embeddings, config.type_vocab_size)

    def scores(self, output, call):
        return output.question_answering_score

    def plan(self, records, call):
        language, vision, cross = self._layers()
        text, regions = call.num_tokens, call.extras["regions"]
        expected = [(text, text)] * language + [(regions, regions)] * vision
        expected += [(text, regions), (regions, text), (text, text), (regions, regions)] * cross
        if len(records) != len(expected):
            raise ValueError(f"relfast.Explainer: the LXMERT model has {len(expected)} attention maps per forward "
                             f"({language} language, {vision} vision and {cross} cross layers) but {len(records)} "
                             "were seen")
        for i, (record, shape) in enumerate(zip(records, expected)):
            if len(record.shape) != 4 or record.shape[0] != call.batch or tuple(record.shape[-2:]) != shape:
                raise ValueError(f"relfast.Explainer: LXMERT attention map {i} has shape {tuple(record.shape)}, "
                                 f"expected ({call.batch}, heads, {shape[0]}, {shape[1]})")
        steps = [SelfAttention("text", i) for i in range(language)]
        steps += [SelfAttention("image", language + i) for i in range(vision)]
        for layer in range(cross):
            to_image, to_text, text_self, image_self = (language + vision + 4 * layer + j for j in range(4))
            if layer + 1 < cross:
                steps += [CoAttention((("text", "image", to_image), ("image", "text", to_text))),
                          SelfAttention("text", text_self), SelfAttention("image", image_self)]
            else:  # the head reads the text stream: the last layer's vision side reaches nothing
                steps += [CoAttention((("text", "image", to_image),)), SelfAttention("text", text_self)]
        cls = torch.zeros(call.batch, dtype=torch.long)
        return CrossPlan([Stream("text", TokenLayout(prefix_tokens=1), text, token_mask=call.token_mask),
                          Stream("image", TokenLayout(prefix_tokens=0), regions)], steps,
                         [Readout("text", "text", "text", cls, zero_own=True), Readout("image", "text", "image", cls)])
