"""``relfast eval --ray``: the evaluation tables (relfast.eval.table) through explain_dataset's
actor pool.

Each actor explains a batch once per method and scores it there: the perturbation test's predictions after
each removal step (both directions), the segmentation test's per-image counts and average
precision, or a sentence's rationale AP. Every row comes back with its id and per-sample numbers
that add up the same however the data set is split; the driver sums them in id order. The data
set is cut into blocks of ``batch_size`` rows in order, so each actor call explains the batch one
process explains (relfast.eval.table.evaluate), and the table is the same to the last digit.
"""
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .dataset import ExplainWorker, explain_dataset, from_arrays

WHERE = "relfast.scale.evaluate"
SEGMENTATION_COLUMNS = ("correct", "pixels", "intersection", "union", "average_precision")


class ScoringWorker(ExplainWorker):
    """An explain_dataset actor that explains each batch with every method of the table and scores
    what it explained: per method m, columns "m<i>/positive" and "m<i>/negative" (S,) per sample,
    the segmentation counts "m<i>/correct", ... or "m<i>/rationale_ap". ``model``: the first
    method's explainer; ``more``: the others' (one pool, one pass over the data, for all of them)."""

    def __init__(self, more: Sequence[Any] = (), steps: int = 10, perturbation: bool = True,
                 segmentation: bool = False, rationale: bool = False, **options):
        super().__init__(**options)
        from ..eval.perturbation import _fractions

        shared = {k: v for k, v in options.items() if k not in ("model", "threads", "cuda")}
        self.methods = [self] + [ExplainWorker(model=explainer, **shared) for explainer in more]
        self.fractions = _fractions(steps, WHERE)
        self.perturbation, self.segmentation, self.rationale = perturbation, segmentation, rationale

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        rows = {self.id_column: batch[self.id_column]}
        for index, method in enumerate(self.methods):
            rows.update({f"m{index}/{name}": value for name, value in self._score(method, batch).items()})
        return rows

    def _score(self, method: ExplainWorker, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch

        from ..eval.perturbation import BatchPerturbation
        from ..eval.rationale import sentence_precisions
        from ..eval.segmentation import sample_scores, segmentation_maps

        explainer = method.explainer
        tester = BatchPerturbation(explainer.family, explainer.layout, self.preprocess if self.is_image else None)
        inputs = method.model_inputs(batch)[0]
        # the test removes patches from the [0, 1] images (the model gets preprocess(images)), or tokens
        data = torch.from_numpy(np.array(batch[self.column])) if self.is_image else inputs
        labels = torch.from_numpy(np.array(batch["label"], dtype=np.int64))
        explained = tester.predict(data)  # as relfast.eval explains: the predicted class, one call per batch
        out = explainer(inputs, target=explained)
        rows = {}
        if self.perturbation:
            correct = tester.correct(data, labels, out, (True, False), self.fractions, WHERE)
            rows["positive"], rows["negative"] = correct[True], correct[False]
        if self.segmentation:
            masks = torch.from_numpy(np.array(batch["mask"]))
            rows.update(sample_scores(segmentation_maps(out, data.shape[2:]), masks))
        if self.rationale:
            rationale = torch.from_numpy(np.array(batch["rationale"]))
            rows["rationale_ap"] = sentence_precisions(out.relevance, data["attention_mask"], rationale, WHERE)
        return rows


def _columns(suite) -> Dict[str, np.ndarray]:
    count = len(suite.labels)
    columns = {"id": np.arange(count), "label": suite.labels.numpy()}
    if suite.is_text:
        columns.update({name: value.numpy() for name, value in suite.images.items()})
        if suite.rationale is not None:
            columns["rationale"] = suite.rationale.numpy()
    else:
        columns["pixel_values"] = suite.images.numpy()
        if suite.masks is not None:
            columns["mask"] = suite.masks.numpy()
    return columns


def _in_order(rows: Dict[str, np.ndarray], count: int) -> Dict[str, np.ndarray]:
    """The rows sorted by id, each input row exactly once (else an error: the sums would be wrong)."""
    ids = np.asarray(rows["id"])
    order = np.argsort(ids, kind="stable")
    if len(ids) != count or not np.array_equal(ids[order], np.arange(count)):
        raise RuntimeError(f"{WHERE}: the job returned {len(ids)} rows with {len(np.unique(ids))} distinct ids for "
                           f"{count} samples; each sample must come back once")
    return {name: np.asarray(value)[order] for name, value in rows.items()}


def evaluate(suite, methods: Sequence[str], tests: Sequence[str] = ("perturbation", "segmentation"),
             steps: int = 10, batch_size: int = 64, concurrency: int = 2, num_cpus: float = 1,
             rules: Optional[str] = None) -> List[Any]:
    """relfast.eval.table.evaluate on Ray: the same rows (Row per method), computed by one pool of
    ``concurrency`` explain_dataset actors, each explaining ``batch_size`` samples a call with
    every method and scoring them."""
    from ..eval.perturbation import PerturbationCurve, _fractions, area_under_curve
    from ..eval.segmentation import SegmentationTotals
    from ..eval.table import Row, check_evaluation

    explainers = check_evaluation(suite, methods, tests, WHERE, rules)
    fractions = _fractions(steps, WHERE)
    count = len(suite.labels)
    dataset = from_arrays(_columns(suite), block_rows=batch_size)
    perturbation = "perturbation" in tests
    segmentation = "segmentation" in tests and suite.masks is not None
    rationale = "segmentation" in tests and suite.rationale is not None
    scored = explain_dataset(dataset, explainers[0], column="input_ids" if suite.is_text else "pixel_values",
                             preprocess=None if suite.is_text else suite.preprocess, batch_size=batch_size,
                             concurrency=concurrency, num_cpus=num_cpus, worker=ScoringWorker,
                             worker_options=dict(more=explainers[1:], steps=steps, perturbation=perturbation,
                                                 segmentation=segmentation, rationale=rationale))
    batches = list(scored.iter_batches(batch_size=None, batch_format="numpy"))
    rows = _in_order({name: np.concatenate([b[name] for b in batches]) for name in batches[0]}, count)
    table = []
    for index, method in enumerate(methods):
        row, found = Row(method), {name.split("/", 1)[1]: value for name, value in rows.items()
                                   if name.startswith(f"m{index}/")}
        if perturbation:
            for name, positive in (("positive", True), ("negative", False)):
                accuracy = found[name].sum(axis=0) / count
                setattr(row, name, PerturbationCurve(fractions, accuracy, area_under_curve(fractions, accuracy),
                                                     positive))
        if segmentation:
            totals = SegmentationTotals()
            totals.add_samples({name: found[name] for name in SEGMENTATION_COLUMNS})
            row.segmentation = totals.scores()
        if rationale:
            precisions = found["rationale_ap"]
            row.rationale_ap = float(np.mean([float(p) for p in precisions[~np.isnan(precisions)]]))
        table.append(row)
    return table
