"""HuggingFace BERT-family sequence classifiers (BERT, RoBERTa, DistilBERT, ...)."""
from typing import Any

import torch

from .base import Adapter, check_batch, register

# Tested families only; a sibling with the same attention outputs is one name away (and one test).
_NAMES = {"BertForSequenceClassification", "RobertaForSequenceClassification", "DistilBertForSequenceClassification"}


def text_inputs(inputs: Any):
    """The tokenizer's dict (or bare input_ids) as a dict, and its batch size, validated."""
    inputs = {"input_ids": inputs} if isinstance(inputs, torch.Tensor) else dict(inputs)
    batch = check_batch(inputs, "input_ids")
    if inputs["input_ids"].dim() != 2:
        raise ValueError("relfast.Explainer: argument 'inputs' (input_ids) must have shape (B, N), got "
                         f"{tuple(inputs['input_ids'].shape)}")
    return inputs, batch


@register
class HFBertFamily(Adapter):
    family = "HuggingFace BERT family (" + ", ".join(sorted(_NAMES)) + ")"
    num_prefix_tokens = 1  # [CLS] / <s>
    class_names = _NAMES
    output_field = "logits"

    @classmethod
    def matches(cls, model):
        return type(model).__name__ in cls.class_names and hasattr(model, "config")

    def forward(self, inputs: Any):
        inputs, batch = text_inputs(inputs)
        out = self.model(**inputs, output_attentions=True)
        return getattr(out, self.output_field), out.attentions, batch


_ENCODER_NAMES = {"BertModel", "RobertaModel", "DistilBertModel"}


@register
class HFBertEncoder(HFBertFamily):
    """BERT-family encoders without a classification head (e.g. sentence-embedding models). Their
    output is the token embeddings (B, N, D); the explained scalar must come from a callable target
    (e.g. ``relfast.explain.mean_pooled_cosine``)."""

    family = "HuggingFace BERT-family encoders (" + ", ".join(sorted(_ENCODER_NAMES)) + ") with a callable target"
    needs_callable_target = True
    class_names = _ENCODER_NAMES
    output_field = "last_hidden_state"
