"""Pictures of explanations: image heatmap overlays (PNG) and text token heatmaps (HTML).

Works with any method's output: pass ``Explanation.image_map(upsample=True)`` maps (or any
(H, W) map) for images, and token strings with ``Explanation.relevance`` rows for text. Two-stream
models: :func:`save_text_and_image` (CLIP, VisualBERT, LXMERT; region maps through
:func:`regions_heatmap`) and :func:`save_detections` (DETR's boxes with their query maps).
"""
import html
import numbers
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["overlay", "save_overlay", "save_side_by_side", "side_by_side_figure", "is_relfast_figure", "text_html", "save_text_html", "regions_heatmap",
           "save_text_and_image", "save_detections", "generation_page", "save_generation_page"]

ArrayLike = Union[Tensor, np.ndarray]


def _numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)


def _finite(values: np.ndarray, where: str, name: str) -> np.ndarray:
    """``values`` if every entry is finite: a NaN or inf would be drawn as a plausible picture."""
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise ValueError(f"{where}: argument '{name}' holds {bad} NaN or infinite value(s); only finite maps can be "
                         "drawn (check the explanation that produced it)")
    return values


def _image_hwc(image: ArrayLike, where: str = "relfast.viz.overlay") -> np.ndarray:
    """(3, H, W) or (H, W, 3) or (H, W), any range -> (H, W, 3) float in [0, 1]."""
    img = _numpy(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    elif img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.transpose(img, (1, 2, 0))
    if img.ndim != 3 or img.shape[-1] not in (1, 3) or 0 in img.shape:
        raise ValueError(f"{where}: argument 'image' must be a non-empty (3, H, W), (H, W, 3) or (H, W) array, got "
                         f"shape {img.shape}")
    _finite(img, where, "image")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    low, high = img.min(), img.max()
    return (img - low) / (high - low) if high > low else np.zeros_like(img)


DEFAULT_CMAP = "inferno"  # perceptually ordered: the hottest area reads as hottest on any object colour


def _resized_map(heatmap: ArrayLike, shape, where: str = "relfast.viz.overlay", name: str = "heatmap") -> np.ndarray:
    heat = _numpy(heatmap)
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"{where}: argument '{name}' must be a non-empty 2-D map, got shape {heat.shape}")
    _finite(heat, where, name)
    if heat.shape != tuple(shape):
        resized = torch.nn.functional.interpolate(torch.from_numpy(heat)[None, None], size=tuple(shape),
                                                  mode="bilinear", align_corners=False)
        heat = resized[0, 0].numpy()
    return heat


def _check_style(alpha: float, cmap: str, where: str) -> None:
    """``alpha`` and ``cmap`` before any drawing (matplotlib would fail mid-figure or blend wrongly)."""
    from matplotlib import colormaps

    if isinstance(alpha, bool) or not (isinstance(alpha, numbers.Real) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"{where}: argument 'alpha' must be a number in [0, 1], got {alpha!r}")
    if not isinstance(cmap, str) or cmap not in colormaps:
        raise ValueError(f"{where}: argument 'cmap' must be the name of a matplotlib colormap (e.g. "
                         f"{DEFAULT_CMAP!r}), got {cmap!r}")


def _scores(scores: ArrayLike, tokens: Sequence[str], where: str) -> np.ndarray:
    values = _finite(_numpy(scores).reshape(-1), where, "scores")
    if len(tokens) != values.shape[0]:
        raise ValueError(f"{where}: {len(tokens)} tokens but {values.shape[0]} scores")
    return values


def _scaled(heat: np.ndarray, value_range: Optional[Sequence[float]]) -> np.ndarray:
    """``heat`` mapped to [0, 1] by ``value_range`` (low, high), or by its own min and max."""
    low, high = (heat.min(), heat.max()) if value_range is None else value_range
    return np.clip((heat - low) / (high - low), 0, 1) if high > low else np.zeros_like(heat)


def overlay(image: ArrayLike, heatmap: ArrayLike, alpha: float = 0.5, cmap: str = DEFAULT_CMAP,
            value_range: Optional[Sequence[float]] = None) -> np.ndarray:
    """The heatmap (resized to the image, scaled to [0, 1] by ``value_range`` or else by its own
    min and max) coloured with a matplotlib colormap and blended over the image: (H, W, 3) in [0, 1]."""
    where = "relfast.viz.overlay"
    _check_style(alpha, cmap, where)
    if value_range is not None:
        bounds = np.asarray(value_range, dtype=np.float64).reshape(-1)
        if bounds.shape != (2,) or not np.isfinite(bounds).all():
            raise ValueError(f"{where}: argument 'value_range' must be two finite numbers (low, high), got "
                             f"{value_range!r}")
    img = _image_hwc(image, where)
    return _blend(img, _resized_map(heatmap, img.shape[:2], where), alpha, cmap, value_range)


def _blend(img: np.ndarray, heat: np.ndarray, alpha: float, cmap: str,
           value_range: Optional[Sequence[float]] = None) -> np.ndarray:
    """:func:`overlay` on inputs already checked and resized."""
    from matplotlib import colormaps

    coloured = colormaps[cmap](_scaled(heat, value_range))[..., :3]
    return (1 - alpha) * img + alpha * coloured


def save_overlay(image: ArrayLike, heatmap: ArrayLike, path: Union[str, Path], alpha: float = 0.5,
                 cmap: str = DEFAULT_CMAP) -> Path:
    """Writes :func:`overlay` alone as a PNG of the image's size (for pipelines; for a person,
    :func:`save_side_by_side` adds the input, a title and a colour bar); returns the path."""
    import matplotlib.pyplot as plt

    where = "relfast.viz.save_overlay"
    _check_style(alpha, cmap, where)
    img = _image_hwc(image, where)
    blended = _blend(img, _resized_map(heatmap, img.shape[:2], where), alpha, cmap)
    path = Path(path)
    plt.imsave(path, np.clip(blended, 0, 1), metadata=_mark(path, "save_overlay"))
    return path


def save_side_by_side(image: ArrayLike, heatmaps: Sequence[ArrayLike], titles: Sequence[str], path: Union[str, Path],
                      alpha: float = 0.6, cmap: str = DEFAULT_CMAP, shared_scale: bool = False,
                      label: str = "relevance") -> Path:
    """The input image next to one heatmap panel per map (e.g. two classes, as in the papers'
    figures), each with a colour bar in the maps' own units (``label``), as one PNG.

    ``shared_scale``: False (default) gives each map its own colour scale (its min to its max), so
    each panel shows where that map is highest whatever its size: maps of different classes can
    differ by orders of magnitude and one scale would leave the smaller one blank. True puts all
    maps on one scale (their joint min and max) and one colour bar, to compare magnitudes.
    The heat is drawn over a grey copy of the input, opaque where the map is high and clear where
    it is low, so that red, orange or yellow objects are not read as heat. A map that is constant
    (e.g. all zero) is drawn flat and says so in its title. See :func:`side_by_side_figure`.
    """
    import matplotlib.pyplot as plt

    figure = side_by_side_figure(image, heatmaps, titles, alpha, cmap, shared_scale, label,
                                 where="relfast.viz.save_side_by_side")
    path = Path(path)
    _save(figure, path, "save_side_by_side")
    plt.close(figure)
    return path


# Written into every PNG relfast.viz saves: the CLI refuses these files as inputs to explain.
FIGURE_MARK = "relfast-figure"


def _mark(path: Path, what: str) -> Optional[dict]:
    """The PNG text chunk that marks our figures (other formats take no such metadata)."""
    return {"Software": f"{FIGURE_MARK} (relfast.viz.{what})"} if path.suffix.lower() == ".png" else None


def _save(figure, path: Path, what: str) -> None:
    figure.savefig(path, dpi=100, metadata=_mark(path, what))


def is_relfast_figure(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a PNG written by relfast.viz (a picture of an explanation, not an input)."""
    from PIL import Image

    try:
        with Image.open(path) as picture:
            return FIGURE_MARK in str(picture.info.get("Software", ""))
    except Exception:  # not an image PIL reads: not one of ours either
        return False


def _grey_under_heat(img: np.ndarray, scaled: np.ndarray, alpha: float, cmap: str) -> np.ndarray:
    """The heat (``scaled`` in [0, 1]) over a grey, dimmed copy of the image, its opacity rising
    with the heat (up to ``alpha``): the image's colours cannot pass for heat."""
    from matplotlib import colormaps

    grey = 0.15 + 0.6 * (img @ np.array([0.299, 0.587, 0.114]))[..., None]
    opacity = alpha * (0.25 + 0.75 * scaled)[..., None]
    return (1 - opacity) * grey + opacity * colormaps[cmap](scaled)[..., :3]


def side_by_side_figure(image: ArrayLike, heatmaps: Sequence[ArrayLike], titles: Sequence[str], alpha: float = 0.6,
                        cmap: str = DEFAULT_CMAP, shared_scale: bool = False, label: str = "relevance",
                        where: str = "relfast.viz.side_by_side_figure"):
    """:func:`save_side_by_side` as a matplotlib Figure (for notebooks); axes 0 is the input,
    axes 1..K the maps' panels."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    if len(heatmaps) != len(titles):
        raise ValueError(f"{where}: {len(heatmaps)} heatmaps but {len(titles)} titles")
    if not len(heatmaps):
        raise ValueError(f"{where}: argument 'heatmaps' is empty; give at least one map to draw beside the image")
    _check_style(alpha, cmap, where)
    img = _image_hwc(image, where)
    maps = [_resized_map(h, img.shape[:2], where, f"heatmaps[{k}]") for k, h in enumerate(heatmaps)]
    joint = (min(m.min() for m in maps), max(m.max() for m in maps)) if shared_scale else None
    panels = len(maps) + 1
    width = 2.8 * panels + (0.9 if shared_scale else 0.8 * len(maps))  # room for the colour bars
    figure = plt.figure(figsize=(width, 3.6), layout="constrained")
    axes = figure.subplots(1, panels)
    axes[0].imshow(img)
    axes[0].set_title("input", fontsize=10)
    for axis, heat, title in zip(axes[1:], maps, titles):
        low, high = joint if joint is not None else (heat.min(), heat.max())
        axis.imshow(np.clip(_grey_under_heat(img, _scaled(heat, (low, high)), alpha, cmap), 0, 1))
        flat = heat.max() == heat.min()
        axis.set_title(f"{title}\n(flat map: {heat.max():.3g} everywhere)" if flat else title, fontsize=10)
        if joint is None:
            bar = figure.colorbar(cm.ScalarMappable(colors.Normalize(low, high if high > low else low + 1), cmap),
                                  ax=axis, shrink=0.8, pad=0.02)
            bar.set_label(f"{label} (this map's own scale)", fontsize=8)
            bar.ax.tick_params(labelsize=7)
    for axis in axes:
        axis.axis("off")
    if joint is not None:
        low, high = joint
        bar = figure.colorbar(cm.ScalarMappable(colors.Normalize(low, high if high > low else low + 1), cmap),
                              ax=axes[1:], shrink=0.8, pad=0.02)
        bar.set_label(f"{label} (one scale for all maps)")
    return figure


def text_html(tokens: Sequence[str], scores: ArrayLike, title: Optional[str] = None) -> str:
    """A self-contained HTML fragment: each token on a background whose strength is its score
    (min-max normalised over the tokens; negative-free red scale), the score in a tooltip."""
    return _text_html(tokens, scores, title, "relfast.viz.text_html")


def _text_html(tokens: Sequence[str], scores: ArrayLike, title: Optional[str], where: str) -> str:
    values = _scores(scores, tokens, where)
    low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
    shares = (values - low) / (high - low) if high > low else np.zeros_like(values)
    spans: List[str] = []
    for token, value, share in zip(tokens, values, shares):
        spans.append(f'<span title="{value:.4g}" style="background: rgba(220, 30, 30, {share:.3f}); '
                     f'padding: 2px 3px; margin: 1px; border-radius: 3px">{html.escape(token)}</span>')
    heading = f"<h3>{html.escape(title)}</h3>" if title else ""
    return f'<div style="font-family: sans-serif; line-height: 2">{heading}{" ".join(spans)}</div>'


def save_text_html(rows: Sequence[tuple], path: Union[str, Path]) -> Path:
    """Writes one HTML page from rows of (tokens, scores[, title]); returns the path."""
    where = "relfast.viz.save_text_html"
    for k, row in enumerate(rows):
        if not isinstance(row, (tuple, list)) or len(row) not in (2, 3):
            raise ValueError(f"{where}: argument 'rows' must hold (tokens, scores[, title]) tuples; row {k} is "
                             f"{type(row).__name__}" + (f" of {len(row)} items" if isinstance(row, (tuple, list)) else ""))
    body = "\n".join(_text_html(*row[:2], row[2] if len(row) == 3 else None, f"{where} (row {k})")
                      for k, row in enumerate(rows))  # every row checked before the file is written
    path = Path(path)
    path.write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>relfast</title></head>'
                    f"<body>{body}</body></html>\n", encoding="utf-8")
    return path


def regions_heatmap(boxes: ArrayLike, scores: ArrayLike, size: Sequence[int]) -> np.ndarray:
    """Region relevance (VisualBERT, LXMERT) as an (H, W) map: each pixel holds the largest score
    of the boxes covering it (0 where none does).

    Args:
        boxes: (R, 4) as (x0, y0, x1, y1), in pixels or normalised to [0, 1] (all coordinates <= 1).
        scores: (R,) the regions' relevance (``Explanation.maps["image"][b]``).
        size: (H, W) of the image.
    """
    where = "relfast.viz.regions_heatmap"
    box_array, values = _numpy(boxes), _finite(_numpy(scores).reshape(-1), where, "scores")
    if box_array.ndim != 2 or box_array.shape[1] != 4 or box_array.shape[0] != values.shape[0]:
        raise ValueError(f"{where}: argument 'boxes' must be (R, 4) with one box per score ({values.shape[0]}), "
                         f"got {box_array.shape}")
    _finite(box_array, where, "boxes")
    if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
        raise ValueError(f"{where}: argument 'size' must be (H, W) with H, W >= 1, got {tuple(size)}")
    height, width = int(size[0]), int(size[1])
    if box_array.size and box_array.max() <= 1.0:
        box_array = box_array * np.array([width, height, width, height], dtype=np.float32)
    heat = np.zeros((height, width), dtype=np.float32)
    for (x0, y0, x1, y1), value in zip(box_array, values):
        top, bottom = int(np.floor(max(0, min(y0, y1)))), int(np.ceil(min(height, max(y0, y1))))
        left, right = int(np.floor(max(0, min(x0, x1)))), int(np.ceil(min(width, max(x0, x1))))
        heat[top:bottom, left:right] = np.maximum(heat[top:bottom, left:right], value)
    return heat


def _token_panel(axis, tokens: Sequence[str], scores: np.ndarray, title: str, per_line: int = 36) -> None:
    """Tokens in reading order on a white-to-red scale (min-max over the tokens), wrapped."""
    from matplotlib import colormaps

    low, high = (scores.min(), scores.max()) if scores.size else (0.0, 0.0)
    shares = (scores - low) / (high - low) if high > low else np.zeros_like(scores)
    reds = colormaps["Reds"]
    x, line = 0, 0
    for token, share in zip(tokens, shares):
        if x and x + len(token) > per_line:
            x, line = 0, line + 1
        axis.text(x / per_line, 1 - 0.12 * (line + 1), token, family="monospace", fontsize=10, va="center",
                  bbox=dict(facecolor=reds(0.1 + 0.8 * float(share)), edgecolor="none", pad=1.5))
        x += len(token) + 1
    axis.set_title(title, fontsize=10)
    axis.axis("off")


def save_text_and_image(image: ArrayLike, heatmap: ArrayLike, tokens: Sequence[str], scores: ArrayLike,
                        path: Union[str, Path], title: str = "", alpha: float = 0.5, cmap: str = DEFAULT_CMAP) -> Path:
    """One PNG for an image-text explanation (CLIP, VisualBERT, LXMERT): the input, its relevance
    overlay (``Explanation.image_map(upsample=True)[b]``, or :func:`regions_heatmap`) and the
    text's tokens shaded by their relevance (``Explanation.maps["text"][b]``, special tokens
    dropped by the caller)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    where = "relfast.viz.save_text_and_image"
    values = _scores(scores, tokens, where)
    _check_style(alpha, cmap, where)
    img = _image_hwc(image, where)
    heat = _resized_map(heatmap, img.shape[:2], where)
    figure = plt.figure(figsize=(10, 3.6), layout="constrained")
    axes = figure.subplots(1, 3, width_ratios=[1, 1, 1.6])
    axes[0].imshow(img)
    axes[0].set_title("input", fontsize=10)
    axes[1].imshow(np.clip(_blend(img, heat, alpha, cmap), 0, 1))
    axes[1].set_title("image relevance", fontsize=10)
    for axis in axes[:2]:
        axis.axis("off")
    _token_panel(axes[2], list(tokens), values, title or "text relevance")
    path = Path(path)
    _save(figure, path, "save_text_and_image")
    plt.close(figure)
    return path


def save_detections(image: ArrayLike, boxes: ArrayLike, heatmaps: Sequence[ArrayLike], titles: Sequence[str],
                    path: Union[str, Path], alpha: float = 0.5, cmap: str = DEFAULT_CMAP) -> Path:
    """DETR: the input with the explained queries' boxes, then one overlay per query with its box.

    Args:
        boxes: (K, 4) DETR's ``pred_boxes`` of the explained queries: (center x, center y, width,
            height) normalised to [0, 1].
        heatmaps: K maps (``Explanation.image_map(upsample=True)[b, k]``).
        titles: K labels (e.g. "query 7: dog 0.93").
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    where = "relfast.viz.save_detections"
    box_array = _numpy(boxes)
    if box_array.size % 4:
        raise ValueError(f"{where}: argument 'boxes' must be (K, 4), got shape {box_array.shape}")
    box_array = _finite(box_array.reshape(-1, 4), where, "boxes")
    if not len(box_array) == len(heatmaps) == len(titles):
        raise ValueError(f"{where}: {len(box_array)} boxes, {len(heatmaps)} heatmaps and {len(titles)} titles; "
                         "give one of each per query")
    _check_style(alpha, cmap, where)
    img = _image_hwc(image, where)
    height, width = img.shape[:2]
    maps = [_resized_map(h, (height, width), where, f"heatmaps[{k}]") for k, h in enumerate(heatmaps)]
    corners = [((cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height) for cx, cy, w, h in box_array]
    figure = plt.figure(figsize=(2.8 * (len(heatmaps) + 1) + 0.5, 3.4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(heatmaps) + 1))
    axes[0].imshow(img)
    axes[0].set_title("detections", fontsize=10)
    colours = plt.get_cmap("tab10")
    for k, (x, y, w, h) in enumerate(corners):
        axes[0].add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colours(k % 10), linewidth=2))
        axis = axes[k + 1]
        axis.imshow(np.clip(_blend(img, maps[k], alpha, cmap), 0, 1))
        axis.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colours(k % 10), linewidth=2))
        axis.set_title(titles[k], fontsize=10)
    for axis in axes:
        axis.axis("off")
    path = Path(path)
    _save(figure, path, "save_detections")
    plt.close(figure)
    return path


# ---- the page of a generated answer ----

_PAGE_TEMPLATE = Path(__file__).resolve().parent / "assets" / "generation_page.html"
PAGE_TOP_TOKENS = 3  # the tokens a selected answer token marks as its most relevant (class "hot")


def _picture_uri(image: ArrayLike, where: str) -> str:
    """A PNG data URI of an image ((H, W, 3) / (3, H, W), values in [0, 1] or [0, 255])."""
    import base64
    import io

    from PIL import Image

    img = _image_hwc(image, where)
    buffer = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _row_shares(values: np.ndarray) -> List[float]:
    """A row on its own scale: the largest |value| is ±1 (rounded, to keep the page small)."""
    scale = float(np.abs(values).max()) if values.size else 0.0
    return [round(float(v), 4) for v in (values / scale if scale > 0 else values)]


def generation_page(answer, sample: int = 0, image: Optional[ArrayLike] = None, hide_tokens: Sequence[int] = (),
                    title: Optional[str] = None) -> str:
    """A self-contained HTML page (no network) of one sample of a generated answer
    (:class:`relfast.explain.GenerationExplanation`, made with a tokenizer): the prompt and the
    answer as tokens; clicking (or hovering) a generated token colours the tokens before it by
    their relevance for it (its row of ``answer.relevance``, on its own scale), and for
    vision-language answers (``answer.image`` set) draws its patch map over ``image``.

    ``hide_tokens``: ids of prompt tokens not shown (special tokens, image placeholders); the
    generated tokens and the token the first one was predicted from are always shown. On each
    selection every token span carries ``data-score`` (its share in [-1, 1]) and the
    :data:`PAGE_TOP_TOKENS` most relevant ones the class ``hot``."""
    import json

    where = "relfast.viz.generation_page"
    strings = getattr(answer, "token_strings", None)
    if not hasattr(answer, "relevance") or not hasattr(answer, "prompt_length"):
        raise ValueError(f"{where}: argument 'answer' must be what relfast.Explainer(...).generate returns, got "
                         f"{type(answer).__name__}")
    if strings is None:
        raise ValueError(f"{where}: argument 'answer' has no token strings: make it with "
                         "Explainer(...).generate(..., tokenizer=tokenizer)")
    batch = answer.relevance.shape[0]
    if isinstance(sample, bool) or not isinstance(sample, numbers.Integral) or not 0 <= sample < batch:
        raise ValueError(f"{where}: argument 'sample' must be an int in [0, {batch}), got {sample!r}")
    image_maps = getattr(answer, "image", None)
    if image_maps is not None and image is None:
        raise ValueError(f"{where}: the answer has image maps; argument 'image' must be the picture they are drawn "
                         "over ((H, W, 3) or (3, H, W))")
    picture = _picture_uri(image, where) if image is not None else None
    prompt = answer.prompt_length
    ids = answer.sequences[sample].tolist()
    real = answer.attention_mask[sample].bool().tolist()
    generated = int(answer.token_mask[sample].sum())
    hidden = {int(i) for i in hide_tokens}
    positions = [i for i in range(prompt) if real[i] and (ids[i] not in hidden or i == prompt - 1)]
    positions += range(prompt, prompt + generated)
    relevance = _finite(_numpy(answer.relevance[sample]), where, "answer.relevance")
    rows, top = [], []
    for t in range(generated):
        source = prompt + t - 1  # the position whose next-token logit predicted token t
        before = [p for p in positions if p <= source]
        values = relevance[t, before].copy()
        values[-1] = 0.0  # the source's own entry: mostly R's identity, it would set the scale
        rows.append(_row_shares(values))
        order = [k for k in np.argsort(-values, kind="stable")[:PAGE_TOP_TOKENS] if values[k] > 0]
        top.append([int(k) for k in order])
    data = {"title": title or "what drove each generated token",
            "tokens": [strings[sample][p] for p in positions], "prompt_length": len(positions) - generated,
            "rows": rows, "top": top, "logits": [float(v) for v in _numpy(answer.logits[sample, :generated])],
            "image": picture, "grid": None, "image_rows": None}
    if image_maps is not None:
        maps = _finite(_numpy(image_maps[sample, :generated]), where, "answer.image")
        data["grid"] = list(maps.shape[1:])
        data["image_rows"] = [_row_shares(m.reshape(-1)) for m in maps]
    text = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")  # no '</script>' inside the script
    page = _PAGE_TEMPLATE.read_text(encoding="utf-8")
    return page.replace("__TITLE__", html.escape(data["title"])).replace("__DATA__", text)


def save_generation_page(answer, path: Union[str, Path], sample: int = 0, image: Optional[ArrayLike] = None,
                         hide_tokens: Sequence[int] = (), title: Optional[str] = None) -> Path:
    """Writes :func:`generation_page` to ``path``; returns the path."""
    page = generation_page(answer, sample, image, hide_tokens, title)
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
