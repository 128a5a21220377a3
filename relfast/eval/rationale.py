"""Text with known rationales: how well token relevance ranks the tokens that decide the label.
Per sentence, scikit-learn's average precision of the relevance of its real tokens ([CLS],
[SEP] and padding left out) against the rationale; the mean over sentences (the text analogue of
the segmentation test's mAP)."""
from typing import Dict

import numpy as np
import torch
from torch import Tensor


def rationale_ap(explainer, inputs: Dict[str, Tensor], rationale: Tensor, *, target: str = "predicted",
                 labels: Tensor = None, batch_size: int = 64, progress: bool = True) -> float:
    """Mean average precision of ``explainer``'s token relevance against ``rationale`` (N, L) bool,
    over the sentences whose rationale is neither empty nor everything."""
    from sklearn.metrics import average_precision_score
    from tqdm import tqdm

    ids = inputs["input_ids"]
    if tuple(rationale.shape) != tuple(ids.shape):
        raise ValueError(f"relfast.eval.rationale_ap: argument 'rationale' must have the shape of input_ids "
                         f"{tuple(ids.shape)}, got {tuple(rationale.shape)}")
    precisions = []
    for start in tqdm(range(0, ids.shape[0], batch_size), desc="rationales", unit="batch", disable=not progress):
        batch = {k: v[start:start + batch_size] for k, v in inputs.items()}
        explained = None if target == "predicted" else labels[start:start + batch_size]
        relevance = explainer(batch, target=explained).relevance.detach().double()
        real = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        for b in range(relevance.shape[0]):
            positions = real[b].nonzero().view(-1)[1:-1]  # without [CLS] and [SEP]
            truth = rationale[start + b, positions].numpy()
            if truth.any() and not truth.all():
                precisions.append(average_precision_score(truth, relevance[b, positions].numpy()))
    return float(np.mean(precisions)) if precisions else float("nan")
