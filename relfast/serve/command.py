"""``relfast serve [MODEL]``: the explainer as an HTTP service on Ray Serve.

    relfast serve                                   # the embedded model at http://127.0.0.1:8000
    relfast serve ./my-hf-classifier --replicas 2 --threads 2 --max-batch 16
    relfast serve model_explained.onnx --port 9000
    relfast serve ./my-causal-lm --address auto     # on a running Ray cluster (ray start --head)

relfast.cli adds the subcommand with :func:`add_arguments` and calls :func:`run`. Flag mistakes
and models that cannot be served are one line on stderr and exit status 2, before Ray starts.
"""
import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

# relfast.cli's method names and its one-line errors (no torch, no numpy, no Ray at import)
from ..cli import METHODS, _fail, _require
from . import DEFAULT_MAX_BYTES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help="a checkpoint from scripts/train_default_model.py "
                        "(default: the embedded model), a HuggingFace image-classifier, sequence-classifier or "
                        "causal-LM folder (with its image processor or tokenizer), or an exported .onnx / .pt file")
    parser.add_argument("--method", help="the method of /explain requests that name none (default generic; an "
                        "exported file answers its own method only)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                        "only; 0.0.0.0 listens on every interface)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--replicas", type=int, default=1, help="copies of the model, each a Ray actor (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica, and the CPUs each replica "
                        "asks Ray for (default 1)")
    parser.add_argument("--max-batch", type=int, default=8, help="concurrent requests answered by one model call "
                        "(default 8)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long a batch waits to fill "
                        "(default 10 ms)")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="the largest request body; larger "
                        f"ones get a 413 (default {DEFAULT_MAX_BYTES})")
    parser.add_argument("--tokenizer", help="an exported text model's tokenizer folder (without it, requests send "
                        "token ids)")
    parser.add_argument("--address", help="a running Ray cluster to deploy on ('auto', or the head's HOST:6379; "
                        "default: start Ray on this machine)")
    parser.add_argument("--route-prefix", default="/", help="the application's URL prefix (default /)")
    parser.add_argument("--name", default="relfast", help="the Serve application's name (default relfast)")


def check_arguments(args: argparse.Namespace) -> None:
    """Every flag and the model path, before Ray or the model load."""
    for flag, value, low in (("--port", args.port, 1), ("--replicas", args.replicas, 1), ("--threads", args.threads, 1),
                             ("--max-batch", args.max_batch, 1), ("--max-bytes", args.max_bytes, 1)):
        if value < low:
            _fail(f"{flag} must be an integer >= {low}, got {value}")
    if args.port > 65535:
        _fail(f"--port must be at most 65535, got {args.port}")
    if not args.batch_wait_ms >= 0:
        _fail(f"--batch-wait-ms must be a number >= 0, got {args.batch_wait_ms}")
    if args.method is not None and args.method not in METHODS:
        _fail(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    if not args.route_prefix.startswith("/"):
        _fail(f"--route-prefix must start with '/', got {args.route_prefix!r}")
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        _fail(f"--tokenizer {args.tokenizer} is not a folder (a HuggingFace tokenizer saved with save_pretrained)")
    if args.model is None:
        return
    path = Path(args.model)
    if not path.exists():
        _fail(f"model {args.model} does not exist")
    if path.is_dir():
        from ..cli import _model_kind

        kind = _model_kind(args.model, "serve")  # refuses foreign folders in one line
        if kind not in ("image", "text", "causal_lm"):
            _fail(f"model {args.model} holds a model relfast serve does not take yet; it takes image classifiers, "
                  "sequence classifiers and causal LMs (checkpoints, HuggingFace folders, exported .onnx / .pt files)")
    if args.tokenizer is not None and path.is_dir():
        _fail("--tokenizer applies to exported files (a HuggingFace folder brings its own tokenizer)")


def build(args: argparse.Namespace):
    """The Serve application of ``args`` (relfast.serve.app)."""
    from . import app

    tokenizer = None
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError, KeyError) as error:
            _fail(f"--tokenizer {args.tokenizer} holds no loadable tokenizer ({type(error).__name__}: {error})")
    return app(args.model, method=args.method, tokenizer=tokenizer, max_batch=args.max_batch,
               batch_wait_ms=args.batch_wait_ms, replicas=args.replicas, threads=args.threads,
               max_bytes=args.max_bytes)


def run(args: argparse.Namespace, stop: Optional[threading.Event] = None) -> None:
    """Serve until Ctrl-C / SIGTERM (or ``stop`` is set); then the application is deleted, and Ray
    shut down if this command started it."""
    check_arguments(args)
    _require("ray", "ray[serve,data]", "relfast serve (pip install 'relfast[serve]')")
    import ray
    from ray import serve

    application = build(args)
    connected_here = not ray.is_initialized()  # a caller's own Ray connection is left as it is
    started_cluster = connected_here and args.address is None
    if connected_here:
        # without --address, a Ray of its own: never a cluster RAY_ADDRESS or `ray start` left running,
        # whose Serve this command would shut down on exit
        ray.init(address=args.address or "local", include_dashboard=False if started_cluster else None,
                 configure_logging=False, log_to_driver=False)
    try:
        # on a cluster whose Serve already runs, its HTTP host and port stay (Serve applies them once)
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(application, name=args.name, route_prefix=args.route_prefix, blocking=False)
        except RuntimeError as error:  # a replica that could not load the model
            _fail(f"the model could not be served: {_deploy_failure(serve, args.name, error)}")
        base = f"http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}"
        print(f"relfast: serving {args.model or 'the embedded model'} at {base} (POST /predict, POST /explain, "
              f"GET /healthz); Ctrl-C stops", flush=True)
        stop = stop or threading.Event()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:  # Ctrl-C, also while the replicas start: stop cleanly, no traceback
        pass
    finally:
        if started_cluster:
            serve.shutdown()
        else:
            serve.delete(args.name)
        if connected_here:
            ray.shutdown()
    print("relfast: stopped", file=sys.stderr)


def _deploy_failure(serve, name: str, error: Exception) -> str:
    """Why the application failed to deploy, in one line: the replica's ModelLoadError (which
    Serve keeps in the deployment's status, under its traceback), else Serve's own message."""
    try:
        deployments = serve.status().applications[name].deployments.values()
        messages = [d.message for d in deployments if d.message]
    except Exception:  # noqa: BLE001  the status is a courtesy; Serve's own error still says something
        messages = []
    for message in messages:
        for line in reversed(message.splitlines()):
            if "ModelLoadError: " in line:
                return line.split("ModelLoadError: ", 1)[1].strip()
    lines = [line for line in (messages[-1] if messages else str(error)).strip().splitlines() if line.strip()]
    return lines[-1] if lines else str(error)
