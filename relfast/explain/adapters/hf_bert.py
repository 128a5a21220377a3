"""HuggingFace BERT-family sequence classifiers (BERT, RoBERTa, DistilBERT, ...)."""
from typing import Any

import torch

from .base import Adapter, check_batch, register

_NAMES = {"BertForSequenceClassification", "RobertaForSequenceClassification", "DistilBertForSequenceClassification",
          "XLMRobertaForSequenceClassification", "ElectraForSequenceClassification", "AlbertForSequenceClassification"}


@register
class HFBertFamily(Adapter):
    family = "HuggingFace BERT family (" + ", ".join(sorted(_NAMES)) + ")"
    num_prefix_tokens = 1  # [CLS] / <s>

    @staticmethod
    def matches(model):
        return type(model).__name__ in _NAMES and hasattr(model, "config")

    def forward(self, inputs: Any):
        if isinstance(inputs, torch.Tensor):
            inputs = {"input_ids": inputs}
        inputs = dict(inputs)
        batch = check_batch(inputs, "input_ids")
        if inputs["input_ids"].dim() != 2:
            raise ValueError("relfast.Explainer: argument 'inputs' (input_ids) must have shape (B, N), got "
                             f"{tuple(inputs['input_ids'].shape)}")
        out = self.model(**inputs, output_attentions=True)
        return out.logits, out.attentions, batch
