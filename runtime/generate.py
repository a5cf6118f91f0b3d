"""Splice kept visual tokens into the prompt and decode greedily with a KV cache, in numpy.

The same arithmetic as qapruner.pipeline.splice / generate (the torch reference), written against the
backend contract so it runs on ONNX Runtime or TensorRT sessions alike.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Infer = Callable[[dict], dict]


def text_embedding(input_ids: np.ndarray, attention_mask: np.ndarray, table: np.ndarray,
                   special_ids) -> np.ndarray:
    """Mean embedding of each prompt's text tokens (no specials, padding or placeholders): [B, T] -> [B, D]."""
    text = ~np.isin(input_ids, np.asarray(sorted(special_ids))) & attention_mask.astype(bool)
    emb = table[np.where(text, input_ids, 0)] * text[..., None]
    return (emb.sum(1) / np.maximum(text.sum(1, keepdims=True), 1)).astype(np.float32)


def _kept(input_ids: np.ndarray, indices: np.ndarray, image_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(is_img, keep) [B, T]: the image placeholders, and the positions that stay (text + kept placeholders)."""
    is_img = input_ids == image_token_id
    n = int(is_img.sum(1).max())
    if (is_img.sum(1) != n).any():
        raise ValueError("every prompt must hold the same number of image placeholders")
    ordinal = np.clip(np.cumsum(is_img, 1) - 1, 0, None)           # which visual token a position holds
    kept = np.zeros((input_ids.shape[0], n), bool)
    np.put_along_axis(kept, indices, True, 1)
    return is_img, ~is_img | (is_img & np.take_along_axis(kept, ordinal, 1))


def splice(input_ids: np.ndarray, attention_mask: np.ndarray, tokens: np.ndarray, indices: np.ndarray,
           table: np.ndarray, image_token_id: int, positions: str = "original"):
    """input_ids, attention_mask [B, T] (left padded, N placeholders per row), tokens [B, K, D] kept in
    ascending order, indices [B, K] -> inputs_embeds [B, T-N+K, D], attention_mask, position_ids [B, T-N+K]."""
    B, T = input_ids.shape
    K = tokens.shape[1]
    is_img, keep = _kept(input_ids, indices, image_token_id)
    n = int(is_img.sum(1).max())
    embeds = table[np.where(is_img, 0, input_ids)].astype(np.float32)  # [B, T, D]
    embeds[is_img] = np.zeros(embeds.shape[-1], np.float32)
    # kept visual tokens go to the kept placeholder positions, in order
    slots = keep & is_img
    embeds[slots] = tokens.reshape(B * K, -1)
    Tk = T - n + K
    mask = attention_mask.astype(np.int64)
    if positions == "original":
        full = np.where(mask == 0, 1, np.cumsum(mask, 1) - 1)
        pos = full[keep].reshape(B, Tk)
    else:
        m = mask[keep].reshape(B, Tk)
        pos = np.where(m == 0, 1, np.cumsum(m, 1) - 1)
    return embeds[keep].reshape(B, Tk, -1), mask[keep].reshape(B, Tk), pos.astype(np.int64)


def visual_mask(input_ids: np.ndarray, indices: np.ndarray, image_token_id: int) -> np.ndarray:
    """[B, T-N+K] int64: 1 where `splice`'s output holds a visual token (one contiguous block per row), for a
    QUOTA artifact's prefill graph."""
    is_img, keep = _kept(input_ids, indices, image_token_id)
    return is_img[keep].reshape(input_ids.shape[0], -1).astype(np.int64)


def greedy(llm: Infer, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
           table: np.ndarray, *, num_layers: int, kv_heads: int, head_dim: int, eos_ids, pad_id: int,
           max_new_tokens: int = 16, on_step: Callable[[np.ndarray], None] | None = None,
           prefill: Infer | None = None) -> np.ndarray:
    """Greedy decoding: prefill with an empty past, then one token per step with the presents fed back.
    With `prefill` (a QUOTA artifact's prefill graph, given the same feeds but no past) the first step runs
    there and each layer's present has its own length. Returns token ids [B, ≤ max_new_tokens]; rows that ended are
    padded with `pad_id`."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    B = inputs_embeds.shape[0]
    names = [f"{i}.{t}" for i in range(num_layers) for t in ("key", "value")]
    past = {f"past_key_values.{x}": np.zeros((B, kv_heads, 0, head_dim), np.float32) for x in names}
    eos = np.asarray(sorted(eos_ids), np.int64)
    mask, pos, embeds = attention_mask.astype(np.int64), position_ids.astype(np.int64), inputs_embeds
    done = np.zeros(B, bool)
    out_tokens = []
    for step in range(max_new_tokens):
        feeds = {"inputs_embeds": embeds.astype(np.float32), "attention_mask": mask, "position_ids": pos}
        out = prefill(feeds) if step == 0 and prefill is not None else llm({**feeds, **past})
        nxt = out["logits"][:, -1].argmax(-1).astype(np.int64)
        nxt = np.where(done, pad_id, nxt)
        out_tokens.append(nxt)
        if on_step is not None:
            on_step(nxt)
        done |= np.isin(nxt, eos)
        if done.all() or step == max_new_tokens - 1:
            break
        past = {f"past_key_values.{x}": out[f"present.{x}"] for x in names}
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
        embeds = table[nxt][:, None, :]
    return np.stack(out_tokens, 1)
