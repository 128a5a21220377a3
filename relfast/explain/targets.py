"""Ready-made callable targets for ``Explainer(model)(inputs, target=...)``."""
from typing import Callable, Mapping

import torch
from torch import Tensor


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token embeddings over the real (unmasked) tokens: (B, N, D) -> (B, D)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def mean_pooled_cosine(model: torch.nn.Module, explained: Mapping[str, Tensor],
                       reference: Mapping[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """Target for sentence encoders (sentence-transformers style): the cosine similarity between
    each explained sentence's mean-pooled embedding and the matching reference sentence's.
    ``explained``/``reference`` are tokenizer outputs with the same batch size."""
    with torch.no_grad():
        reference_embedding = mean_pool(model(**reference).last_hidden_state, reference["attention_mask"])

    def similarity(hidden: Tensor) -> Tensor:
        pooled = mean_pool(hidden, explained["attention_mask"])
        return torch.nn.functional.cosine_similarity(pooled, reference_embedding, dim=-1)

    return similarity
