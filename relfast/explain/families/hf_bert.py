"""HuggingFace BERT-family sequence classifiers and encoders (BERT, RoBERTa, DistilBERT)."""
from .base import HFFamily, ModelCall, register, text_inputs

# Tested families only; a sibling with the same attention is one name away (and one test).
_CLASSIFIERS = frozenset({"BertForSequenceClassification", "RobertaForSequenceClassification",
                          "DistilBertForSequenceClassification"})
_ENCODERS = frozenset({"BertModel", "RobertaModel", "DistilBertModel"})


@register
class HFBertFamily(HFFamily):
    name = "HuggingFace BERT family (" + ", ".join(sorted(_CLASSIFIERS)) + ")"
    class_names = _CLASSIFIERS

    def num_classes(self):
        return None if self.needs_callable_target else self.model.config.num_labels

    def parse(self, inputs):
        inputs, batch = text_inputs(inputs, model=self.model)
        mask = inputs.get("attention_mask")
        return ModelCall(inputs, batch, num_tokens=inputs["input_ids"].shape[1],
                         token_mask=None if mask is None else mask.bool())

    def max_positions(self):
        return getattr(self.model.config, "max_position_embeddings", None)


@register
class HFBertEncoder(HFBertFamily):
    """Encoders without a classification head (e.g. sentence-embedding models). Their output is
    the token embeddings (B, N, D); the explained scalar comes from a callable target (e.g.
    ``relfast.explain.mean_pooled_cosine``)."""

    name = "HuggingFace BERT-family encoders (" + ", ".join(sorted(_ENCODERS)) + ") with a callable target"
    needs_callable_target = True
    class_names = _ENCODERS

    def scores(self, output, call):
        return output.last_hidden_state
