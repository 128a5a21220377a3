"""`relfast serve` on Ray Serve: served answers equal relfast.Explainer in process, bad requests are
4xx naming their field, a request that breaks the model fails alone, a killed replica costs only
the requests it held.

One local Ray instance for the module (loopback only, no dashboard); skipped where ray is not
installed. The expected maps come from relfast.Explainer on each request alone, prepared as
`relfast explain` prepares its inputs (relfast.cli's image reader, the folder's tokenizer).
"""
import base64
import io
import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from testing import cli_in_process

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'relfast[serve]'); the serving tests need "
                          "a local Ray instance")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'relfast[serve]')")

import transformers  # noqa: E402
from PIL import Image  # noqa: E402

import relfast  # noqa: E402
import relfast.serve  # noqa: E402
from relfast import cli  # noqa: E402
from relfast.serve import backend as backends  # noqa: E402
from relfast.serve import command, protocol  # noqa: E402
from relfast.serve.deployment import answer_batch  # noqa: E402

from conftest import LM_WORDS  # noqa: E402

TOLERANCE = 1e-5  # served against in-process maps, relative to the map's largest entry
TEXT_WORDS = LM_WORDS + ["poison"]
POISON = "poison"
BATCH = 6
ACTOR_CPUS = {"num_cpus": 0.25}  # six replicas share the test's small Ray instance


# ---- models ----

def _word_tokenizer(words):
    import tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, **{word: i + 2 for i, word in enumerate(words)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """A small random BERT sequence classifier (3 classes, 32 positions) and its word-level
    tokenizer, saved as a HuggingFace folder."""
    tokenizer = _word_tokenizer(TEXT_WORDS)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=32,
                                     num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("bert")
    transformers.BertForSequenceClassification(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class BertForSequenceClassification(transformers.BertForSequenceClassification):
    """The folder's classifier, failing at run time on one word, as a model can on an input its
    author never tried. Same class name: relfast explains it as the BERT family it is."""

    def forward(self, input_ids=None, **kwargs):
        if input_ids is not None and bool((input_ids == self.config.poison_id).any()):
            raise RuntimeError(f"token {self.config.poison_id} broke the model")
        return super().forward(input_ids=input_ids, **kwargs)


def _poisoned(folder):
    model = BertForSequenceClassification.from_pretrained(folder).eval()
    model.config.poison_id = _word_tokenizer(TEXT_WORDS).convert_tokens_to_ids(POISON)
    return model


# ---- HTTP ----

def call(url, body=None, method="POST", timeout=120):
    """(status, JSON payload) of one request; a non-JSON answer as {"raw": text}."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            status, raw = answer.status, answer.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"raw": raw.decode("utf-8", "replace")}


def together(url_bodies):
    """Sends the requests at once (a barrier releases them together): their answers, in order."""
    barrier = threading.Barrier(len(url_bodies))

    def send(item):
        barrier.wait()
        return call(*item)

    with ThreadPoolExecutor(max_workers=len(url_bodies)) as pool:
        return list(pool.map(send, url_bodies))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(height, width, seed):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[height // 4: height // 2, width // 4: width // 2] = (255, 0, 0)  # an object for the model to see
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(raw):
    return base64.b64encode(raw).decode("ascii")


# ---- expected answers: the in-process Explainer on each request alone ----

def image_input(raw, tmp_path):
    """The pixels `relfast explain --image` makes of this PNG (relfast.cli's reader)."""
    path = tmp_path / f"in_{abs(hash(raw))}.png"
    path.write_bytes(raw)
    pixels, _ = cli._read_image(path, 64)
    return relfast.data.normalize(pixels)[None]


def expected(explainer, inputs, target):
    out = explainer(inputs, target=None if target is None else torch.tensor([target]))
    return out.relevance[0].double().numpy(), out.target[0].tolist(), out.logits[0].double().numpy()


def assert_map_close(served, reference, what):
    served = np.asarray(served, dtype=np.float64)
    assert served.shape == reference.shape, (what, served.shape, reference.shape)
    scale = max(float(np.abs(reference).max()), 1e-12)
    error = float(np.abs(served - reference).max()) / scale
    assert error <= TOLERANCE, f"{what}: served map differs from the in-process Explainer by {error:.2e} (relative)"


# ---- the Ray instance and the applications ----

@pytest.fixture(scope="module")
def served(text_folder, causal_lm_folder, monkeypatch_module):
    """A local Ray instance with Serve on a free loopback port and the test applications."""
    monkeypatch_module.delenv("RAY_ADDRESS", raising=False)  # a fresh local instance, never someone else's
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the poisoned model class, for the replicas
    # logical CPUs: the six test replicas ask for 0.25 each, the command's replica for 1
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        # each test sends BATCH requests at once: they fill one batch (the wait only bounds a straggler)
        slow = dict(max_batch=BATCH, batch_wait_ms=5000, ray_actor_options=ACTOR_CPUS)
        apps = {
            "img": relfast.serve.app(None, **slow),
            "txt": relfast.serve.app(str(text_folder), **slow),
            "lm": relfast.serve.app(str(causal_lm_folder), **slow),
            "poison": relfast.serve.app(_poisoned(text_folder), tokenizer=_word_tokenizer(TEXT_WORDS), **slow),
            # two replicas answering at once (short batches): the bad-request storm, then one of them killed
            "pool": relfast.serve.app(None, replicas=2, max_batch=4, batch_wait_ms=5, max_bytes=1_000_000,
                                      ray_actor_options=ACTOR_CPUS),
        }
        serve.run_many([serve.RunTarget(target=app, name=name, route_prefix=f"/{name}") for name, app in apps.items()])
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def image_explainers():
    model = relfast.models.default_model()
    return {method: relfast.Explainer(model, method) for method in ("generic", "rollout")}


# ---- parity ----

def test_image_classifier_answers_equal_the_explainer_in_one_batch_of_different_sizes(served, image_explainers,
                                                                                      tmp_path):
    url = f"{served}/img/explain"
    images = [png(64, 64, 0), png(80, 50, 1), png(30, 30, 2), png(120, 90, 3), png(64, 64, 4)]
    array = np.random.default_rng(5).normal(size=(3, 64, 64)).astype(np.float32)
    sources = [images[0], images[1], images[2], images[3], array, images[4]]
    bodies = [{"image": b64(images[0])}, {"image": b64(images[1]), "target": 2},
              {"image": b64(images[2]), "target": [0, 3], "overlay": True}, {"image": b64(images[3])},
              {"array": array.tolist()}, {"image": b64(images[4]), "method": "rollout"}]
    answers = together([(url, body) for body in bodies])
    for index, ((status, payload), body, source) in enumerate(zip(answers, bodies, sources)):
        assert status == 200, payload
        assert payload["batch"] == len(bodies), "the concurrent requests were not answered as one batch"
        inputs = torch.from_numpy(array)[None] if "array" in body else image_input(source, tmp_path)
        relevance, target, logits = expected(image_explainers[body.get("method", "generic")], inputs,
                                             body.get("target"))
        assert payload["target"] == target and payload["method"] == body.get("method", "generic")
        assert_map_close(payload["relevance"], relevance, f"request {index}")
        assert_map_close(payload["logits"], logits, f"request {index} logits")
        grid = relevance[..., 1:].reshape(*relevance.shape[:-1], 8, 8)  # CLS first, then the 8 x 8 patches
        assert_map_close(payload["image_map"], grid, f"request {index} image map")
        assert payload["label"] == relfast.data.CLASSES[int(np.argmax(logits))]
    overlays = answers[2][1]["overlay"]
    assert len(overlays) == 2  # one per target, each the size of the image sent
    for overlay in overlays:
        with Image.open(io.BytesIO(base64.b64decode(overlay))) as picture:
            assert picture.format == "PNG" and picture.size == (30, 30)


def test_predict_answers_the_model_prediction(served, image_explainers, tmp_path):
    images = [png(48 + 8 * k, 64, 7 + k) for k in range(BATCH)]
    answers = together([(f"{served}/img/predict", {"image": b64(raw)}) for raw in images])
    for raw, (status, payload) in zip(images, answers):
        assert status == 200, payload
        assert payload["batch"] == BATCH
        with torch.no_grad():
            logits = image_explainers["generic"].model(image_input(raw, tmp_path)).logits[0].double().numpy()
        assert payload["predicted"] == int(np.argmax(logits))
        assert_map_close(payload["logits"], logits, "predict logits")
        assert "relevance" not in payload


def test_text_classifier_answers_equal_the_explainer(served, text_folder):
    tokenizer = transformers.AutoTokenizer.from_pretrained(text_folder)
    model = transformers.BertForSequenceClassification.from_pretrained(text_folder).eval()
    explainers = {method: relfast.Explainer(model, method) for method in ("generic", "attnlrp")}
    texts = ["the cat sat", "a dog ran to the park with a big red ball", "tree", "the mat under the tree", "ran"]
    bodies = [{"text": texts[0]}, {"text": texts[1], "target": 1}, {"text": texts[2], "target": [0, 2]},
              {"text": texts[3]}, {"array": [2, 3, 4, 5, 6]}, {"text": texts[4], "method": "attnlrp"}]
    answers = together([(f"{served}/txt/explain", body) for body in bodies])
    for index, ((status, payload), body) in enumerate(zip(answers, bodies)):
        assert status == 200, payload
        assert payload["batch"] == len(bodies)
        ids = (torch.tensor([body["array"]]) if "array" in body
               else tokenizer([body["text"]], return_tensors="pt")["input_ids"])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        relevance, target, logits = expected(explainers[body.get("method", "generic")], inputs, body.get("target"))
        assert payload["target"] == target
        assert payload["tokens"] == tokenizer.convert_ids_to_tokens(ids[0].tolist())
        assert_map_close(payload["relevance"], relevance, f"text request {index}")
        assert_map_close(payload["logits"], logits, f"text request {index} logits")


def test_causal_lm_answers_equal_the_explainer(served, causal_lm_folder):
    tokenizer = transformers.AutoTokenizer.from_pretrained(causal_lm_folder)
    explainer = relfast.Explainer(transformers.GPT2LMHeadModel.from_pretrained(causal_lm_folder).eval())
    prompts = ["the cat sat on a", "dog ran", "the big red ball under the tree and", "park", "a cat with a"]
    bodies = [{"text": prompts[0]}, {"text": prompts[1], "target": 5}, {"text": prompts[2], "target": [3, 7]},
              {"text": prompts[3], "method": "generic"}, {"text": prompts[4], "target": 2}]
    answers = together([(f"{served}/lm/explain", body) for body in bodies]
                       + [(f"{served}/lm/predict", {"text": prompts[1]})])
    for index, ((status, payload), body) in enumerate(zip(answers, bodies)):
        assert status == 200, payload
        assert payload["batch"] == len(bodies) + 1
        inputs = dict(tokenizer([body["text"]], return_tensors="pt"))
        relevance, target, logits = expected(explainer, inputs, body.get("target"))
        assert payload["target"] == target
        assert_map_close(payload["relevance"], relevance, f"prompt {index}")
        assert payload["predicted"] == int(np.argmax(logits))
        best = [entry["id"] for entry in payload["top"]]
        assert best[0] == int(np.argmax(logits))
        assert_map_close([entry["logit"] for entry in payload["top"]], logits[best], f"prompt {index} top logits")
    status, payload = answers[-1]
    assert status == 200 and payload["predicted"] == answers[1][1]["predicted"]


# ---- bad requests ----

def _bad_kinds(big_body):
    """(name, app, route, body bytes, status, field): 20+ kinds of requests the server must refuse."""
    j = lambda obj: json.dumps(obj).encode()  # noqa: E731
    good_png = b64(png(64, 64, 0))
    truncated_png = b64(png(64, 64, 0)[:60])
    return [
        ("malformed JSON", "pool", "explain", b'{"image": "abc"', 400, "body"),
        ("body not an object", "pool", "explain", j([1, 2, 3]), 400, "body"),
        ("body not UTF-8", "pool", "explain", b'{"image": "\xff\xfe"}', 400, "body"),
        ("body over --max-bytes", "pool", "explain", big_body, 413, "body"),
        ("no input", "pool", "explain", j({"method": "generic"}), 400, "input"),
        ("two inputs", "pool", "explain", j({"image": good_png, "array": [[[0.0]]]}), 400, "input"),
        ("unknown field", "pool", "explain", j({"imgae": good_png}), 400, "imgae"),
        ("image not a string", "pool", "explain", j({"image": 12}), 400, "image"),
        ("image not base64", "pool", "explain", j({"image": "%%% not base64 %%%"}), 400, "image"),
        ("image bytes not an image", "pool", "explain", j({"image": b64(b"GIF89a but really plain text")}), 400,
         "image"),
        ("image truncated PNG", "pool", "explain", j({"image": truncated_png}), 400, "image"),
        ("array wrong shape", "pool", "explain", j({"array": np.zeros((3, 32, 32)).tolist()}), 400, "array"),
        ("array wrong dtype", "pool", "explain", j({"array": [[["a"] * 64] * 64] * 3}), 400, "array"),
        ("array ragged", "pool", "explain", j({"array": [[[0.0] * 64] * 64, [[0.0] * 63] * 64, [[0.0] * 64] * 64]}),
         400, "array"),
        ("array NaN", "pool", "explain", json.dumps({"array": [[[float("nan")] * 64] * 64] * 3}).encode(), 400,
         "array"),
        ("array beyond 1e6", "pool", "explain", j({"array": [[[1e7] * 64] * 64] * 3}), 400, "array"),
        ("unknown method", "pool", "explain", j({"image": good_png, "method": "gradcam++"}), 400, "method"),
        ("method not a string", "pool", "explain", j({"image": good_png, "method": 3}), 400, "method"),
        ("target out of range", "pool", "explain", j({"image": good_png, "target": 4}), 400, "target"),
        ("target negative", "pool", "explain", j({"image": good_png, "target": [0, -1]}), 400, "target"),
        ("target not an int", "pool", "explain", j({"image": good_png, "target": "cat"}), 400, "target"),
        ("overlay not a bool", "pool", "explain", j({"image": good_png, "overlay": "yes"}), 400, "overlay"),
        ("option on /predict", "pool", "predict", j({"image": good_png, "target": 1}), 400, "target"),
        ("text to an image model", "pool", "explain", j({"text": "a red square"}), 400, "text"),
        ("token id outside the vocabulary", "txt", "explain", j({"array": [2, 3, 999]}), 400, "array"),
        ("text longer than the positions", "txt", "explain", j({"text": " ".join(["cat"] * 40)}), 400, "text"),
        ("empty text", "txt", "explain", j({"text": "   "}), 400, "text"),
        ("overlay for a text model", "txt", "explain", j({"text": "the cat", "overlay": True}), 400, "overlay"),
        ("image to a text model", "txt", "explain", j({"image": good_png}), 400, "image"),
        ("unknown route", "pool", "explains", j({"image": good_png}), 404, "path"),
    ]


def test_malformed_requests_are_4xx_naming_the_field_and_good_ones_stay_correct(served, image_explainers, tmp_path):
    big_body = json.dumps({"image": "A" * 1_200_000}).encode()  # over the pool app's 1 MB limit
    kinds = _bad_kinds(big_body)
    assert len(kinds) >= 20
    good_images = [png(64, 64, 10 + k) for k in range(3)]
    references = [expected(image_explainers["generic"], image_input(raw, tmp_path), None)[0] for raw in good_images]
    rounds = max(1, 200 // len(kinds) + 1)
    work = []  # bad requests interleaved with good ones
    for r in range(rounds):
        for k, kind in enumerate(kinds):
            work.append(("bad", kind))
            if k % 4 == 0:
                work.append(("good", (r + k) % len(good_images)))
    bad_count = sum(1 for what, _ in work if what == "bad")
    assert bad_count >= 200

    def send(item):
        what, spec = item
        if what == "good":
            return call(f"{served}/pool/explain", {"image": b64(good_images[spec])})
        _, app, route, body, _, _ = spec
        return call(f"{served}/{app}/{route}", body)

    replicas = _replica_actors("pool")
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(send, work))
    for (what, spec), (status, payload) in zip(work, answers):
        if what == "good":
            assert status == 200, payload
            assert_map_close(payload["relevance"], references[spec], "a good request among bad ones")
            continue
        name, _, _, _, expected_status, field = spec
        assert status == expected_status, (name, status, payload)
        assert payload.get("field") == field, (name, payload)
        assert f"'{field}'" in payload["error"] and "\n" not in payload["error"], (name, payload)
    # the server still answers, from the same replicas (none restarted)
    status, health = call(f"{served}/pool/healthz", method="GET")
    assert status == 200 and health["status"] == "ok"
    assert _replica_actors("pool") == replicas and any(health["replica"] in name for name in replicas)
    status, payload = call(f"{served}/pool/explain", method="GET")
    assert status == 405 and payload["field"] == "http method"


def test_a_request_that_breaks_the_model_fails_alone(served, text_folder):
    tokenizer = transformers.AutoTokenizer.from_pretrained(text_folder)
    explainer = relfast.Explainer(transformers.BertForSequenceClassification.from_pretrained(text_folder).eval())
    texts = ["the cat sat", "a dog ran to the park", "the poison ball", "red tree", "big ball under the mat", "a"]
    answers = together([(f"{served}/poison/explain", {"text": text}) for text in texts])
    for text, (status, payload) in zip(texts, answers):
        assert payload["batch"] == len(texts), "the poisoned request did not share the others' batch"
        if POISON in text:
            assert status == 500, payload
            assert "broke the model" in payload["error"]
            continue
        assert status == 200, payload
        inputs = dict(tokenizer([text], return_tensors="pt"))
        assert_map_close(payload["relevance"], expected(explainer, inputs, None)[0], text)
    answers = together([(f"{served}/poison/explain", {"text": text}) for text in ["the cat"] * BATCH])
    assert all(status == 200 for status, _ in answers), answers  # the replica goes on serving


# ---- a replica killed under load ----

def _replica_actors(app):
    return sorted(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                  if actor["name"].startswith(f"SERVE_REPLICA::{app}#"))


def _running_replicas(app):
    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values()
               if d.status.value == "HEALTHY")


def test_a_killed_replica_loses_only_its_requests_and_the_app_recovers(served, image_explainers, tmp_path):
    images = [png(64, 64, 20 + k) for k in range(4)]
    references = [expected(image_explainers["generic"], image_input(raw, tmp_path), None)[0] for raw in images]
    replicas = _replica_actors("pool")
    assert len(replicas) == 2, replicas
    workers, total = 6, 60
    done = threading.Semaphore(0)

    def send(k):
        answer = call(f"{served}/pool/explain", {"image": b64(images[k % len(images)])})
        done.release()
        return answer

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(send, k) for k in range(total)]
        for _ in range(12):  # under load: a dozen answered, more in flight
            done.acquire()
        ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
        answers = [future.result() for future in futures]
    failed = [(status, payload) for status, payload in answers if status != 200]
    for k, (status, payload) in enumerate(answers):
        if status == 200:
            assert_map_close(payload["relevance"], references[k % len(images)], f"request {k}")
    assert all(500 <= status < 600 for status, _ in failed), failed
    assert len(failed) <= workers, f"{len(failed)} requests failed; at most the {workers} in flight may"
    # Serve notices the death at its next health check, then starts a replacement
    deadline = time.monotonic() + 150

    def recovered():
        after = _replica_actors("pool")
        return replicas[0] not in after and len(after) == 2 and _running_replicas("pool") == 2

    while time.monotonic() < deadline and not recovered():
        time.sleep(0.5)
    assert recovered(), (replicas, _replica_actors("pool"), serve.status().applications["pool"])
    answers = together([(f"{served}/pool/explain", {"image": b64(images[k % 4])}) for k in range(8)])
    for k, (status, payload) in enumerate(answers):
        assert status == 200, payload
        assert_map_close(payload["relevance"], references[k % 4], f"after recovery {k}")


# ---- the command ----

def _args(*argv):
    import argparse

    parser = argparse.ArgumentParser(prog="relfast serve")
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "0"], "--replicas must be an integer >= 1"),
    (["--max-batch", "0"], "--max-batch must be an integer >= 1"),
    (["--batch-wait-ms", "-1"], "--batch-wait-ms must be a number >= 0"),
    (["--method", "gradcam"], "--method must be one of"),
    (["--port", "70000"], "--port must be at most 65535"),
    (["/no/such/model"], "model /no/such/model does not exist"),
])
def test_command_refuses_bad_flags_before_starting_ray(argv, message, capsys):
    with pytest.raises(cli.CliError) as exit_info:  # a SystemExit(2) whose line relfast.cli.main prints
        command.run(_args(*argv))
    assert exit_info.value.code == 2
    assert message in exit_info.value.message
    # the same through the command line's own entry point (relfast serve ...)
    code, _, stderr = cli_in_process(capsys, "serve", *argv)
    assert code == 2 and message in stderr


def test_command_serves_until_stopped(served):
    stop = threading.Event()
    args = _args("--route-prefix", "/cli", "--name", "cli", "--max-batch", "2")
    thread = threading.Thread(target=command.run, args=(args, stop), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline and status != 200:
            time.sleep(0.5)
            try:
                status, health = call(f"{served}/cli/healthz", method="GET", timeout=5)
            except (urllib.error.URLError, OSError):
                status = None
        assert status == 200 and health["kind"] == "image"
        status, payload = call(f"{served}/cli/predict", {"image": b64(png(64, 64, 30))})
        assert status == 200 and payload["label"] in relfast.data.CLASSES
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert "cli" not in serve.status().applications


def test_command_reports_a_model_its_replicas_cannot_load(served, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(cli.CliError) as exit_info:
        command.run(_args(str(garbage), "--route-prefix", "/garbage", "--name", "garbage"))
    assert exit_info.value.code == 2
    error = exit_info.value.message
    assert "the model could not be served" in error and "is not a checkpoint" in error, error
    assert "garbage" not in serve.status().applications


@pytest.mark.parametrize("options, message", [
    (dict(max_batch=0), "argument 'max_batch' must be an int >= 1"),
    (dict(threads=1.5), "argument 'threads' must be an int >= 1"),
    (dict(batch_wait_ms=-1), "argument 'batch_wait_ms' must be a number >= 0"),
    (dict(model="/no/such/model"), "argument 'model': /no/such/model does not exist"),
])
def test_app_refuses_bad_arguments(options, message):
    with pytest.raises(ValueError, match=message):
        relfast.serve.app(**options)


# ---- exported files, answered in process (the backend without Ray) ----

def test_exported_files_answer_as_the_eager_explainer(default_files, image_explainers, tmp_path):
    raw = png(40, 40, 40)
    array = np.random.default_rng(41).normal(size=(3, 64, 64)).astype(np.float32)
    for path in (default_files["onnx"], default_files["script"]):
        served = backends.load(str(path))
        assert served.spec.methods == ("generic",) and not served.spec.multi_target
        requests = [protocol.parse("/explain", json.dumps(body).encode(), served.spec)
                    for body in ({"image": b64(raw), "target": 1}, {"array": array.tolist()})]
        answers = answer_batch(served, requests)
        sent = (image_input(raw, tmp_path), torch.from_numpy(array)[None])
        for (status, payload), inputs, target in zip(answers, sent, (1, None)):
            assert status == 200, payload
            relevance = expected(image_explainers["generic"], inputs, target)[0]
            error = np.abs(np.asarray(payload["relevance"]) - relevance).max() / np.abs(relevance).max()
            assert error <= 1e-4, (path.name, error)  # exported files: the export's own parity bound
        with pytest.raises(protocol.BadRequest, match="'method'"):
            protocol.parse("/explain", json.dumps({"image": b64(raw), "method": "rollout"}).encode(), served.spec)


def test_image_folder_is_prepared_by_its_own_image_processor(tmp_path):
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, num_labels=5)
    torch.manual_seed(2)
    model = transformers.ViTForImageClassification(config).eval()
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.2, 0.4, 0.6],
                                               image_std=[0.3, 0.2, 0.1])
    with_processor, without = tmp_path / "vit", tmp_path / "bare_vit"
    model.save_pretrained(with_processor)
    processor.save_pretrained(with_processor)
    model.save_pretrained(without)
    raw = png(50, 70, 50)
    served = backends.load(str(with_processor))
    request = protocol.parse("/explain", json.dumps({"image": b64(raw), "target": 3}).encode(), served.spec)
    (status, payload), = answer_batch(served, [request])
    assert status == 200, payload
    pixels = processor(images=np.array(Image.open(io.BytesIO(raw)).convert("RGB")), return_tensors="pt")["pixel_values"]
    relevance, target, _ = expected(relfast.Explainer(model), pixels, 3)
    assert target == 3
    assert_map_close(payload["relevance"], relevance, "HF image folder")
    bare = backends.load(str(without))  # no processor saved: pixels as 'array' only
    with pytest.raises(protocol.BadRequest, match="field 'image'.*no image processor"):
        protocol.parse("/explain", json.dumps({"image": b64(raw)}).encode(), bare.spec)
