"""relfast.Explainer.generate: every generated token of a causal LM explained from one forward.

Row t of a sample must be what the single-position explainer gives for generated token t on the
sequence cut after the token before it (that token as the target), for prompts of different
lengths padded on the left, and for greedy and sampled generation; the rows of the generic rule
also match the papers' rule computed by hand on the cut sample (float64, eager attention,
``engine_models.reference_relevance``). Tiny random float32 models (3 layers, width 32).
"""
import pytest
import torch

import relfast
from engine_models import build as build_model, inputs_for, reference_relevance
from test_model_untouched import model_state

LMS = ["gpt2", "llama", "qwen2"]
NEW_TOKENS = 9
NO_END = dict(eos_token_id=None, pad_token_id=0)  # generate NEW_TOKENS for every sample


def build(name):
    model = build_model(name.removesuffix("-eager")).float()
    if name.endswith("-eager"):
        model.set_attn_implementation("eager")
    return model


def prompts_for(name):
    """3 prompts of 9, 6 and 4 tokens, padded on the left to 9."""
    return inputs_for(name.removesuffix("-eager"))


def relative_error(actual, expected):
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def single_position_rows(explainer, out):
    """(B, T, N): for each t, the explainer on the sequence cut after position P + t - 1 with
    generated token t as target, its row placed over the full sequence (0 after the cut); and the
    predicted next token there (B, T)."""
    p, count = out.prompt_length, out.tokens.shape[1]
    rows = torch.zeros(*out.tokens.shape, out.sequences.shape[1], dtype=torch.float64)
    predicted = torch.zeros_like(out.tokens)
    for t in range(count):
        cut = {"input_ids": out.sequences[:, :p + t], "attention_mask": out.attention_mask[:, :p + t]}
        single = explainer(cut, target=out.tokens[:, t])
        rows[:, t, :p + t] = single.relevance.double()
        predicted[:, t] = single.logits.argmax(dim=-1)
        real = out.token_mask[:, t]
        torch.testing.assert_close(out.logits[real, t], single.logits.gather(1, out.tokens[:, t:t + 1])[real, 0])
    return rows, predicted


@pytest.mark.parametrize("method", ["generic", "attnlrp"])
@pytest.mark.parametrize("name", LMS + ["gpt2-eager"])
def test_each_row_is_the_single_position_explanation(name, method):
    model = build(name)
    prompts = prompts_for(name)
    explainer = relfast.Explainer(model, method)
    out = explainer.generate(prompts, max_new_tokens=NEW_TOKENS, chunk_size=4, **NO_END)  # chunks of 4, 4, 1
    p = prompts["input_ids"].shape[1]
    assert out.prompt_length == p and out.method == method
    assert out.relevance.shape == (3, NEW_TOKENS, p + NEW_TOKENS) and out.relevance.dtype == torch.float32
    assert torch.equal(out.sequences[:, :p], prompts["input_ids"]) and torch.equal(out.tokens, out.sequences[:, p:])
    assert out.token_mask.all() and torch.equal(out.attention_mask[:, :p], prompts["attention_mask"])
    assert torch.equal(out.positions, torch.arange(NEW_TOKENS) + p - 1)
    expected, predicted = single_position_rows(explainer, out)
    assert torch.equal(out.tokens, predicted), "greedy generation: each token is the argmax at the position before it"
    assert relative_error(out.relevance, expected) <= 1e-5
    padding = prompts["attention_mask"] == 0
    assert (out.relevance[:, :, :p][padding[:, None, :].expand(-1, NEW_TOKENS, -1)] == 0).all()
    assert out.relevance[0].count_nonzero() > NEW_TOKENS, "rows must hold more than the explained token's own entry"


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generic_rows_match_the_papers_rule_by_hand(name):
    """Independent of the engine: [P2]'s rule on each sample's unpadded cut sequence, float64,
    eager attention, gradients of the generated token's logit."""
    model = build(name)
    prompts = inputs_for(name)
    out = relfast.Explainer(model).generate(prompts, max_new_tokens=8, **NO_END)
    reference_model = build_model(name)  # the same weights (seed 0), float64
    p = out.prompt_length
    for b in range(3):
        real = out.attention_mask[b].bool()
        for t in (0, 3, 7):
            keep = real.clone()
            keep[p + t:] = False
            single = {"input_ids": out.sequences[b:b + 1, keep]}
            expected, _ = reference_relevance(name, reference_model, single, "generic", int(out.tokens[b, t]))
            assert relative_error(out.relevance[b, t, keep], expected) <= 1e-4
            assert (out.relevance[b, t, ~keep] == 0).all()


@pytest.mark.parametrize("method", ["generic", "attnlrp"])
def test_sampled_generation_is_explained_as_sampled(method):
    model = build("gpt2")
    prompts = inputs_for("gpt2")
    explainer = relfast.Explainer(model, method)
    greedy = explainer.generate(prompts, max_new_tokens=NEW_TOKENS, **NO_END)
    torch.manual_seed(123)
    sampled = explainer.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, **NO_END)
    torch.manual_seed(123)
    again = model.generate(**prompts, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, **NO_END)
    assert torch.equal(sampled.sequences, again), "the explained tokens are the ones the seeded sampling drew"
    assert not torch.equal(sampled.tokens, greedy.tokens)
    expected, _ = single_position_rows(explainer, sampled)
    assert relative_error(sampled.relevance, expected) <= 1e-5


@pytest.mark.parametrize("name,method", [("llama", "generic"), ("gpt2-eager", "generic"), ("qwen2", "attnlrp")])
def test_chunked_equals_unchunked(name, method):
    model = build(name)
    explainer = relfast.Explainer(model, method)
    results = [explainer.generate(prompts_for(name), max_new_tokens=NEW_TOKENS, chunk_size=size, **NO_END)
               for size in (1, 2, 64)]
    for other in results[1:]:
        assert torch.equal(other.tokens, results[0].tokens)
        torch.testing.assert_close(other.relevance, results[0].relevance, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(other.logits, results[0].logits)


def test_options_of_the_explainer_apply():
    """start_layer and aggregate=False reach the rows: each equals the single-position call made
    with the same options."""
    model = build("llama")
    for options in (dict(start_layer=1), dict(start_layer=-1), dict(aggregate=False)):
        explainer = relfast.Explainer(model, **options)
        out = explainer.generate(inputs_for("llama"), max_new_tokens=8, **NO_END)
        expected, _ = single_position_rows(explainer, out)
        assert relative_error(out.relevance, expected) <= 1e-5, options
        plain = relfast.Explainer(model).generate(inputs_for("llama"), max_new_tokens=8, **NO_END)
        assert relative_error(out.relevance, plain.relevance) > 1e-3, f"{options} changed nothing"


def test_a_sample_that_ends_early_is_padded_after_its_end():
    """A sample's tokens after its first end-of-sequence token are generate's padding: not
    explained (rows 0, token_mask False) and masked out of the explained forward."""
    model = build("gpt2")
    prompts = inputs_for("gpt2")
    free = relfast.Explainer(model).generate(prompts, max_new_tokens=NEW_TOKENS, **NO_END)
    # a token that first appears mid-answer in some sample: that sample ends there
    sample, at = next((b, t) for b in range(3) for t in range(2, 7) if int(free.tokens[b, t]) not in
                      free.tokens[b, :t].tolist())
    end = int(free.tokens[sample, at])
    explainer = relfast.Explainer(model)
    out = explainer.generate(prompts, max_new_tokens=NEW_TOKENS, eos_token_id=end, pad_token_id=1)
    first_end = [int((row == end).nonzero()[0]) if (row == end).any() else None for row in out.tokens]
    assert first_end[sample] == at and None in first_end, "one sample ends early, another runs to the end"
    for b, stop in enumerate(first_end):
        expected_mask = torch.ones(out.tokens.shape[1], dtype=torch.bool)
        if stop is not None:
            expected_mask[stop + 1:] = False
            assert (out.tokens[b, stop + 1:] == 1).all(), "generate pads a finished sample"
        assert torch.equal(out.token_mask[b], expected_mask)
        assert (out.relevance[b, ~expected_mask] == 0).all() and (out.logits[b, ~expected_mask] == 0).all()
    assert torch.equal(out.attention_mask[:, out.prompt_length:], out.token_mask.long())
    expected, _ = single_position_rows(explainer, out)
    expected[~out.token_mask] = 0
    assert relative_error(out.relevance, expected) <= 1e-5


def test_tokenizer_gives_the_text_and_the_tokens():
    import tokenizers
    import transformers

    vocab = {**{f"w{i}": i for i in range(60)}, "[PAD]": 60, "[UNK]": 61}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    model = build("gpt2")
    prompts = inputs_for("gpt2")
    out = relfast.Explainer(model).generate(prompts, max_new_tokens=4, tokenizer=tokenizer, **NO_END)
    assert out.text == [" ".join(f"w{int(i)}" for i in row) for row in out.tokens]
    for b in range(3):
        real = out.attention_mask[b].bool()
        assert len(out.token_strings[b]) == out.sequences.shape[1]
        assert [s for s, r in zip(out.token_strings[b], real) if r] == [f"w{int(i)}" for i in out.sequences[b, real]]
        assert all(s == "" for s, r in zip(out.token_strings[b], real) if not r)
    assert relfast.Explainer(model).generate(prompts, max_new_tokens=2, **NO_END).text is None


def generation_state(model):
    return dict(model_state(model), config=model.config.to_dict(), generation=model.generation_config.to_dict(),
                parameters={k: v.clone() for k, v in model.state_dict().items()})


def same_state(a, b):
    parameters_a, parameters_b = a.pop("parameters"), b.pop("parameters")
    return a == b and parameters_a.keys() == parameters_b.keys() and all(
        torch.equal(parameters_a[k], parameters_b[k]) for k in parameters_a)


@pytest.mark.parametrize("method", ["generic", "attnlrp"])
@pytest.mark.parametrize("name", ["llama", "llama-eager"])
def test_model_is_untouched_after_a_call_and_after_a_failure(method, name):
    model = build(name)
    next(model.parameters()).requires_grad_(False)  # a user's own state that must survive
    lengths = []
    model.register_forward_hook(lambda module, args, kwargs, output: lengths.append(kwargs["input_ids"].shape[1]),
                                with_kwargs=True)
    before = generation_state(model)
    explainer = relfast.Explainer(model, method)
    out = explainer.generate(inputs_for("llama"), max_new_tokens=5, do_sample=True, **NO_END)
    assert same_state(generation_state(model), dict(before))
    assert lengths[-1] == out.sequences.shape[1], "the last forward is the explained one, over the whole sequence"

    def fail_in_the_explained_forward(module, args, kwargs, output):
        if kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] == out.sequences.shape[1]:
            raise RuntimeError("failing in the explained forward")

    handle = model.register_forward_hook(fail_in_the_explained_forward, with_kwargs=True)
    with_hook = generation_state(model)
    with pytest.raises(RuntimeError, match="failing in the explained forward"):
        explainer.generate(inputs_for("llama"), max_new_tokens=5, **NO_END)
    assert same_state(generation_state(model), with_hook)
    handle.remove()
    assert same_state(generation_state(model), dict(before))


# case -> (explainer maker, generate arguments, words of the message)
BAD = {
    "max_new_tokens 0": (lambda m: relfast.Explainer(m), dict(max_new_tokens=0),
                         "'max_new_tokens' must be an int >= 1"),
    "max_new_tokens negative": (lambda m: relfast.Explainer(m), dict(max_new_tokens=-2), "'max_new_tokens'"),
    "max_new_tokens a bool": (lambda m: relfast.Explainer(m), dict(max_new_tokens=True), "'max_new_tokens'"),
    "max_new_tokens a float": (lambda m: relfast.Explainer(m), dict(max_new_tokens=4.0), "'max_new_tokens'"),
    "chunk_size 0": (lambda m: relfast.Explainer(m), dict(max_new_tokens=4, chunk_size=0),
                     "'chunk_size' must be an int >= 1"),
    "chunk_size a str": (lambda m: relfast.Explainer(m), dict(max_new_tokens=4, chunk_size="8"), "'chunk_size'"),
    "method rollout": (lambda m: relfast.Explainer(m, "rollout"), dict(max_new_tokens=4),
                       "method 'rollout' cannot explain generated tokens; use one of 'generic', 'attnlrp'"),
    "method transformer_attribution": (lambda m: relfast.Explainer(m, "transformer_attribution"),
                                       dict(max_new_tokens=4), "'transformer_attribution' cannot explain"),
    "use_lrp": (lambda m: relfast.Explainer(m, use_lrp=True), dict(max_new_tokens=4), "use_lrp=True is not supported"),
    "full_matrix": (lambda m: relfast.Explainer(m, full_matrix=True), dict(max_new_tokens=4),
                    "full_matrix=True is not supported"),
    "attnlrp layers": (lambda m: relfast.Explainer(m, "attnlrp", layers=True), dict(max_new_tokens=4),
                       "layers=True is not supported"),
    "max_length": (lambda m: relfast.Explainer(m), dict(max_new_tokens=4, max_length=30), "'max_length' is not taken"),
    "output_attentions": (lambda m: relfast.Explainer(m), dict(max_new_tokens=4, output_attentions=True),
                          "'output_attentions' is not taken"),
    "input_ids among generate's": (lambda m: relfast.Explainer(m), dict(max_new_tokens=4, input_ids=None),
                                   "argument 'input_ids' is relfast's own"),
    "num_return_sequences": (lambda m: relfast.Explainer(m), dict(max_new_tokens=4, num_return_sequences=2),
                             "'num_return_sequences' must be 1"),
    "too long for the positions": (lambda m: relfast.Explainer(m), dict(max_new_tokens=60),
                                   "a prompt of 9 tokens and 'max_new_tokens' 60 exceed the model's 64 positions"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_are_refused_before_any_work(case):
    make, arguments, words = BAD[case]
    model = build("gpt2")
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match=words.replace("(", "\\(").replace(")", "\\)")):
        make(model).generate(inputs_for("gpt2"), **arguments)
    assert calls == [], "refused before generating"


def test_bad_models_and_prompts_are_refused_before_any_work():
    bert = build_model("hf-bert")
    with pytest.raises(ValueError, match="explains what a causal language model generates .*"
                                         "BertForSequenceClassification is not one"):
        relfast.Explainer(bert).generate(inputs_for("hf-bert"), max_new_tokens=3)
    model = build("gpt2")
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    explainer = relfast.Explainer(model)
    right = inputs_for("gpt2")
    right["attention_mask"] = right["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="padded on the right .* pad prompts on the left"):
        explainer.generate(right, max_new_tokens=3)
    with pytest.raises(ValueError, match="token id 60, outside the model's vocabulary"):
        explainer.generate(torch.full((1, 4), 60), max_new_tokens=3)
    with pytest.raises(ValueError, match="holds 'position_ids'"):
        explainer.generate(dict(inputs_for("gpt2"), position_ids=torch.zeros(3, 9, dtype=torch.long)), max_new_tokens=3)
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        explainer.generate(inputs_for("gpt2"), max_new_tokens=3)
    assert calls == []


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_an_exported_file_explains_a_generated_answer_in_one_batch(tmp_path):
    """The README's serving recipe: the single-position file, called once on T copies of prompt +
    answer, copy t's attention mask ending at the token before generated token t, target that
    token, gives the T rows of ``generate`` (each copy is its own forward there)."""
    import relfast.export

    model = build("gpt2")
    explainer = relfast.Explainer(model)
    prompts = prompts_for("gpt2")
    out = explainer.generate(prompts, max_new_tokens=8, **NO_END)
    served = torch.jit.load(str(relfast.export.to_torchscript(explainer, {k: v[:1] for k, v in prompts.items()},
                                                              tmp_path / "lm_explained.pt")))
    p, count = out.prompt_length, out.tokens.shape[1]
    for b in range(3):
        ids = out.sequences[b].repeat(count, 1)
        mask = out.attention_mask[b].repeat(count, 1)
        mask[torch.arange(mask.shape[1]) >= p + torch.arange(count)[:, None]] = 0
        with torch.no_grad():
            logits, relevance, explained = served(ids, mask, out.tokens[b])
        assert torch.equal(explained, out.tokens[b])
        assert relative_error(relevance, out.relevance[b]) <= 1e-5


# ---- the explained logits from the head's input (no gradient through the vocabulary) ----

@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_explained_logits_come_from_the_head_input_not_the_vocabulary(name):
    from relfast.explain.generate import _HeadInput

    model = build(name)
    inputs = inputs_for(name)
    head = _HeadInput(model)
    with torch.enable_grad(), head:
        output = model(**inputs, logits_to_keep=3)
    batch = inputs["input_ids"].shape[0]
    samples = torch.arange(batch)[:, None]
    rows = torch.tensor([[0, 2]]).expand(batch, 2)
    tokens = torch.randint(0, output.logits.shape[-1], (batch, 2), generator=torch.Generator().manual_seed(0))
    chosen = head.logits(output.logits, samples, rows, tokens)
    torch.testing.assert_close(chosen, output.logits[samples, rows, tokens], rtol=1e-5, atol=1e-6)
    assert torch.autograd.grad(chosen.sum(), output.logits, allow_unused=True, retain_graph=True)[0] is None, \
        "the explained logits do not pass through the (B, K, vocabulary) logits"
    assert chosen.requires_grad


def test_a_head_that_is_not_one_linear_layer_keeps_the_models_logits():
    """A head whose logits are more than the output layer's (here: scaled after it) is differentiated
    through the model's own logits."""
    from relfast.explain.generate import _HeadInput

    model = build("gpt2")
    inputs = inputs_for("gpt2")
    head = _HeadInput(model)
    with torch.enable_grad(), head:
        output = model(**inputs, logits_to_keep=3)
    scaled = output.logits * 2  # what a logit scale or soft-capping does after the layer
    batch = inputs["input_ids"].shape[0]
    samples, rows = torch.arange(batch)[:, None], torch.tensor([[1]]).expand(batch, 1)
    tokens = torch.zeros(batch, 1, dtype=torch.long)
    chosen = head.logits(scaled, samples, rows, tokens)
    torch.testing.assert_close(chosen, scaled[samples, rows, tokens])
    assert torch.autograd.grad(chosen.sum(), scaled)[0] is not None


@pytest.mark.parametrize("method", ["generic", "attnlrp"])
def test_one_explainer_generates_from_several_threads(method):
    """Each thread's capture, head recorder and rules are its own: concurrent calls of one
    Explainer give what each gives alone, and leave the model as it was."""
    from concurrent.futures import ThreadPoolExecutor

    model = build("gpt2")
    explainer = relfast.Explainer(model, method)
    prompts = [inputs_for("gpt2", seed=s) for s in (1, 2, 3, 4)]
    alone = [explainer.generate(p, max_new_tokens=4, **NO_END) for p in prompts]
    before = generation_state(model)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: explainer.generate(p, max_new_tokens=4, **NO_END), prompts))
    for a, b in zip(alone, together):
        assert torch.equal(a.sequences, b.sequences)
        torch.testing.assert_close(b.relevance, a.relevance, rtol=1e-5, atol=1e-6)
    assert same_state(generation_state(model), dict(before))
