"""relfast.scale on Ray Data: explain_dataset's maps equal relfast.Explainer in one process, every
row comes back once (also when an actor is killed mid-run), `relfast eval --ray` prints the
single-process table, and bad arguments fail before the actor pool starts.

One local Ray instance for the module (2 CPUs, no dashboard); skipped where ray is not installed.
"""
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from testing import cli_in_process

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'relfast[serve]'); the Ray Data tests need "
                          "a local Ray instance")
pytest.importorskip("ray.data", reason="ray[data] is not installed (pip install 'relfast[serve]')")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (a dependency of ray[data]) is not installed")

import relfast  # noqa: E402
import relfast.scale as scale  # noqa: E402
from relfast.data import load_digits, make_shapes, normalize  # noqa: E402
from relfast.eval import table  # noqa: E402
from relfast.scale.evaluate import evaluate as evaluate_on_ray  # noqa: E402

DIGITS_ROWS = 2000  # scikit-learn has 1,797 digits: the held-out 500 and the training 1,297, then again from the start


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """A fresh local Ray instance (never a cluster RAY_ADDRESS points to), quiet."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def digits():
    """2,000 digit images in [0, 1] (1, 8, 8), labels, ids 0..1999 and the shipped digits model."""
    held_out, held_out_labels = load_digits("held_out")
    train, train_labels = load_digits("train")
    images = torch.cat([held_out, train])
    labels = torch.cat([held_out_labels, train_labels])
    repeat = torch.arange(DIGITS_ROWS) % len(labels)
    return images[repeat], labels[repeat], relfast.models.digits_model()


def read_rows(folder: Path):
    """The written rows sorted by id: {column: numpy array}."""
    frame = pq.read_table(str(folder)).to_pandas().sort_values("id")
    return {name: (np.stack(frame[name].to_numpy()) if frame[name].dtype == object else frame[name].to_numpy())
            for name in frame.columns}


def single_process(model, images: torch.Tensor, batch: int, method: str = "generic"):
    """The maps, targets and predictions of relfast.Explainer in this process, ``batch`` images a call."""
    explainer = relfast.Explainer(model, method)
    maps, targets, relevance = [], [], []
    for start in range(0, len(images), batch):
        out = explainer(normalize(images[start:start + batch]))
        maps.append(out.image_map())
        relevance.append(out.relevance)
        targets.append(out.target)
    return torch.cat(maps).numpy(), torch.cat(relevance).numpy(), torch.cat(targets).numpy()


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


# ---- 2,000 digits: the maps of one process ----

def test_2000_digits_equal_the_single_process_maps(digits, tmp_path):
    images, labels, model = digits
    columns = {"id": np.arange(DIGITS_ROWS) + 10_000, "pixel_values": images.numpy(), "label": labels.numpy()}
    written = scale.explain_dataset(columns, model, preprocess=normalize, output=tmp_path / "maps", concurrency=2,
                                    batch_size=64, keep_columns=["label"])
    rows = read_rows(written)
    assert rows["id"].tolist() == list(range(10_000, 10_000 + DIGITS_ROWS))  # every row once
    maps, relevance, targets = single_process(model, images, 64)
    # the same batches as the single process (blocks of batch_size rows): the same numbers, bit for bit
    assert rows["image_map"].shape == (DIGITS_ROWS, 4, 4)
    np.testing.assert_array_equal(rows["image_map"], maps)
    np.testing.assert_array_equal(rows["relevance"], relevance)
    np.testing.assert_array_equal(rows["target"], targets)
    np.testing.assert_array_equal(rows["predicted"], targets)  # no target column: the prediction is explained
    np.testing.assert_array_equal(rows["label"], labels.numpy())  # kept columns pass through


def test_any_blocking_and_a_target_column_give_the_per_sample_maps(digits):
    """A Ray data set cut its own way (blocks that are not the batches), a target per row: each
    map is the sample's own map (batched explanations equal per-sample ones)."""
    images, labels, model = digits
    count = 300
    targets = (labels[:count] + 3) % 10
    dataset = ray.data.from_items([{"id": i, "pixel_values": images[i].numpy(), "wanted": int(targets[i])}
                                   for i in range(count)], override_num_blocks=7)
    lazy = scale.explain_dataset(dataset, model, method="rollout", preprocess=normalize, target_column="wanted",
                                 concurrency=2, batch_size=48)
    assert isinstance(lazy, ray.data.Dataset)
    got = {int(row["id"]): row for row in lazy.take_all()}
    assert sorted(got) == list(range(count))
    explainer = relfast.Explainer(model, "rollout")
    for i in range(0, count, 37):
        out = explainer(normalize(images[i:i + 1]), target=targets[i:i + 1])
        assert int(got[i]["target"]) == int(targets[i])
        assert relative_error(np.asarray(got[i]["image_map"]), out.image_map()[0].numpy()) <= 1e-5


# ---- an actor killed mid-run ----

def _actor_pids(worker_class: str):
    """The processes of explain_dataset's actors (Ray titles them ray::MapWorker(MapBatches(<class>)))."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if f"MapBatches({worker_class})" in command and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


def test_an_actor_killed_mid_run_loses_no_row_and_duplicates_none(tmp_path):
    count = 2000
    images, _, _ = make_shapes(count, seed=7)
    model = relfast.models.default_model()
    output = tmp_path / "maps"
    finished, failure = threading.Event(), []

    def job():
        try:
            scale.explain_dataset({"id": np.arange(count), "pixel_values": images.numpy()}, model,
                                  method="transformer_attribution", preprocess=normalize, output=output,
                                  concurrency=2, batch_size=8)
        except BaseException as error:  # reported by the test, not lost in the thread
            failure.append(error)
        finally:
            finished.set()

    thread = threading.Thread(target=job)
    thread.start()
    # kill one actor once the job has written some maps (the actors are at work), not at the start
    deadline, killed = time.monotonic() + 240, None
    while time.monotonic() < deadline and not finished.is_set():
        written = list(output.glob("*.parquet")) if output.exists() else []
        pids = _actor_pids("ExplainWorker")
        if written and pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.05)
    still_running = not finished.is_set()
    thread.join(timeout=600)
    assert not failure, failure
    assert killed is not None and still_running, "the job ended before an actor could be killed; nothing was tested"
    rows = read_rows(output)
    assert rows["id"].tolist() == list(range(count))  # complete, and no row twice
    explainer = relfast.Explainer(model, "transformer_attribution")
    for start in (0, 992, 1992):  # spot checks: the retried rows are right too (each batch of 8 alone)
        expected = explainer(normalize(images[start:start + 8])).image_map().numpy()
        assert relative_error(rows["image_map"][start:start + 8], expected) <= 1e-5


# ---- eval --ray ----

def test_eval_ray_prints_the_single_process_table(capsys, tmp_path):
    args = ["eval", "--data", "shapes", "--samples", "80", "--methods", "lrp", "random", "--rules", "textbook", "--quiet"]
    code, single, err = cli_in_process(capsys, *args, "--out", str(tmp_path / "one"))
    assert code == 0, err
    code, on_ray, err = cli_in_process(capsys, *args, "--ray", "--workers", "2", "--out", str(tmp_path / "ray"))
    assert code == 0, err
    assert on_ray == single and "lrp" in single and "random" in single
    assert (tmp_path / "ray" / "results.csv").read_text() == (tmp_path / "one" / "results.csv").read_text()
    assert ray.is_initialized()  # a running Ray instance is used, and left running


def test_eval_on_ray_equals_the_table_for_text_and_digits():
    """The sentiment suite (rationale AP, token deletion) and the digits (perturbation only): every
    number of each row equal, not only the rounded table."""
    for name, methods, samples, tests in (("sentiment", ["generic", "random"], 40, table.TESTS),
                                          ("digits", ["attnlrp"], 100, ("perturbation",))):
        suite = table.SUITES[name](None, samples=samples)
        single = table.evaluate(suite, methods, tests, batch_size=32, progress=False)
        rows = evaluate_on_ray(suite, methods, tests, batch_size=32, concurrency=2)
        for expected, got in zip(single, rows):
            assert got.method == expected.method
            np.testing.assert_array_equal(got.positive.accuracy, expected.positive.accuracy)
            np.testing.assert_array_equal(got.negative.accuracy, expected.negative.accuracy)
            assert got.rationale_ap == expected.rationale_ap
            assert got.values() == expected.values()


def test_eval_ray_flags_are_checked_before_any_work(capsys, tmp_path):
    code, _, err = cli_in_process(capsys, "eval", "--workers", "2", "--out", str(tmp_path))
    assert code == 2 and "--workers" in err and "--ray" in err
    code, _, err = cli_in_process(capsys, "eval", "--ray", "--workers", "0", "--out", str(tmp_path))
    assert code == 2 and "--workers must be >= 1" in err


# ---- text and exported files ----

def test_text_rows_of_different_lengths_equal_each_row_alone(causal_lm_folder):
    texts = ["the cat sat on a mat", "dog ran", "a big red ball under the tree and the park", "the dog"]
    dataset = ray.data.from_items([{"id": i, "text": text} for i, text in enumerate(texts)])
    rows = {int(r["id"]): r for r in scale.explain_dataset(dataset, str(causal_lm_folder), batch_size=3).take_all()}
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(causal_lm_folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(causal_lm_folder).eval()
    explainer = relfast.Explainer(model)
    for i, text in enumerate(texts):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        out = explainer({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        relevance = np.asarray(rows[i]["relevance"])
        assert relevance.shape == (ids.shape[1],)  # the row's own tokens, without the batch's padding
        assert relative_error(relevance, out.relevance[0].numpy()) <= 1e-5
        assert int(rows[i]["target"]) == int(out.target[0]) == int(rows[i]["predicted"])
        assert "image_map" not in rows[i]


def test_exported_files_explain_as_their_runtimes(default_files):
    import relfast.ops  # noqa: F401  (the relfast:: ops the TorchScript file calls)
    from relfast.runtime import OnnxExplainer

    images, _, _ = make_shapes(40, seed=3)
    pixels = normalize(images).numpy()
    onnx = OnnxExplainer(default_files["onnx"]).run({"pixel_values": pixels})
    with torch.no_grad():
        _, script_relevance, script_target = torch.jit.load(str(default_files["script"]))(torch.from_numpy(pixels))
    expected = {"onnx": (onnx["relevance"], onnx["explained_target"]),
                "script": (script_relevance.numpy(), script_target.numpy())}
    for kind, (relevance, targets) in expected.items():
        rows = scale.explain_dataset({"id": np.arange(40), "pixel_values": pixels}, str(default_files[kind]),
                                     batch_size=16).take_all()
        rows = sorted(rows, key=lambda row: int(row["id"]))
        got = np.stack([row["relevance"] for row in rows])
        assert relative_error(got, relevance) <= 1e-5, kind
        assert [int(row["target"]) for row in rows] == targets.tolist(), kind
        assert np.stack([row["image_map"] for row in rows]).shape == (40, 8, 8)


# ---- bad arguments: a clear error before the pool starts ----

def test_bad_arguments_fail_before_any_work(digits, tmp_path):
    images, _, model = digits
    good = {"id": np.arange(8), "pixel_values": images[:8].numpy()}
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "old.parquet").write_text("x")
    cases = [
        (dict(dataset={"pixel_values": images[:8].numpy()}), "'id_column'"),
        (dict(dataset={"id": np.arange(8), "pixels": images[:8].numpy()}), "none of the input columns"),
        (dict(column="image_data"), "argument 'column'"),
        (dict(column="input_ids"), "argument 'column'"),  # no such column
        (dict(method="gradcam"), "argument 'method'"),
        (dict(model=str(tmp_path / "nowhere")), "does not exist"),
        (dict(output=occupied), "argument 'output'"),
        (dict(concurrency=0), "argument 'concurrency'"),
        (dict(batch_size=1.5), "argument 'batch_size'"),
        (dict(num_gpus=-1), "argument 'num_gpus'"),
        (dict(target_column="label"), "argument 'target_column'"),
        (dict(keep_columns=["relevance"]), "argument 'keep_columns'"),
        (dict(dataset={"id": np.arange(8), "pixel_values": images[:8, :, :6].numpy()}), "pixel"),  # the model's check
        (dict(dataset={"id": np.arange(4), "pixel_values": np.full((4, 1, 8, 8), np.nan, np.float32)}), "NaN"),
        (dict(dataset=[1, 2, 3]), "argument 'dataset'"),
        (dict(dataset={"id": np.arange(3), "pixel_values": images[:8].numpy()}), "same number of rows"),
    ]
    for change, needle in cases:
        arguments = dict(dataset=good, model=model, preprocess=normalize, batch_size=4)
        arguments.update(change)
        with pytest.raises(ValueError) as caught:
            scale.explain_dataset(arguments.pop("dataset"), arguments.pop("model"), **arguments)
        assert type(caught.value) is ValueError, change  # raised here, not an actor's error passed on by Ray
        assert needle.lower() in str(caught.value).lower(), (change, str(caught.value))
    assert list(occupied.iterdir()) == [occupied / "old.parquet"]  # nothing written over


def test_a_written_folder_with_a_row_missing_or_twice_is_an_error(tmp_path):
    import pyarrow as pa

    from relfast.scale.dataset import _check_written

    for name, ids in (("complete", [0, 1, 2, 3]), ("twice", [0, 1, 1, 3]), ("missing", [0, 1, 3])):
        folder = tmp_path / name
        folder.mkdir()
        pq.write_table(pa.table({"id": ids[:2]}), folder / "a.parquet")
        pq.write_table(pa.table({"id": ids[2:]}), folder / "b.parquet")
        if name == "complete":
            _check_written(folder, "id", 4)
        else:
            with pytest.raises(RuntimeError, match="did not write each row once"):
                _check_written(folder, "id", 4)


def test_pictures_of_any_size_are_prepared_as_relfast_serve_prepares_an_upload():
    """Column "image": uint8 pictures of different sizes; each is resized and normalised as
    `relfast serve` / `relfast explain --image` do it, then explained by the embedded model."""
    generator = np.random.default_rng(4)
    sizes = [(64, 64), (80, 50), (30, 30), (120, 90), (64, 64)]
    pictures = [generator.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]
    dataset = ray.data.from_items([{"id": i, "image": picture} for i, picture in enumerate(pictures)])
    rows = {int(r["id"]): r for r in scale.explain_dataset(dataset, None, batch_size=3).take_all()}
    explainer = relfast.Explainer(relfast.models.default_model())
    for i, picture in enumerate(pictures):
        pixels = torch.from_numpy(picture).float().div(255).permute(2, 0, 1)[None]
        pixels = torch.nn.functional.interpolate(pixels, size=(64, 64), mode="bilinear", align_corners=False)
        expected = explainer(normalize(pixels)).image_map()[0].numpy()
        assert relative_error(np.asarray(rows[i]["image_map"]), expected) <= 1e-5, i


def test_token_id_rows_of_different_lengths_equal_each_row_alone(causal_lm_folder):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(causal_lm_folder).eval()
    generator = np.random.default_rng(5)
    rows_in = [generator.integers(2, model.config.vocab_size, size=n) for n in (5, 9, 2, 7)]
    dataset = ray.data.from_items([{"id": i, "input_ids": ids} for i, ids in enumerate(rows_in)])
    rows = {int(r["id"]): r for r in scale.explain_dataset(dataset, model, method="attnlrp", batch_size=4).take_all()}
    explainer = relfast.Explainer(model, "attnlrp")
    for i, ids in enumerate(rows_in):
        out = explainer({"input_ids": torch.from_numpy(ids)[None], "attention_mask": torch.ones(1, len(ids),
                                                                                              dtype=torch.long)})
        relevance = np.asarray(rows[i]["relevance"])
        assert relevance.shape == (len(ids),)
        assert relative_error(relevance, out.relevance[0].numpy()) <= 1e-5, i
