"""relfast on Ray Data: explain a data set with a pool of explainer actors (optional:
``pip install relfast[serve]``, which brings ``ray[serve,data]``).

    import ray, relfast.scale
    images = ray.data.read_parquet("s3://bucket/images/")          # columns "id" and "pixel_values"
    relfast.scale.explain_dataset(images, "./my-hf-classifier", output="maps/", concurrency=8, batch_size=32)

``explain_dataset`` maps the data set's batches through ``relfast.Explainer`` (or an exported
file) in ``concurrency`` actors, each holding the model once, and writes one row per input row:
its id, the relevance, the patch map, the explained and the predicted class. Ray retries the
batches of an actor that dies; the written rows are checked to be complete and without duplicates.
``relfast eval --ray`` runs the evaluation tables through the same actors
(relfast.scale.evaluate).

Nothing here is imported with ``relfast``; Ray is imported when a function is called.
"""
from .dataset import OUTPUT_COLUMNS, explain_dataset, from_arrays

__all__ = ["explain_dataset", "from_arrays", "OUTPUT_COLUMNS"]
