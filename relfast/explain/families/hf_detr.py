"""HuggingFace DETR (``DetrForObjectDetection``): per-query image maps through the decoder's
self- and cross-attention ([P2], SPEC.md "Encoder-decoder (DETR)").

The target is a query index (or K of them per image); each query is explained from the logit of
its best real class (the "no object" class excluded): the scores the target indexes are
``logits[..., :-1].max(-1)`` (B, Q), so ``target=None`` explains the query whose best class has the
highest logit. Rules: encoder self-attention on ``R^ii``; per decoder layer, rules 6-7 on the
queries' self-attention and rule 10 on the cross-attention (no rule 11: the image never attends
to the queries). ``maps["image"]`` is ``R^qi[j]`` over the backbone's feature positions (row-major
(h, w): ``image_map()`` reshapes it), ``maps["queries"]`` is ``R^qq[j]``. The Explanation keeps
the model's output (``output.logits``, ``output.pred_boxes``) for boxes and
``relfast.eval.detr_masks``.
"""
from typing import Optional

import torch

from ..layout import TokenLayout
from ..streams import CoAttention, CrossPlan, Readout, SelfAttention, Stream
from ..targets import Targets, check_class_range
from .base import HFFamily, ModelCall, check_batch, check_mask, check_tensors, register

_KEYS = frozenset({"pixel_values", "pixel_mask"})


@register
class HFDetr(HFFamily):
    name = "HuggingFace DETR (DetrForObjectDetection; target: query indices)"
    class_names = frozenset({"DetrForObjectDetection"})
    cross_attention = True
    keeps_output = True
    lrp = False
    target_kind = "query"
    fixed_batch_export = "HF DETR caches its position embeddings by shape, which a free batch size cannot key"
    softmax_capture = True  # eager DETR: its softmaxes are recorded (a constant first decoder layer included)

    def default_layout(self):
        return TokenLayout(prefix_tokens=0)

    def num_classes(self):
        return self.model.config.num_queries  # the target indexes queries

    def attention_sites(self):
        config = self.model.config
        return config.encoder_layers + 2 * config.decoder_layers

    def parse_target(self, target):
        if target is None:
            return Targets()
        if callable(target) and not isinstance(target, torch.Tensor):
            raise ValueError("relfast.Explainer: DETR explains queries; argument 'target' must be None or query "
                             "indices (an int, a (B,) or (B, K) tensor, a list), not a callable")
        targets = Targets.parse(target, None)
        check_class_range(targets.fixed, self.model.config.num_queries, what="argument 'target' (query indices)",
                          unit="query")
        return targets

    def parse(self, inputs):
        if isinstance(inputs, torch.Tensor):
            inputs = {"pixel_values": inputs}
        elif hasattr(inputs, "keys"):
            inputs = dict(inputs)
        else:
            check_tensors({"inputs": inputs})
        batch = check_batch(inputs, "pixel_values")
        unknown = sorted(set(inputs) - _KEYS)
        if unknown:
            raise ValueError(f"relfast.Explainer: argument 'inputs' has key(s) {unknown} that relfast does not pass to "
                             f"DetrForObjectDetection; expected keys among {sorted(_KEYS)}")
        check_tensors(inputs)
        pixels = inputs["pixel_values"]
        channels = self.model.config.num_channels
        if pixels.dim() != 4 or pixels.shape[1] != channels or min(pixels.shape[2:]) == 0 \
                or not pixels.dtype.is_floating_point:
            raise ValueError(f"relfast.Explainer: argument 'inputs' (pixel_values) must be a floating-point tensor "
                             f"(B, {channels}, H, W), got {pixels.dtype} {tuple(pixels.shape)}")
        if "pixel_mask" in inputs and tuple(inputs["pixel_mask"].shape) != (batch, *pixels.shape[2:]):
            raise ValueError(f"relfast.Explainer: argument 'inputs' (pixel_mask) must have shape "
                             f"{(batch, *pixels.shape[2:])}, got {tuple(inputs['pixel_mask'].shape)}")
        return ModelCall(inputs, batch)

    def check_values(self, call):
        super().check_values(call)
        check_mask(call.kwargs.get("pixel_mask"), "pixel_mask", "real pixel")

    def export_outputs(self, output):
        return {"class_logits": output.logits, "pred_boxes": output.pred_boxes}

    def scores(self, output, call):
        return output.logits[..., :-1].amax(dim=-1)  # each query's best real class; its gradient is that logit's

    def backbone_stride(self) -> Optional[int]:
        """How many pixels one feature position spans, read from the backbone: a timm backbone's
        ``feature_info``, or an HF ResNet config's stages (stem /4, then /2 per later stage).
        None for other backbones."""
        encoder = self.model.model.backbone
        backbone = getattr(getattr(encoder, "conv_encoder", encoder), "model", None)  # older releases nest it
        feature_info = getattr(backbone, "feature_info", None)
        if feature_info is not None and hasattr(feature_info, "reduction"):
            return int(feature_info.reduction()[-1])
        config = getattr(backbone, "config", None)
        stages = getattr(backbone, "out_features", None)
        if getattr(config, "model_type", None) == "resnet" and stages and stages[-1].startswith("stage"):
            stage = int(stages[-1][len("stage"):])
            return 4 * 2 ** (stage - 1) * (2 if getattr(config, "downsample_in_first_stage", False) else 1)
        return None

    def _image_layout(self, tokens: int, height: int, width: int) -> TokenLayout:
        """The backbone's (h, w) grid: its stride s halves the image with ceil rounding per stage,
        so h = ceil(H / s), w = ceil(W / s). The stride comes from the backbone; for a backbone
        relfast cannot read, it is the smallest power of two whose grid holds ``tokens`` (a tiny
        image fits several: the smallest covers it with the fewest pixels to spare)."""
        stride = self.backbone_stride()
        candidates = [stride] if stride else [2 ** i for i in range(12)]
        for s in candidates:
            grid = (-(-height // s), -(-width // s))
            if grid[0] * grid[1] == tokens:
                return TokenLayout(prefix_tokens=0, patch_grid=grid, patch_size=s)
        return TokenLayout(prefix_tokens=0)  # an unusual backbone: the map stays a flat row over the tokens

    def plan(self, records, call):
        config = self.model.config
        encoder, decoder, queries = config.encoder_layers, config.decoder_layers, config.num_queries
        if len(records) != encoder + 2 * decoder:
            raise ValueError(f"relfast.Explainer: the DETR model has {encoder} encoder and {decoder} decoder layers "
                             f"({encoder + 2 * decoder} attention maps) but {len(records)} were seen")
        tokens = records[0].shape[-1]
        expected = [(tokens, tokens)] * encoder + [(queries, queries), (queries, tokens)] * decoder
        for i, (record, shape) in enumerate(zip(records, expected)):
            if len(record.shape) != 4 or record.shape[0] != call.batch or tuple(record.shape[-2:]) != shape:
                raise ValueError(f"relfast.Explainer: DETR attention map {i} has shape {tuple(record.shape)}, expected "
                                 f"({call.batch}, heads, {shape[0]}, {shape[1]})")
        steps = [SelfAttention("image", i) for i in range(encoder)]
        for layer in range(decoder):
            self_site = encoder + 2 * layer
            steps += [SelfAttention("queries", self_site),
                      CoAttention((("queries", "image", self_site + 1),), rule_11=False)]
        height, width = call.kwargs["pixel_values"].shape[2:]
        return CrossPlan([Stream("image", self._image_layout(tokens, height, width), tokens),
                          Stream("queries", TokenLayout(prefix_tokens=0), queries)], steps,
                         [Readout("image", "queries", "image", "target"),
                          Readout("queries", "queries", "queries", "target")])
