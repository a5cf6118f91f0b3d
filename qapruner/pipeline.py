"""The torch reference pipeline: encode images once, score, prune, splice the kept tokens into the LLM's
input embeddings, and decode greedily with a KV cache.

Every other stage (exported graphs, engines, the slim runtime) is checked against `answer` and `logits`.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from qapruner import ptq
from qapruner.model import Llava, encode_images, load
from qapruner.pruning import resolve_k, select
from qapruner.scoring import Scoring, cls_attention, hybrid_scores, text_relevance


@dataclass(frozen=True)
class Prefill:
    """What enters the LLM after pruning: inputs_embeds [B, T', D] (unrotated), attention_mask and
    position_ids [B, T'], kept `indices` [B, K] into the N visual tokens, and the `scores` (E, R, SQ, SP, S)."""
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    indices: torch.Tensor
    scores: dict


@dataclass(frozen=True)
class Answers:
    texts: list[str]
    token_ids: torch.Tensor   # [B, new tokens], pad after end of sequence
    indices: torch.Tensor     # [B, K] kept visual tokens, ascending
    scores: dict


def _to_list(x, what: str) -> list:
    if isinstance(x, (list, tuple)):
        return list(x)
    if x is None:
        raise ValueError(f"no {what} given")
    return [x]


def encode_inputs(llava: Llava, images, prompts) -> dict[str, torch.Tensor]:
    """Run the processor after checking the inputs: one image per prompt, one image placeholder per prompt."""
    images, prompts = _to_list(images, "images"), _to_list(prompts, "prompts")
    if not images:
        raise ValueError("no images given")
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts: give one prompt per image")
    token = llava.processor.image_token
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i} is empty")
        if p.count(token) != 1:
            raise ValueError(f"prompt {i} must contain the image placeholder {token!r} exactly once, "
                             f"found {p.count(token)}: {p[:60]!r}")
    # left padding whatever the tokenizer's default: greedy decoding reads the last position of every row
    batch = llava.processor(images=images, text=prompts, return_tensors="pt", padding=True, padding_side="left")
    n = llava.num_image_tokens
    counts = (batch["input_ids"] == llava.image_token_id).sum(dim=1)
    if (counts != n).any():
        raise ValueError(f"the processor expanded the placeholder to {counts.tolist()} tokens, expected {n} "
                         "(does the processor's patch size match the model's vision tower?)")
    return batch


def semantic_scores(llava: Llava, source: str | None, encoded: dict, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor | None:
    """S^P before normalisation, [B, N]: CLS attention ("cls"), text relevance ("text") or None."""
    if source is None:
        return None
    features = encoded["features"]
    if source == "cls":
        return cls_attention(encoded["attentions"], features.shape[1])
    return text_relevance(features, text_embedding(llava, input_ids, attention_mask))


def text_embedding(llava: Llava, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """t̄, the mean embedding of each prompt's text tokens, [B, T] -> [B, D]: no image placeholders, padding or
    special tokens (BOS, ...); chat-template words count as text."""
    special = torch.tensor(sorted(set(llava.processor.tokenizer.all_special_ids) | {llava.image_token_id}))
    text = ~torch.isin(input_ids, special) & attention_mask.bool()
    emb = llava.model.get_input_embeddings()(torch.where(text, input_ids, torch.zeros_like(input_ids)))
    return (emb * text[..., None]).sum(1) / text.sum(1, keepdim=True).clamp(min=1)


POSITIONS = ("original", "contiguous")


def splice(llava: Llava, input_ids: torch.Tensor, attention_mask: torch.Tensor, features: torch.Tensor,
           indices: torch.Tensor, positions: str = "original") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace the N placeholder tokens of each row by its K kept tokens (dropping the rest).

    input_ids, attention_mask [B, T] (left padded, N placeholders per row); features [B, N, D];
    indices [B, K] ascending -> inputs_embeds [B, T-N+K, D], attention_mask and position_ids [B, T-N+K].
    positions: "original" keeps every kept token's position in the unpruned sequence (gaps where tokens were
    dropped), "contiguous" re-numbers the kept sequence. Both padding-aware; with K = N they coincide.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    B, T = input_ids.shape
    N, K = features.shape[1], indices.shape[1]
    is_img = input_ids == llava.image_token_id
    embeds = llava.model.get_input_embeddings()(torch.where(is_img, torch.zeros_like(input_ids), input_ids))
    embeds = embeds.masked_scatter(is_img[..., None], features.to(embeds.dtype))
    kept = torch.zeros(B, N, dtype=torch.bool).scatter_(1, indices, True)
    ordinal = (is_img.long().cumsum(1) - 1).clamp(min=0)  # which visual token each position holds
    keep = ~is_img | (is_img & kept.gather(1, ordinal))
    Tk = T - N + K
    embeds = embeds[keep].view(B, Tk, -1)
    mask = attention_mask[keep].view(B, Tk)
    if positions == "original":
        full = (attention_mask.long().cumsum(1) - 1).masked_fill(attention_mask == 0, 1)
        pos = full[keep].view(B, Tk)
    else:
        pos = (mask.long().cumsum(1) - 1).masked_fill(mask == 0, 1)
    return embeds, mask, pos


@torch.no_grad()
def prefill_inputs(llava: Llava, images, prompts, *, keep: int | None = None, retention: float | None = None,
                   scoring: Scoring = Scoring(), positions: str = "original") -> Prefill:
    """Images and prompts -> the pruned LLM input (QAPruner §3.2 applied per image, same K for the batch)."""
    batch = encode_inputs(llava, images, prompts)
    n = llava.num_image_tokens
    k = resolve_k(n, keep, retention)
    encoded = encode_images(llava.model, batch["pixel_values"], with_cls_attention=scoring.semantic == "cls")
    features = encoded["features"]
    sem = semantic_scores(llava, scoring.semantic, encoded, batch["input_ids"], batch["attention_mask"])
    scores = hybrid_scores(features, sem, alpha=scoring.alpha, group_size=scoring.group_size,
                           bits=scoring.bits, sq_mode=scoring.sq_mode)
    if k == n:
        indices = torch.arange(n).expand(features.shape[0], n).contiguous()
    else:
        indices = select(scores["S"], k)
    embeds, mask, pos = splice(llava, batch["input_ids"], batch["attention_mask"], features, indices, positions)
    return Prefill(embeds, mask, pos, indices, scores)


def _llm(llava: Llava, embeds, mask, pos, cache, logits_to_keep: int = 0):
    if llava.rotation is not None:  # the rotated decoder reads rotated inputs (QuaRot)
        embeds = embeds @ llava.rotation.to(embeds.dtype)
    return llava.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=cache is not None, logits_to_keep=logits_to_keep)


@torch.no_grad()
def logits(llava: Llava, images, prompts, *, keep: int | None = None, retention: float | None = None,
           scoring: Scoring = Scoring(), positions: str = "original") -> torch.Tensor:
    """Prefill logits [B, T', V] of the pruned input under the model's (simulated) scheme."""
    p = prefill_inputs(llava, images, prompts, keep=keep, retention=retention, scoring=scoring, positions=positions)
    return _llm(llava, p.inputs_embeds, p.attention_mask, p.position_ids, ptq.make_cache(llava)).logits


def _eos_ids(llava: Llava) -> set[int]:
    eos = llava.model.generation_config.eos_token_id
    if eos is None:
        eos = llava.processor.tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())


@torch.no_grad()
def generate(llava: Llava, prefill: Prefill, max_new_tokens: int = 16) -> torch.Tensor:
    """Greedy decoding with a KV cache from a prefill. Returns token ids [B, ≤max_new_tokens]; rows that ended
    are padded with the pad token."""
    embed = llava.model.get_input_embeddings()
    cache = ptq.make_cache(llava)
    mask, pos = prefill.attention_mask, prefill.position_ids
    out = _llm(llava, prefill.inputs_embeds, mask, pos, cache, logits_to_keep=1)

    def advance(nxt: torch.Tensor) -> torch.Tensor:
        nonlocal mask, pos
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        return _llm(llava, embed(nxt[:, None]), mask, pos, cache, logits_to_keep=1).logits
    return greedy(llava, out.logits, advance, max_new_tokens)


def greedy(llava: Llava, logits: torch.Tensor, advance, max_new_tokens: int) -> torch.Tensor:
    """The greedy loop from a prefill's logits [B, T, V]: `advance(next tokens [B])` feeds them to the
    decoder and returns the new logits [B, 1, V]. Stops at end of sequence (rows that ended are padded with the
    pad token) or after `max_new_tokens`; returns [B, ≤ max_new_tokens]."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    eos = _eos_ids(llava)
    pad = llava.processor.tokenizer.pad_token_id
    pad = pad if pad is not None else next(iter(eos), 0)
    eos_t = torch.tensor(sorted(eos), dtype=torch.long)
    done = torch.zeros(logits.shape[0], dtype=torch.bool)
    tokens = []
    for step in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        tokens.append(nxt)
        done |= torch.isin(nxt, eos_t)
        if done.all() or step == max_new_tokens - 1:
            break
        logits = advance(nxt)
    return torch.stack(tokens, 1)


def calibrator(pairs: Sequence[tuple], *, keep: int | None = None, retention: float | None = None,
               scoring: Scoring = Scoring(), positions: str = "original"):
    """A `calibrate` callable for `ptq.apply`: runs the prefill of each (image, prompt) pair, pruned to the
    given K (keep/retention), or on all tokens when neither is given."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("calibration needs at least one (image, prompt) pair")
    if keep is None and retention is None:
        retention = 1.0

    def run(llava: Llava) -> None:
        for image, prompt in pairs:
            p = prefill_inputs(llava, [image], [prompt], keep=keep, retention=retention, scoring=scoring,
                               positions=positions)
            _llm(llava, p.inputs_embeds, p.attention_mask, p.position_ids, ptq.make_cache(llava), logits_to_keep=1)
    return run


@torch.no_grad()
def answer(llava: Llava, images, prompts, *, keep: int | None = None, retention: float | None = None,
           scoring: Scoring = Scoring(), scheme: ptq.Scheme | None = None, calibration: Sequence[tuple] = (),
           max_new_tokens: int = 16, positions: str = "original") -> Answers:
    """Answer each prompt about its image with K kept visual tokens (QAPruner §3.2 then greedy decoding).

    With `scheme`, the float `llava` is first fake-quantized; a scheme that needs statistics is calibrated on
    `calibration` pairs pruned to the same K. For repeated calls quantize once with `ptq.apply` instead.
    """
    if scheme is not None:
        calibrate = calibrator(calibration, keep=keep, retention=retention, scoring=scoring,
                               positions=positions) if scheme.needs_calibration else None
        llava = ptq.apply(llava, scheme, calibrate)
    p = prefill_inputs(llava, images, prompts, keep=keep, retention=retention, scoring=scoring, positions=positions)
    ids = generate(llava, p, max_new_tokens)
    texts = llava.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
    return Answers([t.strip() for t in texts], ids, p.indices, p.scores)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qapruner.pipeline",
                                 description="Answer a question about an image with QAPruner token pruning.")
    ap.add_argument("--model", required=True, help="llava-hf directory")
    ap.add_argument("--image", required=True, nargs="+")
    ap.add_argument("--prompt", required=True, nargs="+", help="one per image, with the <image> placeholder")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--keep", type=int)
    g.add_argument("--retention", type=float)
    ap.add_argument("--semantic", choices=["cls", "text", "none"], default="cls")
    ap.add_argument("--alpha", type=float, default=0.7)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--scheme", choices=list(ptq.PRESETS), default="fp")
    ap.add_argument("--act", choices=["dynamic", "static"], default="dynamic")
    ap.add_argument("--rotate", action="store_true", help="QuaRot rotation before quantization")
    ap.add_argument("--kv-bits", type=int, choices=[4, 8])
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        from PIL import Image

        llava = load(args.model)
        images = []
        for f in args.image:
            try:
                images.append(Image.open(f).convert("RGB"))
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read image {f}: {e}") from None
        scoring = Scoring(semantic=None if args.semantic == "none" else args.semantic, alpha=args.alpha,
                          group_size=args.group_size)
        overrides = {"a_mode": args.act} if ptq.PRESETS[args.scheme].a_bits is not None else {}
        scheme = ptq.scheme_from_name(args.scheme, rotate=args.rotate, kv_bits=args.kv_bits, **overrides)
        retention = None if args.keep is not None else (1.0 if args.retention is None else args.retention)
        calib = list(zip(images, args.prompt))  # a smoke-test calibration on the inputs themselves
        res = answer(llava, images, args.prompt, keep=args.keep, retention=retention, scoring=scoring,
                     scheme=scheme, calibration=calib, max_new_tokens=args.max_new_tokens)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [{"image": f, "prompt": p, "answer": t, "kept": res.indices[i].tolist()}
            for i, (f, p, t) in enumerate(zip(args.image, args.prompt, res.texts))]
    if args.json:
        print(json.dumps({"scheme": scheme.describe(), "answers": rows}, indent=1))
    else:
        for r in rows:
            print(f"{Path(r['image']).name}: {r['prompt']!r} -> {r['answer']!r} ({len(r['kept'])} tokens kept)")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
