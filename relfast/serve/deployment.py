"""The Ray Serve deployment: HTTP routes, dynamic batching (``@serve.batch``) and fault isolation.

Ray does the scheduling, the queues, the replicas and their restarts; this file only answers
requests. Each batch Serve hands over is split into groups that one model call can answer (the
same route, method and target shape); a group whose call fails is answered request by request, so
a request that breaks the model gets its own 500 and the others of its batch their answers.
"""
import asyncio
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

from ray import serve
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse

from . import backend as backends
from .protocol import ROUTES, BadRequest, Request, check_size, parse, route_of

logger = logging.getLogger("ray.serve")

Answer = Tuple[int, Dict[str, Any]]


@serve.deployment(name="relfast")
class Explaining:
    """One replica: the model (loaded here, on the replica's node) and its batched answers.

    ``model_args``: what :func:`relfast.serve.backend.load` takes (model, tokenizer,
    image_processor, labels)."""

    def __init__(self, model_args: Dict[str, Any], method: Optional[str], max_batch: int, batch_wait_ms: float, threads: int,
                 max_bytes: int):
        self.backend = backends.load(**model_args, threads=threads)
        spec = self.backend.spec
        if method is not None:
            if method not in spec.methods:
                raise backends.ModelLoadError(f"argument 'method' {method!r} is not one this model answers "
                                              f"({', '.join(spec.methods)})")
            self.backend.spec = dataclasses.replace(spec, default_method=method)
            try:  # a method this model cannot take fails the deployment, not every request
                self.backend.check(Request("/explain", "array", None, method=method))
            except BadRequest as error:
                raise backends.ModelLoadError(f"argument 'method': {error.message}") from None
        self.max_bytes = max_bytes
        # one model call at a time per replica: torch's own threads (--threads) do the parallel work,
        # and the event loop stays free for /healthz and for gathering the next batch meanwhile
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relfast-model")
        self.batched.set_max_batch_size(max_batch)
        self.batched.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)
        self.replica = serve.get_replica_context().replica_id.unique_id  # which copy answered (/healthz)

    async def __call__(self, http: HttpRequest) -> JSONResponse:
        route = route_of(http.url.path, http.scope.get("root_path", ""))
        try:
            if route == "/healthz":
                if http.method != "GET":
                    raise BadRequest("http method", f"/healthz takes GET, got {http.method}", status=405)
                return JSONResponse({"status": "ok", "replica": self.replica, **self.backend.describe()})
            if route not in ROUTES:
                raise BadRequest("path", f"{route} is not a route of this server (POST /predict, POST /explain, "
                                 "GET /healthz)", status=404)
            if http.method != "POST":
                raise BadRequest("http method", f"{route} takes POST, got {http.method}", status=405)
            request = parse(route, await self._body(http), self.backend.spec, self.max_bytes)
            self.backend.check(request)
        except BadRequest as error:
            return JSONResponse(error.payload(), status_code=error.status)
        except Exception as error:  # noqa: BLE001  e.g. a tokenizer that fails on this text: its own 500
            logger.exception("relfast: preparing a request failed")
            return JSONResponse(_failure(error), status_code=500)
        status, payload = await self.batched(request)
        return JSONResponse(payload, status_code=status)

    async def _body(self, http: HttpRequest) -> bytes:
        """The body, refused as soon as it passes --max-bytes (by its header, or while reading)."""
        declared = http.headers.get("content-length")
        if declared is not None and declared.isdigit():
            check_size(int(declared), self.max_bytes)
        chunks, size = [], 0
        async for chunk in http.stream():
            size += len(chunk)
            check_size(size, self.max_bytes)
            chunks.append(chunk)
        return b"".join(chunks)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # replaced in __init__ by --max-batch, --batch-wait-ms
    async def batched(self, requests: List[Request]) -> List[Answer]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, answer_batch, self.backend, requests)


def answer_batch(backend: "backends.Backend", requests: List[Request]) -> List[Answer]:
    """(status, JSON payload) for each request of one batch, in order; each payload says in how
    large a batch its request arrived ("batch")."""
    answers: List[Optional[Answer]] = [None] * len(requests)
    groups: Dict[Any, List[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault((request.route, request.method, request.target_shape), []).append(index)
    for indices in groups.values():
        group = [requests[i] for i in indices]
        try:
            results = [(200, payload) for payload in backend.run(group)]
        except Exception as error:  # noqa: BLE001  one request may have broken the batch: answer each alone
            if len(group) == 1:
                results = [_refused(group[0], error)]
            else:
                logger.warning("relfast: a batch of %d requests failed; answering them one by one", len(group))
                results = [_alone(backend, request) for request in group]
        for index, result in zip(indices, results):
            answers[index] = result
    for status, payload in answers:
        payload["batch"] = len(requests)
    return answers


def _alone(backend: "backends.Backend", request: Request) -> Answer:
    try:
        return 200, backend.run([request])[0]
    except Exception as error:  # noqa: BLE001  answered below, the server goes on
        return _refused(request, error)


def _refused(request: Request, error: Exception) -> Answer:
    """The answer to one request whose model call raised ``error``."""
    if isinstance(error, BadRequest):
        return error.status, error.payload()
    if isinstance(error, ValueError):  # relfast's own checks of this input (the model's or the exported file's)
        text = str(error).strip().splitlines()[0] if str(error).strip() else "invalid input"
        field = "target" if "'target'" in text else request.field
        return 422, {"error": f"field '{field}': {text}", "field": field}
    logger.error("relfast: the model failed on a request", exc_info=error)
    return 500, _failure(error)


def _failure(error: Exception) -> Dict[str, Any]:
    text = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return {"error": f"the model failed on this request ({type(error).__name__}: {text})", "field": None}
