"""Float64, one-sample-at-a-time reference implementations of the bi-modal / encoder-decoder relevance rules of
Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
Transformers" (ICCV 2021), for HuggingFace CLIP, VisualBERT, LXMERT and DETR. Independent of ``relfast``.

Every sample (or image-text pair) runs alone, batch 1, in float64 on an ``eager`` deep copy of the model so that the
attention probabilities A (1, H, Nq, Nk) are tensors in the autograd graph; ∇A = ``torch.autograd.grad(score, A)``.
CLIP's eager attention upcasts its softmax to float32; inside the references a float64 input keeps a float64 softmax
(the math the default ``sdpa`` does in float64). LXMERT does not return every map, so its softmax outputs are
recorded (``nn.functional.softmax`` is wrapped only while the reference runs).

Notation, per map with gradient G:  Ā = mean over heads of clamp(G ⊙ A, min=0)  -> (Nq, Nk).
normalize (rules 8-9):  R̂ = R - I,  s = R̂.sum(-1),  N(R) = R̂ / s + I, a row with s == 0 staying the identity row.
Options of every reference:
  aggregate=True           update R <- R + Δ (False: R <- Δ);
  normalize=True           N as above in rule 10 (False: N is the identity function);
  cross_self_attention=True  rule 10 as below (False: Δsq = Ā).
Self-attention on stream s (Ā: s×s), rules 6/7:  Δss = Ā R^ss,  Δsx = Ā R^sx for every cross map R^sx of s.
Co-attention, s attends to q (Ā: s×q), rule 10:  Δsq = N(R^ss)ᵀ Ā N(R^qq);  rule 11:  Δss = Ā R^qs.
All deltas of one layer are computed from the state before that layer, then applied.
"""
import contextlib
import copy

import torch
import torch.nn.functional as F


# ---- rules ----

def _abar(A, G):
    """(1, H, Nq, Nk) map and gradient -> Ā (Nq, Nk)."""
    return (G * A).detach().clamp(min=0).mean(dim=1)[0]


def _normalize(R):
    """Rules 8-9, row by row: R̂ = R - I, row / its sum, + I; a zero-sum row of R̂ gives the identity row."""
    eye = torch.eye(R.shape[0], dtype=R.dtype)
    hat = R - eye
    out = torch.zeros_like(R)
    for row in range(R.shape[0]):
        total = hat[row].sum()
        if total != 0:
            out[row] = hat[row] / total
    return out + eye


class _Relevance:
    """The relevance maps R^{xy} between streams, keyed by (x, y): R^{xx} = I (n_x × n_x), R^{xy} = 0 for the given
    cross pairs."""

    def __init__(self, sizes, cross=(), aggregate=True, normalize=True, cross_self_attention=True):
        self.R = {(s, s): torch.eye(n, dtype=torch.float64) for s, n in sizes.items()}
        self.R.update({(s, q): torch.zeros(sizes[s], sizes[q], dtype=torch.float64) for s, q in cross})
        self.aggregate, self.normalize, self.cross_self_attention = aggregate, normalize, cross_self_attention

    def _apply(self, deltas):
        for key, delta in deltas.items():
            self.R[key] = self.R[key] + delta if self.aggregate else delta

    def self_attention(self, s, abar):
        """Rules 6 and 7 on stream s."""
        self._apply({(x, y): abar @ R for (x, y), R in self.R.items() if x == s})

    def co_attention(self, *directions, rule11=True):
        """Rules 10 (and 11) for each direction (s, q, Ā of s attending to q), all from the old state."""
        N = _normalize if self.normalize else (lambda R: R)
        deltas = {}
        for s, q, abar in directions:
            if self.cross_self_attention:
                deltas[(s, q)] = N(self.R[(s, s)]).T @ abar @ N(self.R[(q, q)])
            else:
                deltas[(s, q)] = abar
            if rule11:
                deltas[(s, s)] = abar @ self.R[(q, s)]
        self._apply(deltas)


# ---- running one sample ----

def _eager_copy(model):
    model = copy.deepcopy(model).double().eval()
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        model.set_attn_implementation("eager")
    return model


def _f64(inputs):
    return {k: v.double() if torch.is_floating_point(v) else v for k, v in inputs.items()}


@contextlib.contextmanager
def _softmax(record=None):
    """Inside: a float64 softmax input keeps a float64 softmax (a ``dtype=`` upcast request is dropped) and, when
    ``record`` is a list, every softmax output is appended to it."""
    original = F.softmax

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        out = original(input, dim=dim, dtype=None if input.dtype == torch.float64 else dtype)
        if record is not None:
            record.append(out)
        return out

    F.softmax = softmax
    try:
        yield
    finally:
        F.softmax = original


def _grads(score, maps):
    """∇A for every map (zeros where the score does not depend on it)."""
    grads = torch.autograd.grad(score, maps, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(A) if g is None else g for A, g in zip(maps, grads)]


def _target(target, b, scores):
    if target is None:
        return int(scores.argmax())
    return int(target) if isinstance(target, int) else int(target[b])


def _text_length(mask):
    """Number of real tokens of a right-padded text (asserts the mask is 1...1 0...0)."""
    length = int(mask.sum())
    assert bool(mask[:length].all()) and not bool(mask[length:].any()), "expected right padding"
    return length


# ---- CLIP ----

def clip_pool_position(input_ids, eos_token_id):
    """The text position CLIPTextModel pools: argmax of the ids if eos_token_id == 2, else the first EOT."""
    if eos_token_id == 2:
        return int(input_ids.argmax())
    return int((input_ids == eos_token_id).int().argmax())


def _rollout(maps, grads, start_layer, **options):
    """Rule 6 on one stream over layers start_layer..last (negative counts from the end)."""
    state = _Relevance({"x": maps[0].shape[-1]}, **options)
    for layer in range(start_layer % len(maps), len(maps)):
        state.self_attention("x", _abar(maps[layer], grads[layer]))
    return state.R[("x", "x")]


def clip_reference(model, inputs, pairs, start_layer=-1, **options):
    """Per (image_index, text_index) pair, the model on that image and that (unpadded) text, score =
    ``logits_per_image[0, 0]``; R = I, R <- R + Ā R over the vision (and the text) layers from start_layer.

    Returns image maps (P, N_v) = R_vision[CLS] (CLS column included) and text maps (P, N_t) = R_text[EOT] restricted to
    columns 1..EOT-1 (zeros elsewhere, padded positions included), divided by their sum (a zero sum gives zeros).
    Only ``aggregate`` of the options matters here.
    """
    model = _eager_copy(model)
    inputs = _f64(inputs)
    eos = model.config.text_config.eos_token_id
    n_t = inputs["input_ids"].shape[1]
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    images, texts = [], []
    for i, t in pairs:
        length = _text_length(mask[t])
        ids = inputs["input_ids"][t:t + 1, :length]
        with _softmax():
            out = model(pixel_values=inputs["pixel_values"][i:i + 1], input_ids=ids,
                        attention_mask=torch.ones_like(ids), output_attentions=True)
        vision, text = list(out.vision_model_output.attentions), list(out.text_model_output.attentions)
        grads = _grads(out.logits_per_image[0, 0], vision + text)
        images.append(_rollout(vision, grads[:len(vision)], start_layer, **options)[0])
        eot = clip_pool_position(ids[0], eos)
        row = _rollout(text, grads[len(vision):], start_layer, **options)[eot]
        text_map = torch.zeros(n_t, dtype=torch.float64)
        text_map[1:eot] = row[1:eot]
        total = text_map.sum()
        texts.append(text_map / total if total != 0 else text_map)
    return torch.stack(images), torch.stack(texts)


# ---- VisualBERT ----

def visual_bert_reference(model, inputs, target=None, **options):
    """Per sample (batch 1, its own text padding mask kept), score = ``logits[0, c]`` (c = target[b] or argmax);
    one stream over [text (N_t); regions (N_v)]: R = I, R <- R + Ā R per layer. Row r = attention_mask.sum() - 2 (the
    token VisualBertForQuestionAnswering pools). Returns text (B, N_t) = R[r, :N_t] with entry r set to 0 and
    image (B, N_v) = R[r, N_t:].
    """
    model = _eager_copy(model)
    inputs = _f64(inputs)
    n_t = inputs["input_ids"].shape[1]
    texts, images = [], []
    for b in range(inputs["input_ids"].shape[0]):
        out = model(**{k: v[b:b + 1] for k, v in inputs.items()}, output_attentions=True)
        maps = list(out.attentions)
        c = _target(target, b, out.logits[0])
        R = _rollout(maps, _grads(out.logits[0, c], maps), 0, **options)
        r = int(inputs["attention_mask"][b].sum()) - 2
        text = R[r, :n_t].clone()
        text[r] = 0
        texts.append(text)
        images.append(R[r, n_t:])
    return torch.stack(texts), torch.stack(images)


# ---- LXMERT ----

def _lxmert_maps(model, sample):
    """Runs one sample, recording every attention softmax; returns (score vector, maps by name).

    Names: lang{l} / vis{l} for the language / vision (r) layers, and per cross layer x: x{x}.t2i (language queries
    over regions: the first call of the shared ``visual_attention``), x{x}.i2t (its second call, region queries over
    language), x{x}.lang, x{x}.vis (the cross layer's self-attentions)."""
    encoder = model.lxmert.encoder
    names = [f"lang{l}" for l in range(len(encoder.layer))] + [f"vis{l}" for l in range(len(encoder.r_layers))]
    for x in range(len(encoder.x_layers)):
        names += [f"x{x}.t2i", f"x{x}.i2t", f"x{x}.lang", f"x{x}.vis"]
    record = []
    with _softmax(record):
        out = model(**sample, output_attentions=True)
    assert len(record) == len(names), (len(record), len(names))
    maps = dict(zip(names, record))
    # the maps HF returns are the recorded ones, in the order assumed above
    returned = list(out.language_attentions) + list(out.vision_attentions) + list(out.cross_encoder_attentions)
    expected = [n for n in names if n.startswith(("lang", "vis")) or n.endswith(".t2i")]
    assert all(a is maps[n] for a, n in zip(returned, expected))
    return out.question_answering_score[0], maps


def lxmert_reference(model, inputs, target=None, **options):
    """Per sample (text padding removed), score = ``question_answering_score[0, c]`` (c = target[b] or argmax).

    Streams t (text, N_t) and i (regions, N_i); R^tt = I, R^ii = I, R^ti = 0, R^it = 0. Order: every language layer
    (rules 6/7 on tt, ti), every vision layer (rules 6/7 on ii, it), then each cross layer but the last: co-attention
    t->i and i->t together (rules 10/11, all four deltas from the old state), language self-attention, vision
    self-attention; the last cross layer: co-attention t->i only (rules 10/11), then language self-attention.
    Finally R^tt[0, 0] = 0. Returns text (B, N_t) = R^tt[0] (zeros at padding) and image (B, N_i) = R^ti[0].
    """
    model = _eager_copy(model)
    inputs = _f64(inputs)
    n_t = inputs["input_ids"].shape[1]
    texts, images = [], []
    for b in range(inputs["input_ids"].shape[0]):
        length = _text_length(inputs["attention_mask"][b])
        sample = {k: v[b:b + 1, :length] if k in ("input_ids", "attention_mask", "token_type_ids") else v[b:b + 1]
                  for k, v in inputs.items()}
        scores, maps = _lxmert_maps(model, sample)
        c = _target(target, b, scores)
        abar = dict(zip(maps, (_abar(A, G) for A, G in zip(maps.values(), _grads(scores[c], list(maps.values()))))))
        n_i = sample["visual_feats"].shape[1]
        state = _Relevance({"t": length, "i": n_i}, cross=[("t", "i"), ("i", "t")], **options)
        encoder = model.lxmert.encoder
        for l in range(len(encoder.layer)):
            state.self_attention("t", abar[f"lang{l}"])
        for l in range(len(encoder.r_layers)):
            state.self_attention("i", abar[f"vis{l}"])
        last = len(encoder.x_layers) - 1
        for x in range(last + 1):
            if x < last:
                state.co_attention(("t", "i", abar[f"x{x}.t2i"]), ("i", "t", abar[f"x{x}.i2t"]))
                state.self_attention("t", abar[f"x{x}.lang"])
                state.self_attention("i", abar[f"x{x}.vis"])
            else:
                state.co_attention(("t", "i", abar[f"x{x}.t2i"]))
                state.self_attention("t", abar[f"x{x}.lang"])
        R_tt = state.R[("t", "t")].clone()
        R_tt[0, 0] = 0
        text = torch.zeros(n_t, dtype=torch.float64)
        text[:length] = R_tt[0]
        texts.append(text)
        images.append(state.R[("t", "i")][0])
    return torch.stack(texts), torch.stack(images)


# ---- DETR ----

def detr_reference(model, inputs, queries, **options):
    """Per sample b and query j in queries[b]: score = ``logits[0, j, c]``, c = argmax of logits[0, j, :-1] (the last
    class is "no object"). Streams i (N_i image tokens) and q (Q queries); R^ii = I, R^qq = I, R^qi = 0.
    Encoder layers: rule 6 on R^ii. Decoder layers: self-attention (rule 6 on R^qq, rule 7 on R^qi), then
    cross-attention q->i with rule 10 only (Δqi = N(R^qq)ᵀ Ā N(R^ii), or Ā without cross_self_attention).
    Returns image (B, K, N_i) = R^qi[j] and queries (B, K, Q) = R^qq[j].
    """
    model = _eager_copy(model)
    inputs = _f64(inputs)
    images, slots = [], []
    for b in range(inputs["pixel_values"].shape[0]):
        out = model(**{k: v[b:b + 1] for k, v in inputs.items()}, output_attentions=True)
        encoder, decoder, cross = list(out.encoder_attentions), list(out.decoder_attentions), list(out.cross_attentions)
        n_i, n_q = encoder[0].shape[-1], decoder[0].shape[-1]
        image_rows, query_rows = [], []
        for j in [int(j) for j in queries[b]]:
            c = int(out.logits[0, j, :-1].argmax())
            grads = _grads(out.logits[0, j, c], encoder + decoder + cross)
            g_enc, g_dec, g_cross = (grads[:len(encoder)], grads[len(encoder):len(encoder) + len(decoder)],
                                     grads[len(encoder) + len(decoder):])
            state = _Relevance({"i": n_i, "q": n_q}, cross=[("q", "i")], **options)
            for A, G in zip(encoder, g_enc):
                state.self_attention("i", _abar(A, G))
            for A_self, G_self, A_cross, G_cross in zip(decoder, g_dec, cross, g_cross):
                state.self_attention("q", _abar(A_self, G_self))
                state.co_attention(("q", "i", _abar(A_cross, G_cross)), rule11=False)
            image_rows.append(state.R[("q", "i")][j])
            query_rows.append(state.R[("q", "q")][j])
        images.append(torch.stack(image_rows))
        slots.append(torch.stack(query_rows))
    return torch.stack(images), torch.stack(slots)
