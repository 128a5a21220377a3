"""Before/after timing of one explanation call, for comparing two relfast checkouts in
alternating processes (the machine's speed drifts between runs; pytest-benchmark's few rounds at
batch 8 do not average that out).

    python benchmarks/ab_explain.py after 8                       # this checkout
    PYTHONPATH=/path/to/old/checkout python benchmarks/ab_explain.py before 8

Prints the median of ``--rounds`` calls of the plain SDPA forward (``torch.no_grad``) and of
``relfast.Explainer(model)(pixels)`` (generic) on a ViT-B/16-shaped HF model (random weights,
224 px, float32), and their ratio. Uses only relfast's public API.
"""
import argparse

import torch
import transformers

import relfast
from relfast.cli import _median_ms  # the CLI's timer (warm-up, then the median), in both checkouts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("label", help="a name for this checkout in the output line")
    parser.add_argument("batch", type=int)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)).eval()
    pixels = torch.randn(args.batch, 3, 224, 224)
    explainer = relfast.Explainer(model)
    with torch.no_grad():
        forward = _median_ms(lambda: model(pixel_values=pixels), args.rounds)
    explain = _median_ms(lambda: explainer(pixels), args.rounds)
    print(f"{args.label}: B{args.batch} forward {forward:.1f} ms, relfast {explain:.1f} ms, "
          f"relfast / forward {explain / forward:.2f}", flush=True)


if __name__ == "__main__":
    main()
