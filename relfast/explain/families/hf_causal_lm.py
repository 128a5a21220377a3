"""HuggingFace decoder-only causal LMs (GPT-2, Llama, Qwen2, Mistral).

The explained scalar is a next-token logit at the last real token (the explained row of R):
by default the argmax token; ``target=`` a token id, or one per sample. Batches may be padded
on the left (as for generation) or on the right; positions then come from the attention mask,
as ``generate`` computes them, so a padded sample is explained as it is alone.
"""
import torch

from ..layout import TokenLayout
from .base import TEXT_KEYS, HFFamily, ModelCall, register, text_inputs

_NAMES = frozenset({"GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"})


@register
class HFCausalLM(HFFamily):
    name = "HuggingFace causal LMs (" + ", ".join(sorted(_NAMES)) + ")"
    class_names = _NAMES

    def default_layout(self):
        return TokenLayout(prefix_tokens=0, explained_token="last")

    def num_classes(self):
        return self.model.config.vocab_size

    def parse(self, inputs):
        inputs, batch = text_inputs(inputs, TEXT_KEYS - {"token_type_ids"}, self.model)
        mask = inputs.get("attention_mask")
        kwargs = dict(inputs, use_cache=False)
        if mask is not None and "position_ids" not in inputs:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
        return ModelCall(kwargs, batch, num_tokens=inputs["input_ids"].shape[1],
                         token_mask=None if mask is None else mask.bool())

    def max_positions(self):
        # learned absolute positions (GPT-2) end at n_positions; rotary ones (Llama, ...) do not
        return getattr(self.model.config, "n_positions", None)

    def scores(self, output, call):
        logits = output.logits  # (B, N, V): the next-token logits at every position
        return logits[torch.arange(logits.shape[0], device=logits.device), call.rows.to(logits.device)]
