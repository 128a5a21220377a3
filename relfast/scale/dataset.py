"""``explain_dataset``: a Ray Data job whose actors each hold one explainer.

Input rows hold an id and one input column:
    "pixel_values"  (C, H, W) floats, as the model takes them (or as ``preprocess`` makes them so);
    "image"         (H, W, 3) or (H, W) uint8 pictures, prepared as ``relfast serve`` prepares an
                    uploaded image (the folder's image processor, or relfast's resize + normalisation);
    "input_ids"     token ids, (L,) per row (rows of different lengths are padded per batch), with an
                    optional "attention_mask" column beside them;
    "text"          strings, tokenised by the model folder's tokenizer (or ``tokenizer``).
and optionally a target column (a class, or K classes, per row; default: the prediction).

Output rows (OUTPUT_COLUMNS, plus the id and any ``keep_columns``):
    "relevance"  the explained row of R, float32: (N,) over the tokens ((K, N) for K targets;
                 text: the row's own tokens, without the padding a batch added); method ``lrp`` on
                 images: the pixel map (H, W);
    "image_map"  image models: the patch map (h, w) (the pixel map for ``lrp``); absent for text;
    "target"     the class(es) explained; "predicted" the model's class (a causal LM's next token).
"""
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

OUTPUT_COLUMNS = ("relevance", "image_map", "target", "predicted")
INPUT_COLUMNS = ("pixel_values", "image", "input_ids", "text")  # looked for in this order (argument 'column')
WHERE = "relfast.scale.explain_dataset"


def _require_ray() -> None:
    from ..serve import require_ray

    require_ray("data", "relfast.scale")


def _positive_int(name: str, value: Any, where: str = WHERE, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{where}: argument '{name}' must be an int >= {minimum}, got {value!r}")
    return int(value)


def _numpy(name: str, value: Any, where: str) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{where}: column '{name}' must be a numpy array or a tensor, got {type(value).__name__}")
    return value


def from_arrays(columns: Dict[str, Any], block_rows: int = 256):
    """A Ray Dataset of in-memory columns (numpy arrays or tensors of N rows each), in blocks of
    ``block_rows`` rows in order: ``explain_dataset(..., batch_size=block_rows)`` then explains
    the batches one process would (rows 0..block_rows-1, ...), so its maps equal that process's."""
    _require_ray()
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    where = "relfast.scale.from_arrays"
    if not isinstance(columns, dict) or not columns or not all(isinstance(k, str) for k in columns):
        raise ValueError(f"{where}: argument 'columns' must be a non-empty dict of column name -> array, got "
                         f"{type(columns).__name__}")
    block_rows = _positive_int("block_rows", block_rows, where)
    arrays = {name: _numpy(name, value, where) for name, value in columns.items()}
    counts = {name: (array.shape[0] if array.ndim else None) for name, array in arrays.items()}
    if len(set(counts.values())) != 1 or None in counts.values():
        raise ValueError(f"{where}: every column must hold the same number of rows (its first dimension), got {counts}")
    count = next(iter(counts.values()))
    if count == 0:
        raise ValueError(f"{where}: the columns hold no rows; there is nothing to explain")
    tables = []
    for start in range(0, count, block_rows):
        block = {}
        for name, array in arrays.items():
            part = np.ascontiguousarray(array[start:start + block_rows])
            block[name] = ArrowTensorArray.from_numpy(part) if part.ndim > 1 else pa.array(part)
        tables.append(pa.table(block))
    return ray.data.from_arrow(tables)


# ---- the actor ----

class ExplainWorker:
    """One actor of the pool: the model loaded once; a batch of rows in, a row of results per row
    out. Also run once in the driver on the first rows, so bad input fails before the pool starts."""

    def __init__(self, model: Any = None, method: Optional[str] = None, column: str = "pixel_values",
                 id_column: str = "id", target_column: Optional[str] = None, keep_columns: Sequence[str] = (),
                 preprocess: Optional[Callable] = None, threads: Optional[int] = None, tokenizer: Any = None,
                 image_processor: Any = None, cuda: bool = False):
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self.column, self.id_column, self.target_column = column, id_column, target_column
        self.keep_columns, self.preprocess = tuple(keep_columns), preprocess
        self.explainer, self.backend = _explainer(model, method, tokenizer, image_processor, cuda)
        if self.explainer is None:
            self.is_image = self.backend.spec.is_image
        else:
            self.is_image = bool(self.explainer.layout.is_vision)
        if column in ("image", "text") and self.backend is None:
            raise ValueError(f"{WHERE}: column '{column}' needs the model's {'image processor' if column == 'image' else 'tokenizer'}"
                             " (a model folder, or tokenizer= / image_processor= with a HuggingFace model); give "
                             f"{'pixel_values' if column == 'image' else 'input_ids'} instead")
        expected = "image" if self.is_image else "text"
        if (column in ("pixel_values", "image")) != self.is_image:
            raise ValueError(f"{WHERE}: argument 'column' is {column!r}, but the model takes {expected} inputs "
                             f"({'pixel_values or image' if self.is_image else 'input_ids or text'})")
        if self.backend is not None and self.backend.spec.kind not in ("image", "text", "causal_lm"):
            raise ValueError(f"{WHERE}: the model's kind {self.backend.spec.kind!r} is not explained here")

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        relevance, image_map, target, predicted = self.explain(batch)
        rows = {self.id_column: batch[self.id_column], "relevance": relevance, "target": target,
                "predicted": predicted}
        if image_map is not None:
            rows["image_map"] = image_map
        for name in self.keep_columns:
            rows[name] = batch[name]
        return rows

    # ---- one batch ----

    def explain(self, batch: Dict[str, np.ndarray]):
        """(relevance, image_map or None, target, predicted) as numpy, one entry per row."""
        if self.explainer is None:
            return self._explain_file(batch)
        import torch

        inputs, lengths = self.model_inputs(batch)
        targets = self._targets(batch)
        out = self.explainer(inputs, target=None if targets is None else torch.from_numpy(targets))
        return self._columns(out, lengths)

    def _targets(self, batch: Dict[str, np.ndarray]) -> Optional[np.ndarray]:
        if self.target_column is None:
            return None
        values = batch[self.target_column]
        if values.dtype == object:  # lists of K classes per row
            values = np.stack([np.asarray(v) for v in values])
        if values.dtype.kind not in "iu":
            raise ValueError(f"{WHERE}: column '{self.target_column}' must hold class indices (ints), got {values.dtype}")
        return values.astype(np.int64)

    def _token_rows(self, batch: Dict[str, np.ndarray]) -> Tuple[List[np.ndarray], Optional[np.ndarray]]:
        """Each row's token ids, and the batch's attention mask where the rows came padded with one."""
        from ..serve.protocol import BadRequest, Request

        values = batch[self.column]
        if self.column == "text":
            rows = []
            for text in values:
                if not isinstance(text, str):
                    raise ValueError(f"{WHERE}: column 'text' must hold strings, got {type(text).__name__}")
                try:
                    rows.append(self.backend._token_ids(Request("/explain", "text", text)))
                except BadRequest as error:
                    raise ValueError(f"{WHERE}: column 'text': {error.message}") from None
            return rows, None
        if values.dtype != object and values.ndim == 2:
            mask = batch.get("attention_mask")
            return list(values), None if mask is None else np.asarray(mask)
        return [np.asarray(row).reshape(-1) for row in values], None

    def _token_inputs(self, batch: Dict[str, np.ndarray]):
        """(input_ids, attention_mask) (B, L) int64, and each row's true length where relfast padded
        the rows (None where they came as a fixed (B, L) array: the relevance keeps that length)."""
        rows, mask = self._token_rows(batch)
        for row in rows:
            if row.dtype.kind not in "iu" or row.size == 0:
                raise ValueError(f"{WHERE}: column '{self.column}' must hold non-empty rows of token ids (ints), got "
                                 f"{row.dtype} of {row.size} ids")
        fixed = mask is not None or (self.column == "input_ids" and len({len(row) for row in rows}) == 1)
        if fixed:  # a (B, L) array as given: the relevance keeps its length
            ids = np.stack(rows).astype(np.int64)
            mask = np.ones_like(ids) if mask is None else mask.astype(np.int64)
            return ids, mask, None
        from ..serve.backend import pad_right

        return pad_right(rows)

    def _pixels(self, batch: Dict[str, np.ndarray]):
        import torch

        values = batch[self.column]
        if self.column == "image":
            from ..serve.protocol import BadRequest, Request

            pictures = []
            for picture in values:
                picture = np.asarray(picture)
                if picture.ndim == 2:
                    picture = np.repeat(picture[..., None], 3, axis=2)
                if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
                    raise ValueError(f"{WHERE}: column 'image' must hold (H, W, 3) or (H, W) uint8 pictures, got "
                                     f"{picture.dtype} {picture.shape}")
                try:
                    pictures.append(self.backend._pixels(Request("/explain", "image", picture)))
                except BadRequest as error:
                    raise ValueError(f"{WHERE}: column 'image': {error.message}") from None
            return torch.stack([torch.as_tensor(p) for p in pictures])
        if values.dtype == object:
            values = np.stack([np.asarray(v) for v in values])
        if values.ndim != 4 or values.dtype.kind != "f":
            raise ValueError(f"{WHERE}: column '{self.column}' must hold (C, H, W) float pixel arrays, got "
                             f"{values.dtype} rows of shape {values.shape[1:]}")
        pixels = torch.from_numpy(np.array(values, dtype=values.dtype))  # a copy: Ray hands read-only views
        return self.preprocess(pixels) if self.preprocess is not None else pixels

    def model_inputs(self, batch: Dict[str, np.ndarray]):
        """The batch as the explainer takes it, and the true lengths of rows relfast padded."""
        import torch

        parameter = next(self.explainer.model.parameters())  # where and in what dtype the model runs
        if self.is_image:
            return self._pixels(batch).to(parameter.device, parameter.dtype), None
        ids, mask, lengths = self._token_inputs(batch)
        device = parameter.device
        inputs = {"input_ids": torch.from_numpy(ids).to(device), "attention_mask": torch.from_numpy(mask).to(device)}
        if "token_type_ids" in batch and lengths is None:  # a tokenizer's fixed-length columns, passed on as given
            inputs["token_type_ids"] = torch.from_numpy(np.asarray(batch["token_type_ids"]).astype(np.int64)).to(device)
        return inputs, lengths

    def _columns(self, out, lengths: Optional[List[int]]):
        """An Explanation as the output columns: (relevance, image_map or None, target, predicted)."""
        relevance = out.relevance.detach().float().cpu().numpy()
        if lengths is not None:  # the rows' own tokens, without the batch's padding
            relevance = _ragged([relevance[b, ..., :length] for b, length in enumerate(lengths)])
        image_map = out.image_map().detach().float().cpu().numpy() if self.is_image else None
        predicted = out.logits.detach().argmax(dim=-1).cpu().numpy() if out.logits.dim() == 2 else None
        explained = out.target.cpu().numpy() if out.target is not None else predicted
        if predicted is None:  # a headless model's (B, N, D) output: no class
            predicted = np.full(len(explained), -1, dtype=np.int64)
        return relevance, image_map, explained, predicted

    def _explain_file(self, batch: Dict[str, np.ndarray]):
        """An exported file, through relfast.serve's backend (its method; one target per row)."""
        from ..serve.protocol import Request

        targets = self._targets(batch)
        if targets is not None and targets.ndim != 1:
            raise ValueError(f"{WHERE}: an exported file explains one target per row; column "
                             f"'{self.target_column}' holds {targets.shape[1]}")
        if self.is_image:
            pixels = self._pixels(batch).numpy().astype(np.float32)
            values = list(pixels)
        else:
            ids, mask, lengths = self._token_inputs(batch)
            values = [ids[b, :int(mask[b].sum())] for b in range(len(ids))]
        method = self.backend.spec.default_method
        requests = [Request("/explain", "array", value, method=method,
                            target=None if targets is None else int(targets[b])) for b, value in enumerate(values)]
        try:
            answers = self.backend.run(requests)
        except ValueError as error:  # the file's own input checks
            raise ValueError(f"{WHERE}: {error}") from None
        relevance = [np.asarray(a["relevance"], dtype=np.float32) for a in answers]
        relevance = np.stack(relevance) if self.is_image else _ragged(relevance)
        image_map = np.stack([np.asarray(a["image_map"], dtype=np.float32) for a in answers]) if self.is_image else None
        explained = np.asarray([a["target"] for a in answers], dtype=np.int64)
        predicted = np.asarray([a["predicted"] for a in answers], dtype=np.int64)
        return relevance, image_map, explained, predicted


def _ragged(rows: List[np.ndarray]) -> np.ndarray:
    """Rows of different lengths as one object column (Ray stores it as a variable-shaped tensor)."""
    column = np.empty(len(rows), dtype=object)
    column[:] = rows
    return column


def _explainer(model: Any, method: Optional[str], tokenizer: Any, image_processor: Any, cuda: bool):
    """(torch explainer or None, serve backend or None) for what explain_dataset was given."""
    import torch

    from ..eval.references import _Reference
    from ..explain import Explainer, METHODS
    from ..serve.backend import ModelLoadError, TorchBackend, load

    if isinstance(model, (Explainer, _Reference)):
        if method is not None:
            raise ValueError(f"{WHERE}: argument 'method' goes with a model; a relfast.Explainer carries its own "
                             f"method ({getattr(model, 'method', type(model).__name__)})")
        return model, None
    if method is not None and (not isinstance(method, str) or method not in METHODS):
        raise ValueError(f"{WHERE}: argument 'method' must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(model, torch.nn.Module) and tokenizer is None and image_processor is None:
        if model.training:
            raise ValueError(f"{WHERE}: the model ({type(model).__name__}) is in training mode; call model.eval() "
                             "first")
        if cuda:
            model = model.to("cuda")
        return Explainer(model, method or "generic"), None
    try:
        backend = load(model, tokenizer=tokenizer, image_processor=image_processor)
    except ModelLoadError as error:
        raise ValueError(f"{WHERE}: argument 'model': {error}") from None
    if not isinstance(backend, TorchBackend):  # an exported file answers its own method
        if method is not None and method != backend.spec.default_method:
            raise ValueError(f"{WHERE}: argument 'method' is {method!r}, but {backend.name} was exported with "
                             f"{backend.spec.default_method!r} and explains with it only")
        return None, backend
    if cuda:
        backend = TorchBackend(backend.model.to("cuda"), tokenizer=backend.tokenizer,
                               image_processor=backend.image_processor, labels=backend.labels,
                               normalize=backend.normalize)
    from ..serve.protocol import BadRequest

    try:
        return backend.explainer(method or "generic"), backend
    except BadRequest as error:
        raise ValueError(f"{WHERE}: argument 'method': {error.message}") from None


# ---- the job ----

def _column_names(dataset) -> List[str]:
    schema = dataset.schema()
    if schema is None:
        raise ValueError(f"{WHERE}: argument 'dataset' has no columns (is it empty?)")
    return list(schema.names)


def _check_columns(names: Sequence[str], column: Optional[str], id_column: str, target_column: Optional[str],
                   keep_columns: Sequence[str]) -> str:
    """The input column (given, or the first of INPUT_COLUMNS present); every named column present."""
    if not isinstance(id_column, str) or id_column not in names:
        raise ValueError(f"{WHERE}: argument 'id_column' ({id_column!r}) names no column of the data set; its "
                         f"columns: {list(names)} (each row needs an id its map is written with)")
    if column is None:
        present = [name for name in INPUT_COLUMNS if name in names]
        if not present:
            raise ValueError(f"{WHERE}: the data set has none of the input columns {list(INPUT_COLUMNS)}; its "
                             f"columns: {list(names)} (or name yours with argument 'column')")
        column = present[0]
    elif column not in names:
        raise ValueError(f"{WHERE}: argument 'column' ({column!r}) names no column of the data set; its columns: "
                         f"{list(names)}")
    if column not in INPUT_COLUMNS:
        raise ValueError(f"{WHERE}: argument 'column' must be one of {list(INPUT_COLUMNS)} (what its values are), "
                         f"got {column!r}; rename the column")
    if target_column is not None and target_column not in names:
        raise ValueError(f"{WHERE}: argument 'target_column' ({target_column!r}) names no column of the data set; "
                         f"its columns: {list(names)}")
    if isinstance(keep_columns, str) or not all(isinstance(c, str) for c in keep_columns):
        raise ValueError(f"{WHERE}: argument 'keep_columns' must be a list of column names, got {keep_columns!r}")
    missing = [c for c in keep_columns if c not in names]
    clashing = [c for c in keep_columns if c in OUTPUT_COLUMNS or c == id_column]
    if missing or clashing:
        raise ValueError(f"{WHERE}: argument 'keep_columns': {missing or clashing} "
                         f"{'name no column of the data set' if missing else 'are written by relfast already'}")
    return column


def explain_dataset(dataset: Any, model: Any = None, *, method: Optional[str] = None, column: Optional[str] = None,
                    id_column: str = "id", target_column: Optional[str] = None, keep_columns: Sequence[str] = (),
                    preprocess: Optional[Callable] = None, output: Union[None, str, Path] = None,
                    concurrency: int = 1, batch_size: int = 32, num_cpus: float = 1, num_gpus: float = 0,
                    tokenizer: Any = None, image_processor: Any = None, worker: type = ExplainWorker,
                    worker_options: Optional[Dict[str, Any]] = None):
    """Explain every row of ``dataset`` with a pool of ``concurrency`` Ray actors.

    Args:
        dataset: a ``ray.data.Dataset`` (see the module's docstring for its columns), or a dict of
            in-memory columns (relfast.scale.from_arrays makes it one, in blocks of ``batch_size``).
        model: None (the embedded default model), a checkpoint, a HuggingFace folder, an exported
            ``.onnx`` / ``.pt`` file, a loaded ``torch.nn.Module`` in eval mode, or a
            ``relfast.Explainer`` (which carries its method). Each actor gets its own copy.
        method: the method (default "generic"; an exported file explains with its own).
        column: the input column (default: the first of "pixel_values", "image", "input_ids", "text").
        id_column: the column of row ids, written with each map. target_column: the class(es)
            to explain per row (default: the prediction). keep_columns: more input columns to
            pass through to the output.
        preprocess: a function (B, C, H, W) -> (B, C, H, W) applied to "pixel_values" in the actor
            (e.g. the model's normalisation of [0, 1] images); it must pickle.
        output: a folder to write the maps to as Parquet (it must be empty or absent); None
            returns the lazy Dataset of output rows instead (nothing runs until it is consumed).
        concurrency: actors in the pool. batch_size: rows per explainer call.
        num_cpus, num_gpus: Ray resources per actor (torch threads: ``num_cpus``, at least 1; with
            ``num_gpus`` > 0 a model loaded here runs on CUDA).
        worker, worker_options: the actor class and its extra arguments (relfast.scale.evaluate
            adds the evaluation's scoring to ExplainWorker).

    Returns:
        the output folder (every input row written once; checked), or the lazy output Dataset.

    Bad arguments, columns the data set lacks, a model that cannot load and a first batch the
    model refuses raise ValueError before the pool starts: one actor's worth of work is done here
    on the first rows. Ray retries the batches of an actor that dies (Ray Data's actor pools
    restart actors and retry their tasks); a batch the model refuses fails the job.
    """
    _require_ray()
    import ray
    import ray.data

    concurrency = _positive_int("concurrency", concurrency)
    batch_size = _positive_int("batch_size", batch_size)
    for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
            raise ValueError(f"{WHERE}: argument '{name}' must be a number >= 0, got {value!r}")
    if preprocess is not None and not callable(preprocess):
        raise ValueError(f"{WHERE}: argument 'preprocess' must be a function of a (B, C, H, W) tensor, got "
                         f"{type(preprocess).__name__}")
    if output is not None:
        output = Path(output)
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise ValueError(f"{WHERE}: argument 'output' ({output}) must be an empty or absent folder (the maps are "
                             "written there and counted)")
    if isinstance(dataset, dict):
        dataset = from_arrays(dataset, block_rows=batch_size)
    if not isinstance(dataset, ray.data.Dataset):
        raise ValueError(f"{WHERE}: argument 'dataset' must be a ray.data.Dataset or a dict of columns, got "
                         f"{type(dataset).__name__}")
    column = _check_columns(_column_names(dataset), column, id_column, target_column, tuple(keep_columns))
    if preprocess is not None and column != "pixel_values":
        raise ValueError(f"{WHERE}: argument 'preprocess' applies to column 'pixel_values', not {column!r}")
    options = dict(model=model, method=method, column=column, id_column=id_column, target_column=target_column,
                   keep_columns=tuple(keep_columns), preprocess=preprocess, tokenizer=tokenizer,
                   image_processor=image_processor, **(worker_options or {}))
    # here first: a model that cannot load, a method it refuses, inputs it cannot take fail now, with
    # their own message, rather than inside the pool
    first = dataset.take_batch(min(batch_size, 2), batch_format="numpy")
    worker(**options)(first)
    threads = max(1, int(num_cpus))
    mapped = dataset.map_batches(worker, fn_constructor_kwargs=dict(options, threads=threads, cuda=num_gpus > 0),
                                 batch_size=batch_size, batch_format="numpy",
                                 compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=num_cpus,
                                 num_gpus=num_gpus or None)
    if output is None:
        return mapped
    mapped.write_parquet(str(output))
    _check_written(output, id_column, dataset.count())
    return output


def _check_written(output: Path, id_column: str, expected: int) -> None:
    """Every input row written exactly once: as many rows as went in, no id twice."""
    import pyarrow.parquet as pq

    ids = pq.read_table(str(output), columns=[id_column]).column(id_column).to_numpy()
    unique = np.unique(ids)
    if len(ids) != expected or len(unique) != len(ids):
        raise RuntimeError(f"{WHERE}: {output} holds {len(ids)} rows with {len(unique)} distinct ids for {expected} "
                           "input rows; the job did not write each row once")
