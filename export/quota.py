"""The LLM of a QUOTA artifact: a recipe's fixed keep counts K_l baked into two ONNX graphs.

llm_prefill.onnx  inputs_embeds [B, T, D], attention_mask [B, T] int64, position_ids [B, T] int64,
                  visual_mask [B, T] int64 (1 on the V₀ visual positions, one contiguous block per row)
                  -> logits [B, 1, V], present.{i}.key / .value [B, Hkv, T_i, Dh]
                  At each recipe layer l the visual tokens are scored from the layer's input and the previous
                  layer's attention (`qapruner.quota.token_features` + `combine`, the recipe's percentiles and
                  weights as constants) and all but the top K_l dropped (TopK + Gather): T_i = T − (V₀ − K_l)
                  from layer l on. Text and padding are never dropped.
llm.onnx          the decoder for the steps after: inputs_embeds [B, S, D], attention_mask [B, P + S] (the
                  whole 2D mask, as for the plain decoder), position_ids [B, S], past_key_values.{i}.* with
                  each layer's own length P_i -> logits, present.{i}.* [B, Hkv, P_i + S, Dh].

Both run the decoder's own submodules in a layer loop of ours (the loop of `qapruner.quota.prefill` /
`step`; transformers' decoder sizes its mask from layer 0's cache, so it cannot serve per-layer lengths).
Each layer's key mask is derived from the one 2D mask: padding is on the left and never dropped, so layer i's
keys j ∈ [0, P_i + S) are valid from the row's padding count on. The kept positions are data (TopK), the
counts are fixed by the recipe: one graph per recipe, like one vision graph per K.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from export.llm import cache_from, decoder_parts, io_names, kv_shape, presents, save_onnx
from qapruner import quota
from qapruner.model import Llava

PREFILL_INPUTS = ["inputs_embeds", "attention_mask", "position_ids", "visual_mask"]


class _Base(nn.Module):
    def __init__(self, llava: Llava, recipe: quota.Recipe):
        super().__init__()
        self.lm, self.head, self.config = decoder_parts(llava)
        self.layers = self.config.num_hidden_layers
        if recipe.num_layers != self.layers:
            raise ValueError(f"recipe for {recipe.num_layers} decoder layers, the model has {self.layers}")
        self.recipe = recipe

    def _outputs(self, h, cache):
        return (self.head(self.lm.norm(h[:, -1:])), *presents(cache))  # logits [B, 1, V], presents


class RecipePrefill(_Base):
    """The prefill with the recipe's in-LLM pruning (`qapruner.quota.prefill` in traceable form)."""

    def forward(self, inputs_embeds, attention_mask, position_ids, visual_mask):
        r = self.recipe
        h, mask, pos = inputs_embeds, attention_mask, position_ids
        visual = visual_mask > 0
        D = h.shape[-1]
        # [B] first visual position; the block is contiguous, and everything before it is text or padding,
        # which is never dropped, so the kept visual tokens start there at every layer
        start = torch.argmax(visual_mask.to(torch.int32), dim=1)
        cache = DynamicCache(config=self.config)
        attn, V = None, r.v0
        for i, layer in enumerate(self.lm.layers):
            k = r.keep_at(i)
            if k is not None and k < V:
                idx = start[:, None] + torch.arange(V)[None, :]                      # [B, V] visual positions
                text = ~visual & (mask > 0)
                feats = quota.token_features(h, attn, idx, text)
                score = quota.combine(feats, r.percentiles.get(str(i), {}), r.weights)  # [B, V]
                kept = torch.gather(idx, 1, quota.keep_top(score, k))                 # [B, k]
                keep = (~visual).scatter(1, kept, True)                              # [B, T]
                T = h.shape[1]
                ar = torch.arange(T)[None, :]
                # the kept positions in order: the T − (V − k) smallest of (position, or T + position if dropped)
                order = torch.topk(torch.where(keep, ar, ar + T), T - (V - k), dim=1, largest=False).indices
                h = torch.gather(h, 1, order[..., None].expand(-1, -1, D))
                mask, pos, visual = (torch.gather(x, 1, order) for x in (mask, pos, visual))
                V = k
            h, attn = quota._layer(layer, h, quota.additive_mask(mask, h.shape[1], h.dtype), pos, cache,
                                   self.lm.rotary_emb)
        return self._outputs(h, cache)


class RecipeDecode(_Base):
    """Decode steps over per-layer caches of different lengths (`qapruner.quota.step`)."""

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        cache = cache_from(self.config, past)
        S = inputs_embeds.shape[1]
        pad = attention_mask.shape[1] - attention_mask.sum(1)                         # [B] left padding
        h = inputs_embeds
        for i, layer in enumerate(self.lm.layers):
            P = past[2 * i].shape[2]
            valid = torch.arange(P + S)[None, :] >= pad[:, None]                     # [B, P_i + S]
            h, _ = quota._layer(layer, h, quota.additive_mask(valid, S, h.dtype), position_ids, cache,
                                self.lm.rotary_emb)
        return self._outputs(h, cache)


def prefill_io(num_layers: int) -> tuple[list[str], list[str]]:
    return PREFILL_INPUTS, io_names(num_layers)[1]


def example_prefill(llava: Llava, recipe: quota.Recipe, batch: int = 2, text: int = 6):
    """Example prefill inputs: `text` text tokens around a V₀ visual block, row 1 left-padded by one."""
    d = llava.model.config.text_config.hidden_size
    T = recipe.v0 + text
    mask = torch.ones(batch, T, dtype=torch.int64)
    mask[1:, 0] = 0
    visual = torch.zeros(batch, T, dtype=torch.int64)
    for b in range(batch):
        s = 2 + (b > 0)
        visual[b, s:s + recipe.v0] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return torch.randn(batch, T, d), mask, pos, visual


def export_recipe_llm(llava: Llava, recipe: quota.Recipe, out_dir: str | Path, *, opset: int = 21) -> dict:
    """Trace `RecipePrefill` to out_dir/llm_prefill.onnx and `RecipeDecode` to out_dir/llm.onnx. Dynamic
    batch, prompt length (≥ V₀ + 1), past lengths (one per layer)."""
    out_dir = Path(out_dir)
    n = llava.model.config.text_config.num_hidden_layers
    hkv, dh = kv_shape(llava)
    d = llava.model.config.text_config.hidden_size
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("sequence", min=recipe.v0 + 1, max=32768)
    shapes = tuple({0: batch, 1: seq} for _ in range(4))
    save_onnx(RecipePrefill(llava, recipe).eval(), example_prefill(llava, recipe), prefill_io(n), shapes,
          out_dir / "llm_prefill.onnx", opset)
    # decode: S = 2 and distinct past lengths in the example (torch.export specialises sizes 0 and 1)
    B, S = 2, 2
    past_len, current = [], recipe.v0
    for i in range(n):
        current = recipe.keep_at(i) or current
        past_len.append(6 + current)              # each layer's cache: its visual tokens + 6 text tokens
    total = max(past_len) + S
    args = (torch.randn(B, S, d), torch.ones(B, total, dtype=torch.int64),
            torch.arange(total - S, total).expand(B, S).contiguous(),
            *[torch.randn(B, hkv, past_len[i // 2], dh) for i in range(2 * n)])
    seq1 = torch.export.Dim("step_sequence", min=1, max=32768)
    tot = torch.export.Dim("total_sequence", min=1, max=65536)
    pasts = [torch.export.Dim(f"past_sequence_{i}", min=0, max=32768) for i in range(n)]
    shapes = ({0: batch, 1: seq1}, {0: batch, 1: tot}, {0: batch, 1: seq1},
              tuple({0: batch, 2: pasts[i // 2]} for i in range(2 * n)))
    save_onnx(RecipeDecode(llava, recipe).eval(), args, io_names(n), shapes, out_dir / "llm.onnx", opset)
    return {"prefill": "llm_prefill.onnx", "decode": "llm.onnx"}
