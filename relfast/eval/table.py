"""Every method on a model's held-out data, both tests: the rows of the evaluation table, the
curves, and the CSV and PNG that ``relfast eval`` writes.

Data sets the project ships (nothing is downloaded):
- ``shapes``: the default model's Shapes images, drawn with a seed training never used
  (training: 0, its accuracy check: 10 000; here: 20 000), masks known, so both tests run.
- ``digits``: the digits model's 500 held-out real scans (scikit-learn's digits); no masks, so
  perturbation only.
- ``sentiment``: MiniLM with the shipped sentiment head, on 500 held-out lexicon sentences whose
  lexicon words training never saw; the rationale (those words) takes the place of masks.
"""
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .perturbation import PerturbationCurve, perturbation
from .rationale import rationale_ap
from .references import Occlusion, RandomMap
from .segmentation import SegmentationScores, segmentation

HELD_OUT_SEED = 20_000
REFERENCES = ("random", "occlusion")
TESTS = ("perturbation", "segmentation")


@dataclass
class Suite:
    """A model and its held-out data: images in [0, 1] (or a tokenizer's dict), labels, masks
    (None: no segmentation), rationale (text: the tokens that decide the label)."""

    name: str
    model: torch.nn.Module
    images: Union[Tensor, Dict[str, Tensor]]
    labels: Tensor
    masks: Optional[Tensor]
    preprocess: Callable[[Tensor], Tensor]
    rationale: Optional[Tensor] = None

    @property
    def is_text(self) -> bool:
        return isinstance(self.images, dict)


def shapes_suite(model: Optional[torch.nn.Module] = None, samples: int = 256) -> Suite:
    from ..data import make_shapes, normalize
    from ..models import default_model

    images, labels, masks = make_shapes(samples, seed=HELD_OUT_SEED)
    return Suite("shapes", model if model is not None else default_model(), images, labels, masks, normalize)


def digits_suite(model: Optional[torch.nn.Module] = None, samples: int = 500) -> Suite:
    from ..data import load_digits, normalize
    from ..models import digits_model

    images, labels = load_digits("held_out")
    return Suite("digits", model if model is not None else digits_model(), images[:samples], labels[:samples], None,
                 normalize)


def sentiment_suite(model: Optional[torch.nn.Module] = None, samples: int = 500) -> Suite:
    from ..data.sentiment import make_sentences
    from ..models import sentiment_model

    inputs, labels, rationale = make_sentences(samples, "held_out")
    return Suite("sentiment", model if model is not None else sentiment_model(), inputs, labels, None, lambda x: x,
                 rationale)


SUITES = {"shapes": shapes_suite, "digits": digits_suite, "sentiment": sentiment_suite}


@dataclass
class Row:
    method: str
    positive: Optional[PerturbationCurve] = None
    negative: Optional[PerturbationCurve] = None
    segmentation: Optional[SegmentationScores] = None
    rationale_ap: Optional[float] = None

    def values(self) -> Dict[str, object]:
        seg = self.segmentation
        return {"method": self.method,
                "positive_auc": None if self.positive is None else round(self.positive.auc, 2),
                "negative_auc": None if self.negative is None else round(self.negative.auc, 2),
                "pixel_accuracy": None if seg is None else round(seg.pixel_accuracy, 4),
                "miou": None if seg is None else round(seg.miou, 4),
                "mean_ap": None if seg is None else round(seg.mean_ap, 4),
                "rationale_ap": None if self.rationale_ap is None else round(self.rationale_ap, 4)}


LRP_RULE_METHODS = ("partial_lrp", "lrp")  # the methods that take the option 'rules'


def explainer_for(suite: Suite, method: str, rules: Optional[str] = None):
    """A relfast.Explainer for ``method`` (``rules``: the LRP baselines' rule set, None: their
    default), or the random / occlusion reference."""
    from ..explain import Explainer

    if method in REFERENCES:
        base = Explainer(suite.model)
        if method == "random":
            return RandomMap(base)
        if suite.is_text:
            return Occlusion(base)  # a token deleted: padded and masked out
        return Occlusion(base, baseline=suite.preprocess(torch.zeros(1, suite.images.shape[1], 1, 1))[0, :, 0, 0])
    if rules is not None and method in LRP_RULE_METHODS:
        return Explainer(suite.model, method, rules=rules)
    return Explainer(suite.model, method)


def check_evaluation(suite: Suite, methods: Sequence[str], tests: Sequence[str], where: str,
                     rules: Optional[str] = None) -> list:
    """An evaluation's arguments, checked before any work; each method's explainer."""
    from ..explain import METHODS

    known = list(METHODS) + list(REFERENCES)
    if isinstance(methods, str) or not methods or any(m not in known for m in methods):
        raise ValueError(f"{where}: argument 'methods' must be a non-empty list of methods among {known}, got "
                         f"{methods!r}")
    if isinstance(tests, str) or not tests or any(t not in TESTS for t in tests):  # a misspelt test would be skipped
        raise ValueError(f"{where}: argument 'tests' must be a non-empty list among {list(TESTS)}, got {tests!r}")
    if list(tests) == ["segmentation"] and suite.masks is None and suite.rationale is None:  # every row empty
        raise ValueError(f"{where}: the {suite.name} suite has neither masks nor rationales; test 'segmentation' "
                         "needs one of them")
    if rules is not None and not set(methods) & set(LRP_RULE_METHODS):  # it would change nothing
        raise ValueError(f"{where}: argument 'rules' applies to {' and '.join(LRP_RULE_METHODS)}, and 'methods' "
                         f"names neither: {list(methods)}")
    return [explainer_for(suite, method, rules) for method in methods]  # every method's options refused up front


def evaluate(suite: Suite, methods: Sequence[str], tests: Sequence[str] = TESTS, steps: int = 10,
             batch_size: int = 64, progress: bool = True, rules: Optional[str] = None) -> List[Row]:
    """Each method's row of the table, in this process (relfast.scale.evaluate: on Ray, the same
    rows). ``rules``: the rule set of lrp and partial_lrp ("paper", their default, or "textbook")."""
    explainers = check_evaluation(suite, methods, tests, "relfast.eval.table.evaluate", rules)
    rows = []
    for method, explainer in zip(methods, explainers):
        row = Row(method)
        common = dict(batch_size=batch_size, progress=progress)
        if "perturbation" in tests:
            preprocess = None if suite.is_text else suite.preprocess  # text goes to the model as given
            row.positive, row.negative = perturbation(explainer, suite.images, suite.labels, positive="both",
                                                      steps=steps, preprocess=preprocess, **common)
        if "segmentation" in tests and suite.masks is not None:
            row.segmentation = segmentation(explainer, suite.images, suite.masks, preprocess=suite.preprocess, **common)
        if "segmentation" in tests and suite.rationale is not None:
            row.rationale_ap = rationale_ap(explainer, suite.images, suite.rationale, batch_size=batch_size,
                                            progress=progress)
        rows.append(row)
    return rows


def format_table(rows: Sequence[Row]) -> str:
    header = ["method", "positive_auc", "negative_auc", "pixel_accuracy", "miou", "mean_ap", "rationale_ap"]
    lines = [" ".join(f"{h:>14}" for h in header)]
    for row in rows:
        values = row.values()
        lines.append(" ".join(f"{'-' if values[h] is None else values[h]!s:>14}" for h in header))
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    if not rows:
        raise ValueError("relfast.eval.table.write_csv: argument 'rows' is empty; there is nothing to write")
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].values()))
        writer.writeheader()
        for row in rows:
            writer.writerow(row.values())
    return path


def plot_curves(rows: Sequence[Row], path: Path, title: str = "") -> Path:
    """Accuracy vs fraction removed, one curve per method; positive and negative side by side."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(11, 4), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for axis, kind in zip(axes, ("positive", "negative")):
        for row in rows:
            curve = getattr(row, kind)
            if curve is not None:
                axis.plot(curve.fractions, curve.accuracy, marker="o", markersize=3,
                          label=f"{row.method} (AUC {curve.auc:.1f})")
        axis.set_title(f"{kind} perturbation ({'lower' if kind == 'positive' else 'higher'} is better)", fontsize=10)
        axis.set_xlabel("fraction removed")
        axis.legend(fontsize=8)
    axes[0].set_ylabel("accuracy")
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
