"""Load generator for ``relfast serve``: requests/s and p50/p95/p99 latency of ``POST /predict``
and ``POST /explain`` at several client concurrencies, on this machine only (127.0.0.1).

Two modes:

    # suite: start `relfast serve` once per (model, replicas), run the grid, stop it, print a
    # Markdown report for benchmarks/RESULTS.md (the issue's full run: about 9-10 minutes on the
    # 2-core CPU, most of it in vit-b16's cells)
    .venv/bin/python benchmarks/load_serve.py --models default vit-b16 --replicas 1 2 \\
        --concurrency 1 8 32 --requests 600 --seconds 15 --json /tmp/load_serve.json

    # a short check of the suite (one model, two concurrencies)
    .venv/bin/python benchmarks/load_serve.py --models default --concurrency 1 8 --requests 40 --seconds 10

    # load a server that is already running (loopback only)
    .venv/bin/python benchmarks/load_serve.py --url http://127.0.0.1:8000 --concurrency 1 8

Models of the suite: ``default`` (``relfast serve`` with no MODEL: the embedded Shapes ViT,
64 px) and ``vit-b16`` (a ViT-B/16-shaped ``ViTForImageClassification``, 224 px, 12 layers, hidden
768, 12 heads, MLP 3072, 10 labels, random weights from a fixed seed, saved with a
``ViTImageProcessor`` into a temporary folder; nothing is downloaded). Each server is
``relfast serve [MODEL] --replicas R --threads 1`` on a free loopback port, with its own local Ray
instance (``RAY_ADDRESS=local`` and a private ``RAY_TMPDIR``, so it never joins another Ray on the
machine); after SIGINT the script waits for it, then kills any process of that instance still alive
(found by its private temp dir or its session), and only those.

Each cell (model, replicas, route, concurrency): ``--warmup`` requests first (not measured), then
``concurrency`` client threads, each with its own keep-alive connection, send requests back to back
until ``--requests`` have been sent or ``--seconds`` have passed, whichever comes first. Requests
in flight when the time is up are waited for (each bounded by ``--timeout``), so a cell can run
past ``--seconds`` by about one latency at that concurrency; their latencies count, so slow
requests are not dropped from the percentiles, and the next cell starts on an idle server. Both
routes send the same prepared bodies (base64 PNGs of Shapes images at the model's input size, or
``--input array``: the normalised pixels).

Beyond ``8 x --max-batch`` requests per replica (relfast.serve's ``max_ongoing_requests``), Ray
Serve holds the rest in its router, which retries them with a back-off of up to 0.5 s (at
``2 x --max-batch``, the first limit, one replica of the default model answered 40 requests/s at
concurrency 32 and 150 at 16).

Every answer is checked: HTTP 200 and a JSON object holding ``predicted`` (and ``image_map`` for
/explain); anything else is an error, printed as it happens. Per cell: requests answered, errors,
requests/s (answered requests over the cell's wall time) and the latency percentiles of the
answered requests. Then the issue's checks: explain p95 / predict p95 at each concurrency (goal
<= 2.5), explain requests/s at the most replicas over the fewest at each concurrency (goal >= 1.6
for 1 -> 2 replicas, judged at the highest concurrency) and the total errors (goal 0).

Exit status: 0 when every request was answered, 1 when some were errors, 2 when the run could not
be made (a non-loopback --url, a server that did not start).
"""
import argparse
import datetime
import http.client
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

ROUTES = ("/predict", "/explain")
# what a good answer holds, per route (relfast.serve.backend's answers)
REQUIRED_FIELDS = {"/predict": ("predicted",), "/explain": ("predicted", "image_map")}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
MODELS = ("default", "vit-b16")
GOAL_P95_RATIO = 2.5  # explain p95 / predict p95 at the same concurrency, at most
GOAL_SCALING = 1.6  # explain requests/s at 2 replicas / 1 replica, at least
DISTINCT_BODIES = 8  # requests cycle through this many prepared images
PRINTED_ERRORS_PER_CELL = 10  # an error storm prints this many lines, then a count


class SetupError(Exception):
    """The run cannot be made (bad --url, a server that does not start): one line, exit status 2."""


# ---- numbers ----

def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100), numpy's (linear interpolation); None for no values."""
    return float(np.percentile(values, q)) if len(values) else None


def summarize(latencies_s: Sequence[float], errors: int, elapsed_s: float) -> Dict[str, Optional[float]]:
    """A cell's numbers: answered requests, errors, answered requests per second of wall time, and
    the p50/p95/p99 latency of the answered requests in milliseconds."""
    answered = len(latencies_s)

    def ms(q):
        value = percentile(latencies_s, q)
        return None if value is None else value * 1000.0

    return {"requests": answered, "errors": errors, "elapsed_s": elapsed_s,
            "rps": answered / elapsed_s if elapsed_s > 0 else None,
            "p50_ms": ms(50), "p95_ms": ms(95), "p99_ms": ms(99)}


# ---- the server's address and answers ----

@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    prefix: str  # the application's route prefix, "" or "/something"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.prefix}"


def parse_url(url: str) -> Endpoint:
    """``http://127.0.0.1:PORT[/prefix]`` (or localhost) as an Endpoint; any other host or scheme
    is a ValueError: the generator loads this machine's server only."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"--url must start with http:// (got {url!r})")
    if parts.hostname not in LOOPBACK_HOSTS:
        raise ValueError(f"--url must name this machine (127.0.0.1 or localhost), got host {parts.hostname!r}: "
                         "the load generator only loads a local server")
    try:
        port = parts.port or 80
    except ValueError as error:  # a port that is no number or out of range
        raise ValueError(f"--url has a bad port ({error})") from None
    return Endpoint(parts.hostname, port, parts.path.rstrip("/"))


def check_answer(route: str, status: int, body: bytes) -> Optional[str]:
    """None for a good answer to ``route``, else one line saying what is wrong with it."""
    if status != 200:
        return f"HTTP {status}: {_snippet(body)}"
    try:
        answer = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"HTTP 200 but not JSON: {_snippet(body)}"
    if not isinstance(answer, dict):
        return f"HTTP 200 but a JSON {type(answer).__name__}, not an object"
    missing = [name for name in REQUIRED_FIELDS[route] if name not in answer]
    if missing:
        return f"HTTP 200 but no {', '.join(repr(m) for m in missing)} in the answer (keys: {sorted(answer)[:8]})"
    if isinstance(answer["predicted"], bool) or not isinstance(answer["predicted"], int):
        return f"HTTP 200 but 'predicted' is {answer['predicted']!r}, not a class index"
    if route == "/explain" and not (isinstance(answer["image_map"], list) and answer["image_map"]):
        return "HTTP 200 but 'image_map' is empty or not a list"
    return None


def _snippet(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def get_json(endpoint: Endpoint, path: str, timeout: float) -> Tuple[int, Optional[dict]]:
    connection = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout)
    try:
        connection.request("GET", endpoint.prefix + path)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return response.status, None


# ---- request bodies ----

def make_bodies(field: str, image_shape: Sequence[int], count: int = DISTINCT_BODIES, seed: int = 0) -> List[bytes]:
    """``count`` JSON request bodies (the same for both routes): Shapes images (relfast.data, the
    default model's own data) at the model's input size, as base64 PNGs (``field`` "image") or as
    (C, H, W) pixels normalised as (x - 0.5) / 0.5 (``field`` "array"; relfast's default model and
    HF ViT's image processor with its default mean and std)."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from relfast.data import make_shapes

    channels, height, width = (int(d) for d in image_shape)
    images = make_shapes(count, image_size=max(height, width), seed=seed)[0][:, :, :height, :width].numpy()
    bodies = []
    for image in images:  # (3, H, W) in [0, 1]
        if field == "image":
            buffer = io.BytesIO()
            Image.fromarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(buffer, format="PNG")
            request = {"image": base64.b64encode(buffer.getvalue()).decode("ascii")}
        else:
            pixels = image.mean(0, keepdims=True) if channels == 1 else image[:channels]
            request = {"array": np.round((pixels - 0.5) / 0.5, 5).tolist()}
        bodies.append(json.dumps(request).encode("utf-8"))
    return bodies


# ---- driving the load ----

@dataclass
class Pass:
    """What one pass of client threads saw."""

    latencies_s: List[float]
    errors: List[str]
    elapsed_s: float
    sent: int


def drive(endpoint: Endpoint, route: str, bodies: Sequence[bytes], workers: int, max_requests: int,
          max_seconds: float, timeout: float, on_error=None) -> Pass:
    """``workers`` threads, each with its own keep-alive connection, send ``bodies`` in turn to
    ``route`` back to back until ``max_requests`` are sent or ``max_seconds`` have passed; requests
    already sent are waited for. ``on_error(line)`` is called for each failed request."""
    lock = threading.Lock()
    latencies: List[float] = []
    errors: List[str] = []
    issued = 0
    start = time.perf_counter()
    deadline = start + max_seconds
    path = endpoint.prefix + route
    headers = {"Content-Type": "application/json"}

    def claim() -> Optional[int]:
        nonlocal issued
        with lock:
            if issued >= max_requests or time.perf_counter() >= deadline:
                return None
            issued += 1
            return issued - 1

    def work():
        connection = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout)
        try:
            while (ticket := claim()) is not None:
                body = bodies[ticket % len(bodies)]
                sent_at = time.perf_counter()
                try:
                    connection.request("POST", path, body, headers)
                    response = connection.getresponse()
                    answer = response.read()
                    latency = time.perf_counter() - sent_at
                    problem = check_answer(route, response.status, answer)
                except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out
                    problem = f"{type(error).__name__}: {error}"
                    connection.close()  # the next request opens a fresh connection
                with lock:
                    if problem is None:
                        latencies.append(latency)
                    else:
                        errors.append(problem)
                if problem is not None and on_error is not None:
                    on_error(problem)
        finally:
            connection.close()

    threads = [threading.Thread(target=work, name=f"load-{i}", daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Pass(latencies, errors, time.perf_counter() - start, issued)


@dataclass
class Cell:
    """One measured cell of the grid (times in ms; rps: answered requests per second)."""

    model: str
    replicas: Optional[int]
    route: str
    concurrency: int
    requests: int
    errors: int
    warmup_errors: int
    elapsed_s: float
    rps: Optional[float]
    p50_ms: Optional[float]
    p95_ms: Optional[float]
    p99_ms: Optional[float]
    stopped_by: str  # "requests" or "seconds"


def run_cell(endpoint: Endpoint, model: str, replicas: Optional[int], route: str, concurrency: int,
             bodies: Sequence[bytes], max_requests: int, max_seconds: float, warmup: int, timeout: float,
             log=print) -> Cell:
    """Warm-up (``warmup`` requests from up to ``warmup`` threads, not measured), then the cell."""
    printed = 0

    def report(line):
        nonlocal printed
        printed += 1
        if printed <= PRINTED_ERRORS_PER_CELL:
            log(f"  error: {model} replicas={replicas if replicas is not None else '-'} {route} c={concurrency}: "
                f"{line}")

    warm = drive(endpoint, route, bodies, min(max(warmup, 0), concurrency), warmup, max_seconds, timeout, report) \
        if warmup > 0 else Pass([], [], 0.0, 0)
    measured = drive(endpoint, route, bodies, concurrency, max_requests, max_seconds, timeout, report)
    if printed > PRINTED_ERRORS_PER_CELL:
        log(f"  ... {printed - PRINTED_ERRORS_PER_CELL} more errors in this cell")
    numbers = summarize(measured.latencies_s, len(measured.errors), measured.elapsed_s)
    return Cell(model=model, replicas=replicas, route=route, concurrency=concurrency,
                warmup_errors=len(warm.errors), stopped_by="requests" if measured.sent >= max_requests else "seconds",
                **numbers)


# ---- the checks the issue names ----

def p95_ratios(cells: Sequence[Cell]) -> List[dict]:
    """explain p95 / predict p95 for each (model, replicas, concurrency) measured on both routes."""
    by_key = {(c.model, c.replicas, c.concurrency, c.route): c for c in cells}
    rows = []
    for (model, replicas, concurrency, route), explain in by_key.items():
        predict = by_key.get((model, replicas, concurrency, "/predict"))
        if route != "/explain" or predict is None or not predict.p95_ms or explain.p95_ms is None:
            continue
        ratio = explain.p95_ms / predict.p95_ms
        rows.append({"model": model, "replicas": replicas, "concurrency": concurrency, "explain_p95_ms": explain.p95_ms,
                     "predict_p95_ms": predict.p95_ms, "ratio": ratio, "meets_goal": ratio <= GOAL_P95_RATIO})
    return rows


def scaling(cells: Sequence[Cell]) -> List[dict]:
    """explain requests/s at the most replicas over the fewest, per (model, concurrency); the goal
    is judged at each model's highest concurrency."""
    explain = [c for c in cells if c.route == "/explain" and c.replicas is not None and c.rps]
    rows = []
    for model in dict.fromkeys(c.model for c in explain):
        mine = [c for c in explain if c.model == model]
        fewest, most = min(c.replicas for c in mine), max(c.replicas for c in mine)
        if fewest == most:
            continue
        levels = sorted({c.concurrency for c in mine})
        for concurrency in levels:
            low = next((c for c in mine if c.replicas == fewest and c.concurrency == concurrency), None)
            high = next((c for c in mine if c.replicas == most and c.concurrency == concurrency), None)
            if low is None or high is None:
                continue
            ratio = high.rps / low.rps
            judged = concurrency == levels[-1]
            rows.append({"model": model, "concurrency": concurrency, "replicas": [fewest, most], "rps_fewest": low.rps,
                         "rps_most": high.rps, "ratio": ratio, "judged": judged,
                         "meets_goal": (ratio >= GOAL_SCALING) if judged else None})
    return rows


# ---- the report ----

def machine() -> dict:
    """CPU model, core counts and memory of this machine (Linux /proc)."""
    cpu = platform.processor() or "unknown CPU"
    memory_gib = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "memory_gib": memory_gib,
            "system": platform.platform()}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("relfast", "torch", "ray", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def command_line(argv: Sequence[str]) -> str:
    """This run's command as typed from the repository root (paths made relative where they can be)."""
    def relative(path: str) -> str:
        try:
            shorter = os.path.relpath(path)
        except ValueError:  # another drive
            return path
        return path if shorter.startswith("..") else shorter

    return shlex.join([relative(sys.executable), relative(__file__), *argv])


def _num(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    """The run as a Markdown section for benchmarks/RESULTS.md."""
    info, soft = report["machine"], report["versions"]
    lines = [
        f"## Serving load test (`relfast serve`), CPU, {report['date']}",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
        f"{info['memory_gib']} GiB; {info['system']}. Versions: relfast {soft['relfast']}, torch {soft['torch']}, "
        f"ray {soft['ray']}, transformers {soft['transformers']}, Python {soft['python']}. "
        f"Server: {report['server']}. Clients: {report['clients']}.",
        "",
        "Command:",
        "",
        "```bash",
        report["command"],
        "```",
        "",
        "| model | replicas | route | concurrency | requests | errors | req/s | p50 ms | p95 ms | p99 ms "
        "| stopped by |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cell in report["cells"]:
        errors = str(cell["errors"]) + (f" (+{cell['warmup_errors']} warm-up)" if cell["warmup_errors"] else "")
        lines.append(f"| {cell['model']} | {cell['replicas'] if cell['replicas'] is not None else '-'} | "
                     f"`{cell['route']}` | {cell['concurrency']} | {cell['requests']} | {errors} | "
                     f"{_num(cell['rps'], 2)} | {_num(cell['p50_ms'])} | {_num(cell['p95_ms'])} | "
                     f"{_num(cell['p99_ms'])} | {cell['stopped_by']} |")
    if any(cell["requests"] < 100 for cell in report["cells"]):
        lines += ["", "(A cell of fewer than 100 answered requests has a p99 close to its slowest request.)"]
    checks = report["checks"]
    lines += ["", f"explain p95 / predict p95 at the same concurrency (goal <= {GOAL_P95_RATIO}):", "",
              "| model | replicas | concurrency | explain p95 ms | predict p95 ms | ratio | goal |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in checks["p95_ratio"]:
        lines.append(f"| {row['model']} | {row['replicas'] if row['replicas'] is not None else '-'} | "
                     f"{row['concurrency']} | {_num(row['explain_p95_ms'])} | {_num(row['predict_p95_ms'])} | "
                     f"{row['ratio']:.2f} | {'met' if row['meets_goal'] else '**missed**'} |")
    if checks["scaling"]:
        lines += ["", f"explain throughput, most replicas / fewest (goal >= {GOAL_SCALING} for 1 -> 2 replicas, "
                  "judged at the highest concurrency):", "",
                  "| model | replicas | concurrency | req/s fewest | req/s most | ratio | goal |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in checks["scaling"]:
            verdict = "-" if row["meets_goal"] is None else "met" if row["meets_goal"] else "**missed**"
            lines.append(f"| {row['model']} | {row['replicas'][0]} -> {row['replicas'][1]} | {row['concurrency']} "
                         f"| {_num(row['rps_fewest'], 2)} | {_num(row['rps_most'], 2)} | {row['ratio']:.2f} "
                         f"| {verdict} |")
    lines += ["", f"Errors: {checks['errors']} in {checks['requests']} measured requests "
              f"(+{checks['warmup_errors']} in warm-ups); goal 0: {'met' if checks['errors_ok'] else '**missed**'}."]
    if report.get("leftover_processes"):
        lines.append(f"Ray processes still alive after a server stopped (killed by the script): "
                     f"{report['leftover_processes']}.")
    return "\n".join(lines)


def build_report(cells: Sequence[Cell], args: argparse.Namespace, argv: Sequence[str], server: str,
                 leftovers: int) -> dict:
    measured = sum(c.requests + c.errors for c in cells)
    errors = sum(c.errors for c in cells)
    warmup_errors = sum(c.warmup_errors for c in cells)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(argv),
        "machine": machine(),
        "versions": versions(),
        "server": server,
        "clients": (f"{'/'.join(map(str, args.concurrency))} threads of http.client (keep-alive), in this process; "
                    f"per cell at most {args.requests} requests and {args.seconds:g} s after {args.warmup} warm-up "
                    f"requests; {args.input} bodies, {DISTINCT_BODIES} distinct"),
        "settings": vars(args),
        "cells": [asdict(c) for c in cells],
        "checks": {"p95_ratio": p95_ratios(cells), "scaling": scaling(cells), "errors": errors,
                   "warmup_errors": warmup_errors, "requests": measured,
                   "errors_ok": errors == 0 and warmup_errors == 0},
        "leftover_processes": leftovers,
    }


# ---- the servers of the suite ----

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_vit_b16(folder: Path) -> Path:
    """A ViT-B/16-shaped image classifier with random weights (fixed seed) and its image processor,
    saved as a HuggingFace folder; built from its config, nothing downloaded."""
    import torch
    import transformers

    config = transformers.ViTConfig(image_size=224, patch_size=16, num_channels=3, hidden_size=768,
                                    num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                    num_labels=10)
    transformers.utils.logging.disable_progress_bar()  # the save's progress bar, in the middle of the report
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).eval().save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def _read_proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # gone meanwhile, or not ours to read
        return b""


def instance_processes(marker: str, session: int) -> List[int]:
    """Processes of one server's Ray instance: those whose command line or environment names its
    private temp dir (Ray renames its workers' command lines; the environment stays), or that
    share the server's session. Other Ray instances on the machine have neither."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            same_session = os.getsid(pid) == session
        except OSError:
            continue
        if same_session or needle in _read_proc(pid, "cmdline") or needle in _read_proc(pid, "environ"):
            found.append(pid)
    return found


class Server:
    """``relfast serve`` in a subprocess with its own Ray instance; a context manager whose value
    is the Endpoint, once /healthz answers 200."""

    def __init__(self, model_path: Optional[Path], replicas: int, threads: int, work_dir: Path, *,
                 port: Optional[int] = None, max_batch: Optional[int] = None, batch_wait_ms: Optional[float] = None,
                 start_timeout: float = 300.0, stop_timeout: float = 60.0, log=print):
        self.model_path, self.replicas, self.threads = model_path, replicas, threads
        self.port = port or free_port()
        self.max_batch, self.batch_wait_ms = max_batch, batch_wait_ms
        self.start_timeout, self.stop_timeout, self.log = start_timeout, stop_timeout, log
        # short: Ray puts unix sockets under it, and their paths have a ~100-byte limit
        self.ray_dir = tempfile.mkdtemp(prefix="rl-ray-", dir="/tmp")
        self.log_path = work_dir / f"serve-r{replicas}-{self.port}.log"
        self.process: Optional[subprocess.Popen] = None
        self.leftovers = 0

    def command(self) -> List[str]:
        argv = [sys.executable, "-m", "relfast.cli", "serve"]
        if self.model_path is not None:
            argv.append(str(self.model_path))
        argv += ["--port", str(self.port), "--replicas", str(self.replicas), "--threads", str(self.threads)]
        if self.max_batch is not None:
            argv += ["--max-batch", str(self.max_batch)]
        if self.batch_wait_ms is not None:
            argv += ["--batch-wait-ms", f"{self.batch_wait_ms:g}"]
        return argv

    def __enter__(self) -> Endpoint:
        environment = dict(os.environ, RAY_ADDRESS="local", RAY_TMPDIR=self.ray_dir, PYTHONUNBUFFERED="1")
        self.log(f"starting: {shlex.join(self.command())}  (log {self.log_path})")
        with open(self.log_path, "wb") as log_file:
            # its own session: Ctrl-C on this script reaches it only through __exit__, after the clients stop
            self.process = subprocess.Popen(self.command(), stdout=log_file, stderr=subprocess.STDOUT,
                                            env=environment, start_new_session=True, cwd=Path(__file__).parent.parent)
        try:
            endpoint = Endpoint("127.0.0.1", self.port, "")
            self._wait_healthy(endpoint)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return endpoint

    def _wait_healthy(self, endpoint: Endpoint) -> None:
        started = time.monotonic()
        while time.monotonic() - started < self.start_timeout:
            if self.process.poll() is not None:
                raise SetupError(f"relfast serve exited with status {self.process.returncode} before answering; "
                                 f"its log ends:\n{self.log_tail()}")
            try:
                status, answer = get_json(endpoint, "/healthz", timeout=5.0)
            except (OSError, http.client.HTTPException):
                status, answer = None, None
            if status == 200 and answer and answer.get("status") == "ok":
                replicas_seen = self._replicas_seen(endpoint)
                self.log(f"ready after {time.monotonic() - started:.0f} s: {answer.get('model')}, input "
                         f"{answer.get('input')}, replicas answering /healthz: {replicas_seen} of {self.replicas}")
                if replicas_seen < self.replicas:
                    self.log("  warning: not every replica answered /healthz; the replica scaling may be understated")
                return
            time.sleep(0.5)
        raise SetupError(f"relfast serve did not answer GET /healthz within {self.start_timeout:g} s; its log ends:\n"
                         f"{self.log_tail()}")

    def _replicas_seen(self, endpoint: Endpoint, rounds: int = 10) -> int:
        """How many distinct replicas answer /healthz, asked by a few concurrent calls per round
        (Serve sends one client's calls in a row to the same idle replica)."""
        seen = set()

        def ask():
            try:
                status, answer = get_json(endpoint, "/healthz", timeout=5.0)
            except (OSError, http.client.HTTPException):
                return
            if status == 200 and answer:
                seen.add(answer.get("replica"))

        for _ in range(rounds):
            askers = [threading.Thread(target=ask) for _ in range(4 * self.replicas)]
            for asker in askers:
                asker.start()
            for asker in askers:
                asker.join()
            if len(seen) >= self.replicas:
                break
            time.sleep(0.5)
        return len(seen)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __exit__(self, *exc) -> None:
        """SIGINT (relfast serve's Ctrl-C: Serve and its Ray instance shut down), a kill after
        ``stop_timeout``, then any process of this Ray instance still alive is killed."""
        if self.process is None:
            return
        session = self.process.pid  # the session leader's pid is the session id
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.log(f"relfast serve did not stop within {self.stop_timeout:g} s after SIGINT; killing it")
                self.process.kill()
                self.process.wait()
        # Ray's own processes leave shortly after the driver; give them a moment before judging them leftovers
        leftovers = []
        for _ in range(20):
            leftovers = instance_processes(self.ray_dir, session)
            if not leftovers:
                break
            time.sleep(0.5)
        if leftovers:
            self.leftovers = len(leftovers)
            self.log(f"{len(leftovers)} process(es) of this server's Ray instance still alive after it stopped; "
                     f"killing them: {leftovers}")
            _kill_all(leftovers)
        self.log(f"stopped (exit status {self.process.returncode})")
        shutil.rmtree(self.ray_dir, ignore_errors=True)
        self.process = None


def _kill_all(pids: Sequence[int], grace_s: float = 5.0) -> None:
    for signal_number in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, signal_number)
            except OSError:  # already gone
                pass
        waited = time.monotonic()
        while time.monotonic() - waited < grace_s and any(Path(f"/proc/{pid}").exists() for pid in pids):
            time.sleep(0.2)


# ---- the two modes ----

def load_grid(endpoint: Endpoint, model: str, replicas: Optional[int], args: argparse.Namespace,
              log=print) -> List[Cell]:
    """Every (concurrency, route) cell against one server; predict and explain of one concurrency
    run one after the other, so their ratio compares like with like."""
    status, health = get_json(endpoint, "/healthz", timeout=args.timeout)
    if status != 200 or not health:
        raise SetupError(f"GET {endpoint.url}/healthz answered {status}, not a relfast server's health")
    if health.get("kind") != "image" or not health.get("input"):
        raise SetupError(f"the server at {endpoint.url} serves a {health.get('kind')} model; this load generator "
                         "sends images")
    bodies = make_bodies(args.input, health["input"])
    cells = []
    for concurrency in args.concurrency:
        for route in ROUTES:
            cell = run_cell(endpoint, model, replicas, route, concurrency, bodies, args.requests, args.seconds,
                            args.warmup, args.timeout, log)
            log(f"  {model:<8} replicas={replicas if replicas is not None else '-'} {route:<9} c={concurrency:<3} "
                f"{cell.requests:>4} ok {cell.errors:>2} errors  {_num(cell.rps, 2):>7} req/s  "
                f"p50 {_num(cell.p50_ms):>7} p95 {_num(cell.p95_ms):>7} p99 {_num(cell.p99_ms):>7} ms  "
                f"({cell.elapsed_s:.1f} s, stopped by {cell.stopped_by})")
            cells.append(cell)
    return cells


@dataclass
class Progress:
    """What the suite has measured so far (kept when a later server fails or Ctrl-C stops the run)."""

    cells: List[Cell]
    leftover_processes: int = 0


def run_suite(args: argparse.Namespace, progress: Progress, log=print) -> None:
    with tempfile.TemporaryDirectory(prefix="relfast-load-") as scratch:
        work_dir = Path(scratch)
        for model in args.models:
            model_path = None
            if model == "vit-b16":
                log("building the ViT-B/16-shaped model (random weights, seed 0)")
                model_path = build_vit_b16(work_dir / "vit-b16")
            for replicas in args.replicas:
                server = Server(model_path, replicas, args.threads, work_dir, port=args.port,
                                max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                                start_timeout=args.start_timeout, stop_timeout=args.stop_timeout, log=log)
                try:
                    with server as endpoint:
                        progress.cells += load_grid(endpoint, model, replicas, args, log)
                finally:
                    progress.leftover_processes += server.leftovers


def serve_defaults() -> Tuple[int, float]:
    """relfast serve's own --max-batch and --batch-wait-ms defaults, for the report."""
    from relfast.serve import command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.get_default("max_batch"), parser.get_default("batch_wait_ms")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="load this running server (http://127.0.0.1:PORT[/prefix]) instead of starting "
                        "servers")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="suite: models to serve "
                        "(default: both)")
    parser.add_argument("--replicas", nargs="+", type=int, default=[1, 2], help="suite: replica counts, one server "
                        "each (default 1 2)")
    parser.add_argument("--threads", type=int, default=1, help="suite: relfast serve --threads (default 1)")
    parser.add_argument("--max-batch", type=int, help="suite: relfast serve --max-batch (default: the server's)")
    parser.add_argument("--batch-wait-ms", type=float, help="suite: relfast serve --batch-wait-ms (default: the "
                        "server's)")
    parser.add_argument("--port", type=int, help="suite: the servers' port (default: a free one)")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32], help="client threads per cell "
                        "(default 1 8 32)")
    parser.add_argument("--requests", type=int, default=200, help="measured requests per cell, at most (default 200)")
    parser.add_argument("--seconds", type=float, default=15.0, help="time per cell, at most, for sending (default 15; "
                        "requests in flight then are waited for)")
    parser.add_argument("--warmup", type=int, default=4, help="unmeasured requests before each cell (default 4)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take (default 120)")
    parser.add_argument("--input", choices=("image", "array"), default="image", help="request field: base64 PNG "
                        "'image' (default) or normalised pixels 'array'")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="suite: seconds a server may take to "
                        "answer /healthz (default 300)")
    parser.add_argument("--stop-timeout", type=float, default=60.0, help="suite: seconds a server may take to stop "
                        "after SIGINT before it is killed (default 60)")
    parser.add_argument("--json", metavar="OUT", help="also write the raw numbers and the checks to this JSON file")
    args = parser.parse_args(argv)
    for flag in ("requests", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1")
    if args.seconds <= 0 or args.timeout <= 0 or args.warmup < 0:
        parser.error("--seconds and --timeout must be > 0, --warmup >= 0")
    if min(args.concurrency) < 1 or min(args.replicas) < 1:
        parser.error("--concurrency and --replicas take integers >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    log = lambda line: print(line, flush=True)  # noqa: E731  progress lines, as they happen
    progress = Progress(cells=[])
    failure = None
    if args.url is not None:
        try:
            endpoint = parse_url(args.url)
        except ValueError as error:
            print(f"load_serve: error: {error}", file=sys.stderr)
            return 2
        server = f"running at {endpoint.url} (its settings as it was started)"
    else:
        max_batch, batch_wait_ms = serve_defaults()
        server = (f"`relfast serve [MODEL] --replicas R --threads {args.threads}`"
                  + (f" --max-batch {args.max_batch}" if args.max_batch is not None else "")
                  + (f" --batch-wait-ms {args.batch_wait_ms:g}" if args.batch_wait_ms is not None else "")
                  + f" on 127.0.0.1 (--max-batch {args.max_batch or max_batch}, --batch-wait-ms "
                  + f"{args.batch_wait_ms if args.batch_wait_ms is not None else batch_wait_ms:g}), one local Ray "
                  + "instance per server")
    try:
        if args.url is not None:
            progress.cells += load_grid(endpoint, "server", None, args, log)
        else:
            run_suite(args, progress, log)
    except SetupError as error:
        failure = str(error)
    except KeyboardInterrupt:
        failure = "interrupted; the report holds the cells measured before"
    if failure is not None:
        print(f"load_serve: error: {failure}", file=sys.stderr)
        if not progress.cells:
            return 2
    report = build_report(progress.cells, args, argv, server, progress.leftover_processes)
    print()
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\n(raw numbers in {args.json})")
    if failure is not None:
        return 2
    return 0 if report["checks"]["errors_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
