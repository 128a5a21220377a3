"""Explaining what a causal LM generates: every generated token against the prompt and the tokens
before it, from one forward over the whole sequence.

    prompt -> model.generate (the model's own, as the user configures it) -> prompt + answer ->
    one forward (attention capture, or AttnLRP's rules) -> T explained positions, each with its
    own target (the generated token) -> batched backwards, ``chunk_size`` positions at a time
    -> (B, T, N) relevance

Generated token ``t`` of a sample is predicted by the next-token logits at the token before it,
position ``P + t - 1`` of the sequence (P: the prompt's padded length; prompts are padded on the
left, as for generation). Its row is the single-position explanation of that logit: the causal
mask makes the attention, its gradient and the relevance of rows up to ``P + t - 1`` the same in
the full sequence as in the sequence cut after that token, so one forward serves all T rows.

The T backwards run ``chunk_size`` at a time as one batched backward
(``torch.autograd.grad(..., is_grads_batched=True)``: the backward of the shared graph,
vectorised over the chunk's targets). Samples are independent in the forward, so one target
index covers the whole batch. Method ``generic`` takes the gradient of every attention site's
output for the chunk, then runs the streamed row rule ([P2] rule 6, ``v ← v + v·Ā``) site by
site in backward order, one row per target; method ``attnlrp`` reads ``x ⊙ ∇x`` at the input
embeddings of the AttnLRP forward.

Vision-language models (LLaVA): the prompt's image goes to ``generate`` and to the explained
forward as given (``Family.generation_inputs``); the family's plan (``ChainedStreams``) carries
each row on from the LM into the vision tower, with the same target's gradients, so every
generated token also gets a patch map (``GenerationExplanation.image``), the single-position
image map of that token (``relfast.explain.families.hf_llava``).
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .capture import ProbabilityRecord
from .families import ChainedStreams, ModelCall
from .families.base import _FAMILIES
from .families.hf_causal_lm import HFCausalLM
from .methods.generic import chain_rows
from .session import (Session, _check_eval_mode, _check_finite_scores, _graph_inputs, _is_op_overflow,
                      _relevance_overflow)
from .targets import Targets

__all__ = ["GenerationExplanation", "explain_generation", "DEFAULT_CHUNK_SIZE", "GENERATE_METHODS"]

DEFAULT_CHUNK_SIZE = 8
GENERATE_METHODS = ("generic", "attnlrp")
# generate() arguments relfast sets itself, or that would change the model or what is returned
_OWN_ARGUMENTS = ("input_ids", "attention_mask", "max_new_tokens", "inputs")
_REFUSED = {
    "max_length": "give the answer's length as 'max_new_tokens'",
    "past_key_values": "relfast generates from the prompt alone",
    "position_ids": "generate computes positions from the attention mask, as relfast does",
    "output_attentions": "relfast sees the attention itself; transformers' output_attentions path installs hooks "
                         "on the model for good",
}


@dataclass
class GenerationExplanation:
    """What :meth:`relfast.Explainer.generate` returns: every generated token explained.

    N = P + T tokens per sample: the prompt, padded on the left to P tokens, then T generated
    tokens (T ≤ ``max_new_tokens``: generation stops early once every sample has ended).

    Attributes:
        relevance: (B, T, N) float32. Row t: generated token t (``tokens[:, t]``) over the
            sequence's tokens, the single-position explanation of its next-token logit at the
            token before it (position ``P + t - 1``): prompt and earlier generated tokens; the
            entries of later tokens, of padding, and the rows of tokens after a sample's end
            (``token_mask`` False) are 0.
        sequences: (B, N) int64, prompt (as given, left padding included) and generated tokens,
            as ``model.generate`` returned them.
        tokens: (B, T) int64, the generated tokens (``sequences[:, P:]``).
        token_mask: (B, T) bool, the tokens a sample generated: up to and including its first
            end-of-sequence token; after it ``generate`` pads, and those are not explained.
        attention_mask: (B, N) int64, the real tokens of ``sequences`` (the prompt's mask, then
            ``token_mask``): the mask the explained forward ran with.
        logits: (B, T) the explained logit of each generated token (its next-token logit at the
            position before it, in the explained forward; 0 where ``token_mask`` is False).
        prompt_length: P, where the generated tokens start in ``sequences``.
        method: the method that explained them ("generic" or "attnlrp").
        text: with a tokenizer, each sample's generated text (special tokens skipped); else None.
        token_strings: with a tokenizer, each sample's N tokens of ``sequences`` decoded one by one
            ("" for padding), to label the columns of ``relevance``; else None.
        image: vision-language models (LLaVA): (B, T, h, w) float32, row t the patch map of
            generated token t (its single-position image map: the relevance its row gives the
            image tokens, continued through the vision tower); 0 where ``token_mask`` is False.
            ``relevance`` then covers the LM's tokens, image placeholders included (there: the
            relevance of the image tokens as the LM's inputs). None for text-only LMs.
    """

    relevance: Tensor
    sequences: Tensor
    tokens: Tensor
    token_mask: Tensor
    attention_mask: Tensor
    logits: Tensor
    prompt_length: int
    method: str
    text: Optional[List[str]] = None
    token_strings: Optional[List[List[str]]] = None
    image: Optional[Tensor] = None

    @property
    def positions(self) -> Tensor:
        """(T,) int64: the explained position of each generated token (``P + t - 1``)."""
        return torch.arange(self.tokens.shape[1], device=self.tokens.device) + self.prompt_length - 1


# ---- checks, before any work ----

def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"relfast.Explainer.generate: argument '{name}' must be an int >= 1, got {value!r}")
    return value


def check_generate_arguments(explainer, max_new_tokens: Any, chunk_size: Any, generate_kwargs: Dict[str, Any]) -> int:
    """Everything about the call's arguments that can be checked before the prompt is read; returns
    the chunk size."""
    family, method = explainer.family, explainer._method
    if not isinstance(family, HFCausalLM):
        generating = "; ".join(cls.name for cls in _FAMILIES if issubclass(cls, HFCausalLM))
        raise ValueError(f"relfast.Explainer.generate: explains what a causal language model generates ("
                         f"{generating}); {type(explainer.model).__name__} is not one")
    if explainer.method not in GENERATE_METHODS:
        raise ValueError(f"relfast.Explainer.generate: method {explainer.method!r} cannot explain generated tokens; "
                         f"use one of {', '.join(repr(m) for m in GENERATE_METHODS)}")
    for option, why in (("use_lrp", "generic with use_lrp=True"), ("full_matrix", "full_matrix=True"),
                        ("layers", "attnlrp with layers=True")):
        if getattr(method, option, False) is True:
            raise ValueError(f"relfast.Explainer.generate: {why} is not supported for generated tokens (one row per "
                             "generated token over the input tokens); make the Explainer without it")
    _count(max_new_tokens, "max_new_tokens")
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else _count(chunk_size, "chunk_size")
    for key in _OWN_ARGUMENTS:
        if key in generate_kwargs:
            raise ValueError(f"relfast.Explainer.generate: argument '{key}' is relfast's own (the prompt is 'inputs', "
                             "the answer's length 'max_new_tokens'); do not pass it among the generate arguments")
    for key, why in _REFUSED.items():
        if generate_kwargs.get(key) is not None and generate_kwargs[key] is not False:
            raise ValueError(f"relfast.Explainer.generate: argument '{key}' is not taken: {why}")
    returned = generate_kwargs.get("num_return_sequences", 1)
    if returned not in (None, 1):
        raise ValueError(f"relfast.Explainer.generate: argument 'num_return_sequences' must be 1 (one answer per "
                         f"prompt), got {returned!r}; repeat the prompt in the batch for several answers")
    return chunk_size


def _prompt(explainer, inputs: Any) -> ModelCall:
    """The prompt batch, parsed and value-checked as the explainer checks any input."""
    family = explainer.family
    _check_eval_mode(family.model)
    if hasattr(inputs, "keys") and "position_ids" in inputs:
        raise ValueError("relfast.Explainer.generate: argument 'inputs' holds 'position_ids'; generate computes the "
                         "positions from the attention mask: pass input_ids and attention_mask")
    call = family.parse(inputs)
    family.check_input_types(call)
    family.check_values(call)
    family.check_attention_implementation()
    mask = call.token_mask
    if mask is not None and not bool(mask[:, -1].all()):
        raise ValueError("relfast.Explainer.generate: argument 'inputs' is padded on the right (a sample's last token "
                         "is padding); generation continues after the last token: pad prompts on the left "
                         "(tokenizer.padding_side = 'left')")
    return call


def _end_tokens(model: torch.nn.Module, generate_kwargs: Dict[str, Any]) -> List[int]:
    """The end-of-sequence ids generate stops at: the argument, else the generation config's."""
    if "eos_token_id" in generate_kwargs:
        eos = generate_kwargs["eos_token_id"]
    else:
        config = generate_kwargs.get("generation_config") or getattr(model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    if isinstance(eos, Tensor):
        return [int(e) for e in eos.flatten()]
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


# ---- the call ----

def explain_generation(explainer, inputs: Any, max_new_tokens: int, *, chunk_size: Optional[int] = None,
                       tokenizer: Any = None, **generate_kwargs) -> GenerationExplanation:
    """``explainer.generate``: see :meth:`relfast.Explainer.generate`."""
    chunk_size = check_generate_arguments(explainer, max_new_tokens, chunk_size, generate_kwargs)
    call = _prompt(explainer, inputs)
    model, family = explainer.model, explainer.family
    ids = call.kwargs["input_ids"]
    extra = family.generation_inputs(call)  # LLaVA: the prompts' images
    for key in extra:
        if key in generate_kwargs:
            raise ValueError(f"relfast.Explainer.generate: argument '{key}' belongs in 'inputs' (with the prompt), "
                             "not among the generate arguments")
    prompt_mask = call.token_mask.long() if call.token_mask is not None else torch.ones_like(ids)
    length = explainer.family.max_positions()
    if length is not None and ids.shape[1] + max_new_tokens > length:
        raise ValueError(f"relfast.Explainer.generate: a prompt of {ids.shape[1]} tokens and 'max_new_tokens' "
                         f"{max_new_tokens} exceed the model's {length} positions")
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                                   **extra, **generate_kwargs)
    sequences = getattr(generated, "sequences", generated)
    prompt = ids.shape[1]
    if not isinstance(sequences, Tensor) or sequences.dim() != 2 or sequences.shape[0] != ids.shape[0] \
            or sequences.shape[1] < prompt or not torch.equal(sequences[:, :prompt], ids):
        raise ValueError("relfast.Explainer.generate: the model's generate did not return the prompt followed by the "
                         "generated tokens, one sequence per prompt")
    tokens = sequences[:, prompt:]
    token_mask = _generated_mask(tokens, _end_tokens(model, generate_kwargs))
    attention_mask = torch.cat([prompt_mask, token_mask.long()], dim=1)
    full = {"input_ids": sequences, "attention_mask": attention_mask, **extra}
    try:  # prompt + answer as the explained forward takes it (a generated LLaVA image token would not be)
        family.check_values(family.parse(full))
    except ValueError as error:
        raise ValueError("relfast.Explainer.generate: the generated sequences cannot be explained: "
                         + str(error).removeprefix("relfast.Explainer: ")) from error
    rows = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens) + prompt - 1
    maps, logits = explain_positions(explainer, full, rows, tokens, token_mask, chunk_size)
    relevance = maps.pop(next(iter(maps)))
    text = strings = None
    if tokenizer is not None:
        text = tokenizer.batch_decode([t[m].tolist() for t, m in zip(tokens, token_mask)], skip_special_tokens=True)
        strings = [[tokenizer.decode([int(i)]) if real else "" for i, real in zip(seq, mask)]
                   for seq, mask in zip(sequences, attention_mask.bool())]
    return GenerationExplanation(relevance, sequences, tokens, token_mask, attention_mask, logits, prompt,
                                 explainer.method, text, strings, maps.get("image"))


def _generated_mask(tokens: Tensor, end_tokens: List[int]) -> Tensor:
    """(B, T) bool: each sample's tokens up to and including its first end-of-sequence token."""
    if not end_tokens or tokens.shape[1] == 0:
        return torch.ones_like(tokens, dtype=torch.bool)
    ends = torch.isin(tokens, torch.tensor(end_tokens, device=tokens.device)).long()
    return (ends.cumsum(dim=1) - ends) == 0


# ---- T positions with their own targets, from one forward ----

def explain_positions(explainer, inputs: Dict[str, Tensor], rows: Tensor, tokens: Tensor, valid: Tensor,
                      chunk_size: int) -> Tuple[Dict[str, Tensor], Tensor]:
    """Target (b, t): the next-token logit of ``tokens[b, t]`` at position ``rows[b, t]`` of
    ``inputs``' sequence, where ``valid[b, t]``. One forward, then batched backwards of
    ``chunk_size`` target indices each (every sample's target t in one scalar: the samples are
    independent). Returns (maps, the explained logits (B, T)): first the rows over the
    sequence's tokens, (B, T, N) float32; with a family whose streams feed one another (LLaVA),
    then each other stream's map as the family reads it out (``"image"``: (B, T, h, w))."""
    family, method = explainer.family, explainer._method
    call = family.parse(inputs)
    session = Session(family, method, Targets())
    batch, count = tokens.shape
    plan = None
    n = call.kwargs["input_ids"].shape[1]
    # The head's logits only where they are explained: the last n - first positions, not all n.
    # At GPT-2's 50257 words the full logits, their batched gradients and the head's backward
    # over every position would outweigh the layers (the result is the same).
    first = int(rows.min()) if rows.numel() else n - 1
    call.kwargs["logits_to_keep"] = n - first
    head = _HeadInput(family.model)
    with torch.enable_grad():
        call = _graph_inputs(call)
        if explainer.method == "attnlrp":
            relevance_pass = method.relevance_pass(family, call)
            with head:
                output, maps = relevance_pass.forward()
            session._check_records([ProbabilityRecord(m) for m in maps], call)
            readout = relevance_pass.readout()
        else:
            with head:
                output, records = session._forward(call)
            plan = family.plan(records, call)
            if plan is None:
                session._check_records(records, call)
                method.check_layers(len(records))
            elif not isinstance(plan, ChainedStreams):
                raise ValueError(f"relfast.Explainer.generate: cannot explain what {type(family.model).__name__} "
                                 "generates (its streams attend to each other)")
        logits = output.logits
        samples = torch.arange(batch, device=logits.device)[:, None]
        valid = valid.to(logits.device)
        # (B, T); a sample's targets after its end are 0 (and their logits not read: they may be NaN)
        kept_rows, tokens = rows.to(logits.device) - first, tokens.to(logits.device)
        chosen = torch.where(valid, head.logits(logits, samples, kept_rows, tokens), 0)
        _check_finite_scores(chosen)
        # each stream's rows, (B, T, N_stream); the first is the LM's, over the sequence
        sizes = {stream.name: stream.size for stream in plan.streams} if plan is not None else {"text": n}
        streams = {name: torch.zeros(batch, count, size, dtype=torch.float32, device=logits.device)
                   for name, size in sizes.items()}
        for start in range(0, count, chunk_size):
            stop = min(start + chunk_size, count)
            # (C,): target index t's logit summed over the batch (0 for a sample's padding)
            scalars = chosen[:, start:stop].sum(dim=0)
            if not scalars.requires_grad:
                raise ValueError("relfast.Explainer.generate: the explained logits do not depend on the model's inputs "
                                 "through any graph (was the model run under torch.inference_mode?)")
            keep = stop < count
            try:
                if explainer.method == "attnlrp":
                    parts = {"text": _attnlrp_rows(scalars, readout, keep)}
                elif plan is not None:
                    parts = _chained_rows(method, plan, records, scalars, rows[:, start:stop], keep)
                else:
                    parts = {"text": _generic_rows(method, records, scalars, rows[:, start:stop], n, keep)}
            except ValueError as error:
                if _is_op_overflow(error):
                    raise _relevance_overflow() from error
                raise
            for name, part in parts.items():
                streams[name][:, start:stop] = part.float() * valid[:, start:stop, None]
    lm = next(iter(streams))  # the stream over the sequence's tokens
    if call.token_mask is not None:
        streams[lm] *= call.token_mask.to(logits.device)[:, None, :]
    if not all(bool(torch.isfinite(m).all()) for m in streams.values()):
        raise _relevance_overflow()
    maps = family.finish_maps(streams, call) if plan is not None else streams
    return maps, chosen.detach()


class _HeadInput(TorchFunctionMode):
    """Sees the input of the model's output layer (``F.linear`` with the output embedding's weight)
    in the explained forward, so that each explained logit is computed again from it alone: the
    dot product of its position's hidden state with its token's weight row. The gradients then
    never pass through the (B, K, vocabulary) logits: the head's backward of a batch of C targets
    costs C dot products instead of C products with the whole vocabulary matrix. Only where those
    logits equal the model's own (a plain linear head; not, e.g., a soft-capped one); else the
    model's logits are differentiated as they are."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.weight = getattr(layer, "weight", None)
        self.bias = getattr(layer, "bias", None)
        self.hidden: List[Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and self.weight is not None:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if weight is self.weight:
                self.hidden.append(args[0] if args else kwargs.get("input"))
        return func(*args, **kwargs)

    def logits(self, logits: Tensor, samples: Tensor, rows: Tensor, tokens: Tensor) -> Tensor:
        """(B, T): the logits of ``tokens`` at ``rows`` of the kept positions, in the graph."""
        chosen = logits[samples, rows, tokens]
        if len(self.hidden) != 1 or self.hidden[0].shape[:-1] != logits.shape[:-1]:
            return chosen  # not one plain head over the kept positions: the model's own logits
        hidden = self.hidden[0][samples, rows]  # (B, T, D)
        again = (hidden * self.weight[tokens].to(hidden.dtype)).sum(dim=-1)
        if self.bias is not None:
            again = again + self.bias[tokens].to(again.dtype)
        expected = chosen.detach().float()
        finite = torch.isfinite(expected)
        scale = float(expected[finite].abs().max()) if bool(finite.any()) else 0.0
        tolerance = 1e-5 if again.dtype in (torch.float32, torch.float64) else 2e-2
        if not torch.allclose(again.detach().float()[finite], expected[finite], rtol=tolerance,
                              atol=tolerance * max(scale, 1e-12)):
            return chosen  # a head that does more than the linear layer (scaling, capping)
        return again.to(chosen.dtype)


def _batched_gradients(scalars: Tensor, inputs: List[Tensor], keep_graph: bool) -> Tuple[Tensor, ...]:
    """The gradient of each of the C scalars with respect to ``inputs``: (C, ...) each, from one
    backward vectorised over the C targets."""
    count = scalars.shape[0]
    if count == 1:
        grads = torch.autograd.grad(scalars[0], inputs, retain_graph=keep_graph, allow_unused=True)
        grads = tuple(g.unsqueeze(0) if g is not None else None for g in grads)
    else:
        eye = torch.eye(count, dtype=scalars.dtype, device=scalars.device)
        grads = torch.autograd.grad(scalars, inputs, grad_outputs=eye, retain_graph=keep_graph,
                                    is_grads_batched=True, allow_unused=True)
    return tuple(torch.zeros(count, *x.shape, dtype=x.dtype, device=x.device) if g is None else g
                 for g, x in zip(grads, inputs))


def _attnlrp_rows(scalars: Tensor, readout: Tensor, keep_graph: bool) -> Tensor:
    """(B, C, N): AttnLRP's ``x ⊙ ∇x`` at the input embeddings, summed over the width."""
    (grad,) = _batched_gradients(scalars, [readout], keep_graph)
    return (readout.detach() * grad).sum(dim=-1).transpose(0, 1)


def _generic_rows(method, records, scalars: Tensor, rows: Tensor, n: int, keep_graph: bool) -> Tensor:
    """(B, C, N): [P2]'s rows ``e_row · (I + Ā_L) ··· (I + Ā_s)``, one per target, each ``Ā`` from
    that target's own attention gradients."""
    first = method.first_site(len(records))
    sites = list(range(first, len(records)))
    sources = [records[s].source for s in sites]
    if any(s is None for s in sources):
        raise ValueError("relfast.Explainer.generate: an attention site's output is not part of the autograd graph")
    grads = list(_batched_gradients(scalars, sources, keep_graph))
    batch, count = rows.shape
    device = grads[-1].device
    state = torch.zeros(count, batch, 1, n, dtype=records[sites[-1]].dtype, device=device)
    state[torch.arange(count, device=device)[None, :], torch.arange(batch, device=device)[:, None], 0,
          rows.to(device)] = 1
    for index in reversed(range(len(sites))):  # backward order: the last layer first
        record = records[sites[index]]
        grad, grads[index] = grads[index], None  # each site's gradients are freed once used
        state = torch.stack([record.row_update(state[c].to(record.dtype), grad[c], method.aggregate)
                             for c in range(count)])
        record.release()  # the A and ∇A it recomputed: the next chunk's backward must not reuse them
    return state[:, :, 0].transpose(0, 1)


def _chained_rows(method, plan: ChainedStreams, records, scalars: Tensor, rows: Tensor,
                  keep_graph: bool) -> Dict[str, Tensor]:
    """Each stream's rows (B, C, N_stream), one per target: [P2]'s row through the explained
    stream, carried on into the streams that feed it (``chain_rows``), each ``Ā`` from that
    target's own attention gradients."""
    sites = [site for stream in plan.streams for site in stream.sites]
    sources = [records[site].source for site in sites]
    if any(s is None for s in sources):
        raise ValueError("relfast.Explainer.generate: an attention site's output is not part of the autograd graph")
    grads = _batched_gradients(scalars, sources, keep_graph)
    batch, count = rows.shape
    device = grads[0].device
    first = plan.streams[0]
    state = torch.zeros(count, batch, 1, first.size, dtype=records[first.sites[-1]].dtype, device=device)
    state[torch.arange(count, device=device)[None, :], torch.arange(batch, device=device)[:, None], 0,
          rows.to(device)] = 1
    maps = chain_rows(plan.streams, plan.seeds, records, state, dict(zip(sites, grads)), method.aggregate)
    return {name: m[:, :, 0].transpose(0, 1) for name, m in maps.items()}
