"""The vision graph: pixels -> CLIP tower -> projector -> QAPruner score -> top-K -> kept tokens.

`VisionPruner` is a torch module written only from the LLaVA's own submodules (no patched classes) so that
`torch.onnx.export` traces the whole QAPruner score (§3.2, Eq. 1-5) into the graph: group-wise INT4 error
(Round/Clip in float), range, CLS attention or text relevance, min-max normalisation, α fusion, TopK, sort and
gather. K is fixed per graph (TensorRT wants a build-time K ≤ 3840); the batch is dynamic.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qapruner.model import Llava, _attention_index, _encoder_layers
from qapruner.scoring import Scoring, score_terms

TRT_MAX_TOPK = 3840  # TensorRT's ITopKLayer limit on K


def _feature_layer(llava: Llava) -> int:
    layer = llava.model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"export needs a single vision_feature_layer, the model stacks {layer}")
    return layer


class VisionPruner(nn.Module):
    """pixel_values [B, 3, H, W] (+ text_embedding [B, D] for semantic "text") ->
    tokens [B, K, D] kept projected tokens in ascending original order, indices [B, K] int64, scores [B, N].

    Equal to `qapruner.pipeline.prefill_inputs`' features / indices / S (the feature layer is run by hand
    to read its attention weights; the layers above it are never run)."""

    def __init__(self, llava: Llava, scoring: Scoring, k: int, encoder_only: bool = False):
        super().__init__()
        self.encoder_only = encoder_only  # stop at the projected features (to time the score and selection)
        model = llava.model
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        blocks = _encoder_layers(self.tower)
        idx = _attention_index(_feature_layer(llava), len(blocks))  # the layer whose output LLaVA reads
        self.blocks = nn.ModuleList(blocks[: idx % len(blocks) + 1])
        self.drop_cls = model.config.vision_feature_select_strategy == "default"
        self.select = ScoreSelect(scoring, k)

    def forward(self, pixel_values: torch.Tensor, text_embedding: torch.Tensor | None = None):
        h = self.tower.pre_layrnorm(self.tower.embeddings(pixel_values))  # [B, 1+P, C]
        for block in self.blocks[:-1]:
            h = block(h, None)
        last = self.blocks[-1]
        a, weights = last.self_attn(hidden_states=last.layer_norm1(h), attention_mask=None)  # weights [B,H,T,T]
        h = h + a
        h = h + last.mlp(last.layer_norm2(h))
        features = self.projector(h[:, 1:] if self.drop_cls else h)  # [B, N, D]
        if self.encoder_only:
            return features, weights[:, :, 0]  # and the CLS attention rows, so nothing is pruned away
        return self.select(features, weights[:, :, 0], text_embedding)


class ScoreSelect(nn.Module):
    """The scoring-and-pruning tail alone: features [B, N, D], CLS attention rows [B, H, T] (T = N or 1+N)
    (+ text_embedding [B, D]) -> tokens [B, K, D], indices [B, K], scores [B, N]."""

    def __init__(self, scoring: Scoring, k: int):
        super().__init__()
        self.scoring, self.k = scoring, int(k)

    def forward(self, features: torch.Tensor, cls_rows: torch.Tensor, text_embedding: torch.Tensor | None = None):
        n = features.shape[1]
        if self.scoring.semantic == "cls":  # mean over heads; drop CLS's own column when it is not a token
            semantic = cls_rows.float().mean(dim=1)[:, cls_rows.shape[-1] - n:]
        elif self.scoring.semantic == "text":  # text_relevance without its value checks
            semantic = nn.functional.cosine_similarity(features.float(), text_embedding.float()[:, None, :], dim=-1)
        else:
            semantic = None
        sc = self.scoring  # hybrid_scores' arithmetic without its data-dependent value checks
        s = score_terms(features, semantic, sc.alpha, sc.group_size, sc.bits, sc.sq_mode)["S"]  # [B, N]
        # top-K then ascending order; TopK breaks ties towards the lower index like pruning.select
        kept = torch.sort(torch.topk(s, self.k, dim=1, largest=True, sorted=True).indices, dim=1).values
        tokens = torch.gather(features, 1, kept[:, :, None].expand(-1, -1, features.shape[-1]))
        return tokens, kept, s


def export_vision(llava: Llava, scoring: Scoring, k: int, path: str | Path, *, opset: int = 21,
                  encoder_only: bool = False) -> Path:
    """Trace `VisionPruner` to ONNX at `path` (single file). Inputs pixel_values (+ text_embedding),
    outputs tokens, indices, scores; dynamic batch. `encoder_only`: outputs features [B, N, D] and the CLS
    attention rows instead (the benchmark's baseline for the cost of scoring and selection)."""
    n = llava.num_image_tokens
    if not 1 <= k <= n:
        raise ValueError(f"K = {k} must be in [1, {n}] (the model has {n} visual tokens)")
    if k > TRT_MAX_TOPK:
        raise ValueError(f"K = {k} exceeds TensorRT's TopK limit of {TRT_MAX_TOPK}")
    dim = llava.model.config.text_config.hidden_size
    if scoring.group_size and dim % scoring.group_size:
        raise ValueError(f"group size {scoring.group_size} does not divide the projected dimension {dim}")
    module = VisionPruner(llava, scoring, k, encoder_only).eval()
    size = llava.model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    args, names, shapes = (pixels,), ["pixel_values"], [{0: batch}]
    if scoring.semantic == "text" and not encoder_only:
        args += (torch.randn(2, dim),)
        names.append("text_embedding")
        shapes.append({0: batch})
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=names,
                                    output_names=["features", "cls_attention"] if encoder_only else
                                    ["tokens", "indices", "scores"], dynamic_shapes=tuple(shapes),
                                    external_data=False, verbose=False)
    program.save(str(path))
    return Path(path)

