"""benchmarks/load_serve.py, the load generator for `relfast serve`: its numbers, its refusal of
foreign hosts, its answer checks, and its bounds and error accounting against a stub server on
127.0.0.1 (no Ray: the stub checks each body with relfast.serve.protocol, as the real server does).
"""
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from relfast.serve import protocol

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "load_serve.py"
STUB_INPUT = (3, 16, 16)


@pytest.fixture(scope="module")
def load():
    spec = importlib.util.spec_from_file_location("load_serve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


# ---- a stub of relfast serve ----

class Stub:
    """Answers like relfast serve: GET /healthz, POST /predict and /explain (bodies checked by
    relfast.serve.protocol); the requests numbered in ``fail`` (1-based, over both routes) get a 500;
    each answer waits ``delay`` seconds."""

    def __init__(self, delay=0.0, fail=()):
        self.delay, self.fail = delay, set(fail)
        self.lock = threading.Lock()
        self.posts = 0
        self.bad_bodies = []
        self.spec = protocol.ModelSpec(kind="image", methods=("generic",), default_method="generic", num_classes=4,
                                       image_shape=STUB_INPUT)

    def handler(stub):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the generator's connections expect

            def log_message(self, *args):
                pass

            def reply(self, status, payload):
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                if self.path == "/healthz":
                    self.reply(200, {"status": "ok", "kind": "image", "input": list(STUB_INPUT), "model": "Stub",
                                     "replica": "stub"})
                else:
                    self.reply(404, {"error": "no such route"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with stub.lock:
                    stub.posts += 1
                    number = stub.posts
                try:
                    protocol.parse(self.path, body, stub.spec)
                except protocol.BadRequest as error:
                    stub.bad_bodies.append(error.line)
                    return self.reply(error.status, error.payload())
                time.sleep(stub.delay)
                if number in stub.fail:
                    return self.reply(500, {"error": "the model failed on this request (scripted)", "field": None})
                answer = {"predicted": 2, "label": "blue", "logits": [0.1, 0.2, 0.9, 0.0], "batch": 1}
                if self.path == "/explain":
                    answer.update(method="generic", target=2, relevance=[[0.5] * 17], image_map=[[0.1] * 4] * 4)
                self.reply(200, answer)

        return Handler


@pytest.fixture
def stub_server():
    """``start(stub)`` serves a Stub on 127.0.0.1, a free port; returns its Endpoint."""
    servers = []

    def start(stub):
        server = ThreadingHTTPServer(("127.0.0.1", 0), stub.handler())
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# ---- numbers ----

def test_percentile_matches_numpy(load):
    rng = np.random.default_rng(0)
    for size in (1, 2, 3, 10, 101, 1000):
        values = rng.lognormal(size=size).tolist()
        for q in (0, 1, 25, 50, 90, 95, 99, 99.9, 100):
            assert load.percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12), (size, q)
    assert load.percentile([], 50) is None


def test_summary_is_in_milliseconds_of_answered_requests(load):
    rng = np.random.default_rng(1)
    latencies = rng.uniform(0.01, 0.5, size=57).tolist()
    summary = load.summarize(latencies, errors=3, elapsed_s=4.0)
    assert summary["requests"] == 57 and summary["errors"] == 3
    assert summary["rps"] == pytest.approx(57 / 4.0)  # answered requests only, over the wall time
    for q in (50, 95, 99):
        assert summary[f"p{q}_ms"] == pytest.approx(1000 * np.percentile(latencies, q))
    empty = load.summarize([], errors=2, elapsed_s=1.0)
    assert empty["rps"] == 0 and empty["p50_ms"] is None and empty["errors"] == 2


def test_checks_compare_routes_and_replicas(load):
    def cell(replicas, route, concurrency, rps, p95):
        return load.Cell("m", replicas, route, concurrency, 10, 0, 0, 1.0, rps, p95 / 2, p95, p95, "requests")

    cells = [cell(1, "/predict", 1, 10, 100), cell(1, "/explain", 1, 5, 200),
             cell(1, "/predict", 8, 20, 100), cell(1, "/explain", 8, 10, 300),
             cell(2, "/predict", 1, 12, 100), cell(2, "/explain", 1, 6, 200),
             cell(2, "/predict", 8, 30, 100), cell(2, "/explain", 8, 17, 240)]
    ratios = {(r["replicas"], r["concurrency"]): r for r in load.p95_ratios(cells)}
    assert ratios[(1, 8)]["ratio"] == pytest.approx(3.0) and not ratios[(1, 8)]["meets_goal"]
    assert ratios[(2, 8)]["ratio"] == pytest.approx(2.4) and ratios[(2, 8)]["meets_goal"]
    scaling = {r["concurrency"]: r for r in load.scaling(cells)}
    assert scaling[1]["ratio"] == pytest.approx(1.2) and scaling[1]["meets_goal"] is None  # not the judged level
    assert scaling[8]["ratio"] == pytest.approx(1.7) and scaling[8]["meets_goal"] is True
    assert load.scaling([c for c in cells if c.replicas == 1]) == []  # one replica count: nothing to compare


# ---- addresses and answers ----

@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:9000/", "http://127.0.0.1:8000/relfast"])
def test_loopback_urls_are_taken(load, url):
    endpoint = load.parse_url(url)
    assert endpoint.host in ("127.0.0.1", "localhost")
    assert endpoint.url == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://10.0.0.5:8000", "http://0.0.0.0:8000", "http://example.com:80",
                                 "http://127.0.0.2:8000", "http://[::1]:8000", "https://127.0.0.1:8000",
                                 "127.0.0.1:8000"])
def test_other_urls_are_refused(load, url):
    with pytest.raises(ValueError, match="--url"):
        load.parse_url(url)


def test_a_foreign_host_is_exit_status_2_before_any_request(load, capsys):
    assert load.main(["--url", "http://192.168.1.7:8000", "--requests", "1"]) == 2
    err = capsys.readouterr().err
    assert "127.0.0.1" in err and "192.168.1.7" in err
    assert err.count("\n") == 1  # one line, no traceback


GOOD_PREDICT = {"predicted": 1, "label": "green", "logits": [0.0, 1.0], "batch": 2}
GOOD_EXPLAIN = dict(GOOD_PREDICT, target=1, relevance=[[0.1, 0.2]], image_map=[[0.1, 0.2], [0.3, 0.4]])


@pytest.mark.parametrize("route,status,payload", [("/predict", 200, GOOD_PREDICT), ("/explain", 200, GOOD_EXPLAIN)])
def test_good_answers_pass(load, route, status, payload):
    assert load.check_answer(route, status, json.dumps(payload).encode()) is None


@pytest.mark.parametrize("route,status,body,says", [
    ("/explain", 200, json.dumps(GOOD_PREDICT), "image_map"),  # a predict answer to /explain
    ("/predict", 200, json.dumps({"label": "green"}), "predicted"),
    ("/predict", 500, json.dumps({"error": "the model failed"}), "HTTP 500"),
    ("/explain", 400, json.dumps({"error": "field 'image': ...", "field": "image"}), "HTTP 400"),
    ("/predict", 200, "<html>gateway</html>", "not JSON"),
    ("/predict", 200, "[1, 2]", "list"),
    ("/predict", 200, json.dumps({"predicted": True}), "predicted"),
    ("/predict", 200, json.dumps({"predicted": "cat"}), "predicted"),
    ("/explain", 200, json.dumps(dict(GOOD_EXPLAIN, image_map=[])), "image_map"),
    ("/predict", 200, b"\xff\xfe", "not JSON"),
])
def test_bad_answers_are_errors(load, route, status, body, says):
    problem = load.check_answer(route, status, body.encode() if isinstance(body, str) else body)
    assert problem is not None and says in problem


@pytest.mark.parametrize("field", ["image", "array"])
def test_bodies_are_what_the_server_takes(load, field):
    spec = protocol.ModelSpec(kind="image", methods=("generic",), default_method="generic", num_classes=4,
                              image_shape=(3, 24, 24))
    bodies = load.make_bodies(field, spec.image_shape, count=3)
    assert len(set(bodies)) == 3
    for body in bodies:
        for route in load.ROUTES:
            request = protocol.parse(route, body, spec)
            assert request.field == field
            if field == "array":
                assert request.value.shape == spec.image_shape and np.abs(request.value).max() <= 1.0


# ---- the load against a stub server ----

def test_the_request_bound_stops_a_cell_and_errors_are_counted(load, stub_server):
    stub = Stub(delay=0.005, fail={7})  # the 7th request: after the 3 warm-ups, the 4th measured one
    endpoint = load.Endpoint("127.0.0.1", stub_server(stub), "")
    printed = []
    cell = load.run_cell(endpoint, "stub", 1, "/explain", 4, load.make_bodies("image", STUB_INPUT, count=2),
                         max_requests=20, max_seconds=30, warmup=3, timeout=10, log=printed.append)
    assert stub.bad_bodies == []
    assert stub.posts == 3 + 20  # warm-ups, then exactly the bound
    assert (cell.requests, cell.errors, cell.warmup_errors) == (19, 1, 0)
    assert cell.stopped_by == "requests" and cell.elapsed_s < 5
    assert cell.p50_ms >= 5 and cell.p50_ms <= cell.p95_ms <= cell.p99_ms  # each answer waited 5 ms
    assert len(printed) == 1 and "HTTP 500" in printed[0] and "scripted" in printed[0]


def test_the_time_bound_stops_a_cell(load, stub_server):
    stub = Stub(delay=0.05)
    endpoint = load.Endpoint("127.0.0.1", stub_server(stub), "")
    started = time.perf_counter()
    cell = load.run_cell(endpoint, "stub", 1, "/predict", 2, load.make_bodies("image", STUB_INPUT, count=1),
                         max_requests=100_000, max_seconds=0.5, warmup=0, timeout=10)
    took = time.perf_counter() - started
    assert cell.stopped_by == "seconds" and cell.errors == 0
    assert 0.5 <= took < 0.5 + 1.0  # the cap, plus the requests in flight at it (50 ms each)
    assert 2 <= cell.requests <= 2 * 0.55 / 0.05 + 2  # two clients at 50 ms, back to back
    assert stub.posts == cell.requests  # every request sent was waited for and counted


def test_a_run_against_a_running_server(load, stub_server, tmp_path, capsys):
    stub = Stub(fail={3})
    port = stub_server(stub)
    out = tmp_path / "load.json"
    status = load.main(["--url", f"http://127.0.0.1:{port}", "--concurrency", "1", "3", "--requests", "6",
                        "--seconds", "20", "--warmup", "1", "--json", str(out)])
    assert status == 1  # one error: the run says so
    report = json.loads(out.read_text())
    cells = report["cells"]
    assert [(c["concurrency"], c["route"]) for c in cells] == [(1, "/predict"), (1, "/explain"), (3, "/predict"),
                                                               (3, "/explain")]
    assert stub.posts == 4 * (1 + 6) and stub.bad_bodies == []
    assert sum(c["requests"] + c["errors"] for c in cells) == 4 * 6
    assert report["checks"]["errors"] + report["checks"]["warmup_errors"] == 1 and not report["checks"]["errors_ok"]
    assert len(report["checks"]["p95_ratio"]) == 2 and report["checks"]["scaling"] == []
    printed = capsys.readouterr().out
    assert "| model | replicas | route | concurrency |" in printed and "load_serve.py --url" in printed


# ---- the suite's clean-up finds its own processes only ----

def test_instance_processes_are_found_by_session_or_temp_dir(load, tmp_path):
    marker = str(tmp_path / "rl-ray-marker")
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    # renamed command line, own session: found by the environment it inherited
    by_environment = subprocess.Popen(sleeper, env=dict(os.environ, RAY_TMPDIR=marker), start_new_session=True)
    stranger = subprocess.Popen(sleeper, start_new_session=True)
    try:
        found = load.instance_processes(marker, session=-1)
        assert by_environment.pid in found and stranger.pid not in found and os.getpid() not in found
        assert load.instance_processes(str(tmp_path / "elsewhere"), session=stranger.pid) == [stranger.pid]
    finally:
        for process in (by_environment, stranger):
            process.kill()
            process.wait()
