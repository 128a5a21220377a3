"""relfast's explainer as a Ray Serve application (optional: ``pip install relfast[serve]``).

    from ray import serve
    import relfast.serve
    serve.run(relfast.serve.app("./my-hf-classifier", replicas=2, max_batch=16), route_prefix="/relfast")

Routes: ``POST /predict``, ``POST /explain`` (JSON; relfast.serve.protocol states what a request
holds and every check on it), ``GET /healthz``. Concurrent requests are batched by Ray Serve
(``@serve.batch``) into one ``relfast.Explainer`` call per method; a bad request is a 4xx naming
its field, a request that fails inside the model a 500 of its own. ``relfast serve MODEL`` runs
the same application from the command line (relfast.serve.command).

``relfast.serve.protocol`` imports without Ray; everything else here needs it.
"""
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

# Nothing heavy is imported here: `relfast serve --help` (relfast.serve.command) answers at once.
DEFAULT_MAX_BYTES = 8 * 2 ** 20  # the largest request body by default (--max-bytes)

__all__ = ["app", "DEFAULT_MAX_BYTES"]


def require_ray(part: str = "serve", user: str = "relfast.serve") -> None:
    """Ray and its ``part`` ("serve" or "data"), else one ImportError naming what to install."""
    import importlib

    try:
        importlib.import_module(f"ray.{part}")
    except ImportError as error:
        raise ImportError(f"{user} needs Ray {part.capitalize()}, which is not installed ({error}); install it "
                          "with pip install 'relfast[serve]' (or 'ray[serve,data]')") from None


def _positive(name: str, value: Any, kind: type = int, minimum: float = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value < minimum:
        what = "an int" if kind is int else "a number"
        raise ValueError(f"relfast.serve.app: argument '{name}' must be {what} >= {minimum:g}, got {value!r}")


def app(model: Union[None, str, Path, Any] = None, *, method: Optional[str] = None, tokenizer: Any = None,
        image_processor: Any = None, labels: Optional[Sequence[str]] = None, max_batch: int = 8,
        batch_wait_ms: float = 10.0, replicas: int = 1, threads: int = 1, max_bytes: int = DEFAULT_MAX_BYTES,
        ray_actor_options: Optional[Dict[str, Any]] = None, name: str = "relfast"):
    """A Ray Serve application explaining ``model``, to pass to ``serve.run`` (alone or beside a
    user's own deployments).

    Args:
        model: None (the embedded default model), a checkpoint of scripts/train_default_model.py,
            a HuggingFace folder (image classifier, sequence classifier or causal LM, saved with
            its tokenizer or image processor), an exported ``.onnx`` / TorchScript ``.pt`` file, or
            a loaded ``torch.nn.Module`` in eval mode (shipped to the replicas by Ray).
        method: the method of an /explain request that names none (default: "generic"; an
            exported file answers its own method only).
        tokenizer, image_processor: for a loaded module, or an exported text file's tokenizer.
        labels: class names for the answers' "label" (default: the model config's id2label).
        max_batch, batch_wait_ms: Ray Serve's dynamic batching: up to ``max_batch`` concurrent
            requests per model call, waiting at most ``batch_wait_ms`` for a batch to fill.
        replicas: copies of the model, each a Ray actor (on any node of the cluster).
        threads: torch's threads per replica; also the CPUs each replica asks Ray for.
        max_bytes: the largest request body; larger ones get a 413.
        ray_actor_options: replaces the replicas' Ray resources (default ``{"num_cpus": threads}``).
        name: the deployment's name.
    """
    require_ray()
    _positive("max_batch", max_batch)
    _positive("batch_wait_ms", batch_wait_ms, float, 0)
    _positive("replicas", replicas)
    _positive("threads", threads)
    _positive("max_bytes", max_bytes)
    if method is not None and not isinstance(method, str):
        raise ValueError(f"relfast.serve.app: argument 'method' must be a method name, got {type(method).__name__}")
    if ray_actor_options is not None and not isinstance(ray_actor_options, dict):
        raise ValueError("relfast.serve.app: argument 'ray_actor_options' must be a dict of Ray actor options, got "
                         f"{type(ray_actor_options).__name__}")
    if isinstance(model, (str, Path)) and not Path(model).exists():
        raise ValueError(f"relfast.serve.app: argument 'model': {model} does not exist")
    from .deployment import Explaining

    model_args = dict(model=str(model) if isinstance(model, Path) else model, tokenizer=tokenizer,
                      image_processor=image_processor, labels=labels)
    deployment = Explaining.options(
        name=name, num_replicas=replicas,
        ray_actor_options=ray_actor_options if ray_actor_options is not None else {"num_cpus": threads},
        # a replica queues up to 8 batches. Requests over this limit wait in Serve's router, which
        # retries with a back-off of up to 0.5 s: at 2 batches, 32 clients on one replica (max_batch 8)
        # got 40 req/s instead of 150; the replica's own queue costs nothing and fills the batches
        max_ongoing_requests=8 * max_batch,
        # a model that cannot load fails the same way each time: report it after a few tries, not 20
        max_constructor_retry_count=3)
    return deployment.bind(model_args, method, max_batch, float(batch_wait_ms), threads, max_bytes)
