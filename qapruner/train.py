"""`make train`: train the embedded DigitsVQA LLaVA from scratch on the CPU, in stages.

Stage 1 — the vision tower alone, densely supervised at the feature layer (−2): per patch, digit class or
background and colour; on CLS, which digits are present, how many, the largest. The CLS objective is what
makes CLS attention (the `cls` semantic score) mean something in a model trained from scratch.
Stage 2 — projector and decoder on the questions, tower frozen; the projector output starts small so visual
tokens enter near text scale; each scene's visual prefix is run once and its five questions are asked
against that shared KV cache (about 5× more questions per second). Lookup questions (the colour of digit N,
the digit in a quadrant, is there an N) stayed at chance for 1,500 steps on the answer loss alone, so an
auxiliary loss points the answer position's attention in decoder layer 1 at the patches the answer rests on.
Stage 3 — everything together at a low learning rate, the stage-1 heads kept as auxiliary losses.
Stage 4 — colour repair. After stages 1-3 every question type but "what color is the N" was learned; a
linear probe showed that the projector had dropped colour (decodable from the tower's features, at chance
from the projected tokens), and the decoder had collapsed colour answers onto one word. Stage 4 trains the
projector and decoder again with a per-token head on the *projected* tokens (digit and colour of digit
patches) so that colour reaches the LLM.
Step counts, not wall time, end each stage, so a seed gives the same model; stage 4 can also be run alone
on a saved stage-3 model (`--stage4-from DIR`), which gives the same result as running on in one process.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qapruner import data
from qapruner.model import Llava, _quiet_transformers, save, word_tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build(seed: int = 0) -> Llava:
    """The embedded model's architecture (random weights): CLIP-style tower at 224 px / patch 14 → 256 tokens,
    hidden 128, 5 layers; GELU MLP projector; Llama decoder, hidden 256 (two INT4 groups of 128), 3 layers."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    _quiet_transformers()
    tok = word_tokenizer(data.vocabulary())
    vocab = tok.get_vocab()
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=5, num_attention_heads=4,
                              image_size=data.IMAGE_SIZE, patch_size=data.CELL, projection_dim=128)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"],
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.weight.mul_(0.05)
        model.model.multi_modal_projector.linear_2.bias.zero_()
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": data.IMAGE_SIZE},
                                              crop_size={"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE}),
        tokenizer=tok, patch_size=data.CELL, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return Llava(model.eval(), processor, "digits-llava (untrained)")


def pixels(images: np.ndarray) -> torch.Tensor:
    """[B, 224, 224, 3] uint8 -> CLIP-normalised [B, 3, 224, 224] (what the processor gives for 224-px input)."""
    x = torch.from_numpy(images).float().div_(255).permute(0, 3, 1, 2)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


class Heads(nn.Module):
    """Stage-1 supervision on the feature layer's hidden states."""

    def __init__(self, width: int):
        super().__init__()
        self.digit = nn.Linear(width, 11)                       # 0-9 or background
        self.colour = nn.Linear(width, len(data.COLOURS) + 1)   # a colour or none
        self.present = nn.Linear(width, 10)
        self.count = nn.Linear(width, 9)
        self.largest = nn.Linear(width, 10)
        self.row = nn.Linear(width, data.GRID)                  # where a patch is: quadrant questions need it
        self.col = nn.Linear(width, data.GRID)

    def loss(self, hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        cls, patches = hidden[:, 0], hidden[:, 1:]
        ce = nn.functional.cross_entropy
        pd = self.digit(patches)
        pc = self.colour(patches)
        digit_mask = batch["patch_digit"] != data.BACKGROUND
        # digits are ~2% of patches: weigh them up so identity is not drowned by background
        w = torch.where(digit_mask, 10.0, 1.0).flatten()
        l_digit = (ce(pd.flatten(0, 1), batch["patch_digit"].flatten(), reduction="none") * w).sum() / w.sum()
        l_colour = ce(pc.flatten(0, 1), batch["patch_colour"].flatten())
        l_present = nn.functional.binary_cross_entropy_with_logits(self.present(cls), batch["present"])
        l_count = ce(self.count(cls), batch["count"])
        l_largest = ce(self.largest(cls), batch["largest"])
        grid = torch.arange(data.GRID * data.GRID)
        l_where = ce(self.row(patches).flatten(0, 1), (grid // data.GRID).repeat(len(patches))) + \
            ce(self.col(patches).flatten(0, 1), (grid % data.GRID).repeat(len(patches)))
        with torch.no_grad():
            acc = {"patch_digit": float((pd.argmax(-1) == batch["patch_digit"])[digit_mask].float().mean()),
                   "patch_colour": float((pc.argmax(-1) == batch["patch_colour"])[digit_mask].float().mean()),
                   "cls_count": float((self.count(cls).argmax(-1) == batch["count"]).float().mean())}
        return l_digit + l_colour + l_present + l_count + l_largest + 0.5 * l_where, acc


class TokenHeads(nn.Module):
    """Stage-4 supervision on the projected visual tokens: digit and colour, on digit patches only."""

    def __init__(self, width: int):
        super().__init__()
        self.digit = nn.Linear(width, 11)
        self.colour = nn.Linear(width, len(data.COLOURS) + 1)

    def loss(self, visual: torch.Tensor, batch: dict) -> torch.Tensor:
        on = (batch["patch_digit"] != data.BACKGROUND).flatten()
        ce = nn.functional.cross_entropy
        return ce(self.digit(visual).flatten(0, 1)[on], batch["patch_digit"].flatten()[on]) + \
            ce(self.colour(visual).flatten(0, 1)[on], batch["patch_colour"].flatten()[on])


def stage4(llava: Llava, *, seed: int, steps: int, batch: int = 12, eval_every: int = 300, eval_scenes: int = 100,
           record=None) -> None:
    """Colour repair (see the module docstring): projector + decoder, tower frozen, answer + pointer losses
    plus TokenHeads on the projected tokens. Deterministic for `seed`, whatever ran before it."""
    from tqdm import tqdm

    torch.manual_seed(seed + 4)
    model = llava.model
    model.train()
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    heads = TokenHeads(model.config.text_config.hidden_size)
    params = list(model.model.multi_modal_projector.parameters()) + list(model.model.language_model.parameters()) \
        + list(model.lm_head.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    start = 50_000_000  # scenes no earlier stage has drawn
    bar = tqdm(range(steps), desc="stage 4 colour", file=sys.stderr, mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = 5e-4 * _schedule(step, steps, 50)
        b = scene_batch("train", start + step * batch, batch, seed)
        with torch.no_grad():
            feats = feature_hidden(model, b["pixel_values"])[:, 1:]
        visual = model.model.multi_modal_projector(feats)
        qloss, _, point = question_loss(llava, visual, question_batch(llava, b["scenes"]), len(data.QUESTION_TYPES),
                                        pointer=True)
        aux = heads.loss(visual, b)
        loss = qloss + point + aux
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{qloss.item():.3f}", tokens=f"{aux.item():.3f}")
        if record is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
            model.eval()
            record(4, step + 1, {f"val_{k}": round(v, 4) for k, v in
                                 evaluate_fast(llava, "val", eval_scenes, seed).items()})
            model.train()
    model.eval()


def scene_batch(split: str, start: int, size: int, seed: int) -> dict:
    scenes = [data.make_scene(split, i, seed) for i in range(start, start + size)]
    present = torch.zeros(size, 10)
    for b, s in enumerate(scenes):
        present[b, [d[0] for d in s.digits]] = 1
    return {"scenes": scenes,
            "pixel_values": pixels(np.stack([s.image for s in scenes])),
            "patch_digit": torch.from_numpy(np.stack([s.patch_digit.ravel() for s in scenes])),
            "patch_colour": torch.from_numpy(np.stack([s.patch_colour.ravel() for s in scenes])),
            "present": present,
            "count": torch.tensor([len(s.digits) for s in scenes]),
            "largest": torch.tensor([max(d[0] for d in s.digits) for s in scenes])}


def feature_hidden(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's hidden states at the feature layer, CLS included: [B, 1+P, C]."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    return out.hidden_states[model.config.vision_feature_layer]


def question_batch(llava: Llava, scenes) -> dict:
    """Suffix token ids for every (scene, question): question words, ASSISTANT:, answer, </s> — right padded.
    Labels mark the answer and </s> as the targets of the positions before them."""
    tok = llava.processor.tokenizer
    ids, labels, ask = [], [], []
    targets = torch.zeros(sum(len(s.questions) for s in scenes), data.GRID * data.GRID)
    for s in scenes:
        for q in s.questions:
            words = tok(f"{q.text} ASSISTANT: {q.answer}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            lab = [-100] * len(words)
            lab[-3], lab[-2] = words[-2], words[-1]   # "ASSISTANT:" predicts the answer, the answer predicts </s>
            targets[len(ids), list(q.cells)] = 1
            ask.append(len(words) - 3)
            ids.append(words)
            labels.append(lab)
    width = max(map(len, ids))
    pad = tok.pad_token_id
    return {"ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
            "mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "targets": targets, "ask": torch.tensor(ask)}


ATTN_LAYER, ATTN_HEADS = 1, 2   # decoder layer and how many of its heads the pointer loss supervises


def question_loss(llava: Llava, visual: torch.Tensor, qb: dict, per_scene: int,
                  pointer: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run `USER: <visual tokens>` once per scene, then all of its questions against that shared KV cache.
    visual [S, N, D] -> (mean answer loss, argmax predictions at the labelled positions, pointer loss: −log of
    the attention mass that the answer position puts on the answer's patches, or 0 when `pointer` is off)."""
    from transformers import DynamicCache

    model = llava.model
    embed = model.get_input_embeddings()
    tok = llava.processor.tokenizer
    S, N, _ = visual.shape
    user = embed(torch.full((S, 1), tok.convert_tokens_to_ids("USER:")))
    prefix = torch.cat([user, visual], 1)                               # [S, 1+N, D]
    cache = DynamicCache(config=model.config)
    model.model.language_model(inputs_embeds=prefix, past_key_values=cache, use_cache=True)
    for layer in cache.layers:                                          # [S, ...] -> [S·Q, ...]
        layer.keys = layer.keys.repeat_interleave(per_scene, 0)
        layer.values = layer.values.repeat_interleave(per_scene, 0)
    P = prefix.shape[1]
    ids, mask = qb["ids"], qb["mask"]
    full_mask = torch.cat([torch.ones(ids.shape[0], P, dtype=mask.dtype), mask], 1)
    pos = torch.arange(P, P + ids.shape[1])[None].expand(ids.shape[0], -1)
    lm = model.model.language_model
    saved = lm.config._attn_implementation
    if pointer:
        lm.config._attn_implementation = "eager"  # attention weights are only returned by eager attention
    try:
        out = lm(inputs_embeds=embed(ids), attention_mask=full_mask, position_ids=pos, past_key_values=cache,
                 use_cache=True, output_attentions=pointer)
    finally:
        lm.config._attn_implementation = saved
    sel = qb["labels"] != -100
    logits = model.lm_head(out.last_hidden_state[sel])
    point = torch.zeros(())
    if pointer:
        att = out.attentions[ATTN_LAYER][:, :ATTN_HEADS]                  # [S·Q, h, L, P+L]
        rows = torch.arange(ids.shape[0])
        at_ask = att[rows, :, qb["ask"], 1:1 + N].mean(1)               # [S·Q, N] over the visual tokens
        mass = (at_ask * qb["targets"]).sum(-1)
        point = -torch.log(mass + 1e-6).mean()
    return nn.functional.cross_entropy(logits, qb["labels"][sel]), logits.argmax(-1), point


@torch.no_grad()
def evaluate_fast(llava: Llava, split: str, n: int, seed: int) -> dict:
    """Exact-match accuracy of the first answer token per question type, on n scenes × 5 questions, using the
    same shared-prefix forward as training (equal to the pipeline's prefill up to float rounding)."""
    model = llava.model
    correct = {k: 0 for k in data.QUESTION_TYPES}
    total = {k: 0 for k in data.QUESTION_TYPES}
    for start in range(0, n, 25):
        b = scene_batch(split, start, min(25, n - start), seed)
        visual = model.model.multi_modal_projector(feature_hidden(model, b["pixel_values"])[:, 1:])
        qb = question_batch(llava, b["scenes"])
        _, pred, _ = question_loss(llava, visual, qb, len(data.QUESTION_TYPES))
        target = qb["labels"][qb["labels"] != -100]
        hits = (pred == target).view(-1, 2)[:, 0]                     # the answer token
        kinds = [q.kind for s in b["scenes"] for q in s.questions]
        for k, h in zip(kinds, hits.tolist()):
            correct[k] += h
            total[k] += 1
    out = {k: correct[k] / total[k] for k in total}
    out["overall"] = sum(correct.values()) / sum(total.values())
    return out


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _attention(model, impl: str) -> None:
    # sdpa trains faster; the saved model and the pipeline use eager (attention maps)
    for cfg in (model.config, model.config.vision_config, model.config.text_config):
        cfg._attn_implementation = impl


def _finish(llava: Llava, out: Path, meta: dict) -> dict:
    _attention(llava.model, "eager")
    llava.model.eval()
    save(llava.replace(source="digits-llava"), out)
    (out / "training.json").write_text(json.dumps(meta, indent=1))
    return meta


def train(out: Path, *, seed: int = 0, steps1: int = 2000, steps2: int = 4500, steps3: int = 500,
          steps4: int = 1200, batch1: int = 16, batch2: int = 12, eval_every: int = 750, eval_scenes: int = 100,
          log=print) -> dict:
    from tqdm import tqdm

    torch.manual_seed(seed)
    llava = build(seed)
    model = llava.model
    model.train()
    _attention(model, "sdpa")
    heads = Heads(model.config.vision_config.hidden_size)
    curve, t0 = [], time.perf_counter()
    scene_index = 0

    def record(stage, step, extra):
        minutes = (time.perf_counter() - t0) / 60
        curve.append({"stage": stage, "step": step, "minutes": round(minutes, 2), **extra})
        log(json.dumps(curve[-1]))

    # stage 1: the tower
    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    bar = tqdm(range(steps1), desc="stage 1 vision", file=sys.stderr, mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = 2e-3 * _schedule(step, steps1, 100)
        b = scene_batch("train", scene_index, batch1, seed)
        scene_index += batch1
        loss, acc = heads.loss(feature_hidden(model, b["pixel_values"]), b)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", digit=f"{acc['patch_digit']:.2f}")
        if (step + 1) % eval_every == 0 or step + 1 == steps1:
            with torch.no_grad():
                vb = scene_batch("val", 0, 64, seed)
                _, vacc = heads.loss(feature_hidden(model, vb["pixel_values"]), vb)
            record(1, step + 1, {f"val_{k}": round(v, 4) for k, v in vacc.items()})

    # stage 2: projector + decoder, tower frozen
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    params = list(model.model.multi_modal_projector.parameters()) + list(model.model.language_model.parameters()) \
        + list(model.lm_head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    q = len(data.QUESTION_TYPES)
    bar = tqdm(range(steps2), desc="stage 2 decoder", file=sys.stderr, mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = 1e-3 * _schedule(step, steps2, 200)
        b = scene_batch("train", scene_index, batch2, seed)
        scene_index += batch2
        with torch.no_grad():
            feats = feature_hidden(model, b["pixel_values"])[:, 1:]
        qloss, _, point = question_loss(llava, model.model.multi_modal_projector(feats),
                                        question_batch(llava, b["scenes"]), q, pointer=True)
        loss = qloss + point
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{qloss.item():.3f}", pointer=f"{point.item():.3f}")
        if (step + 1) % eval_every == 0 or step + 1 == steps2:
            model.eval()
            record(2, step + 1, {f"val_{k}": round(v, 4) for k, v in
                                 evaluate_fast(llava, "val", eval_scenes, seed).items()})
            model.train()

    # stage 3: everything, low learning rate, stage-1 heads as auxiliary losses
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(True)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    bar = tqdm(range(steps3), desc="stage 3 joint", file=sys.stderr, mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = 2e-4 * _schedule(step, steps3, 50)
        b = scene_batch("train", scene_index, batch2, seed)
        scene_index += batch2
        hidden = feature_hidden(model, b["pixel_values"])
        aux, _ = heads.loss(hidden, b)
        qloss, _, point = question_loss(llava, model.model.multi_modal_projector(hidden[:, 1:]),
                                        question_batch(llava, b["scenes"]), q, pointer=True)
        loss = qloss + point + 0.3 * aux
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{qloss.item():.3f}")
        if (step + 1) % eval_every == 0 or step + 1 == steps3:
            model.eval()
            record(3, step + 1, {f"val_{k}": round(v, 4) for k, v in
                                 evaluate_fast(llava, "val", eval_scenes, seed).items()})
            model.train()

    stage4(llava, seed=seed, steps=steps4, batch=batch2, eval_scenes=eval_scenes, record=record)
    return _finish(llava, out, {"seed": seed, "steps": [steps1, steps2, steps3, steps4], "batch": [batch1, batch2],
                                "minutes": round((time.perf_counter() - t0) / 60, 2), "curve": curve})


def resume_stage4(base: Path, out: Path, *, steps4: int = 1200, log=print) -> dict:
    """Run stage 4 alone on a saved stages-1-3 model (same result as `train` running on)."""
    from qapruner.model import load

    meta = json.loads((base / "training.json").read_text())
    if len(meta["steps"]) != 3:
        raise ValueError(f"{base} is not a stages-1-3 model (its training.json lists steps {meta['steps']})")
    llava = load(base)
    _attention(llava.model, "sdpa")
    t0, before = time.perf_counter(), meta["minutes"]
    curve = meta["curve"]

    def record(stage, step, extra):
        curve.append({"stage": stage, "step": step, "minutes": round(before + (time.perf_counter() - t0) / 60, 2),
                      **extra})
        log(json.dumps(curve[-1]))
    stage4(llava, seed=meta["seed"], steps=steps4, batch=meta["batch"][1], record=record)
    meta.update(steps=meta["steps"] + [steps4], minutes=round(before + (time.perf_counter() - t0) / 60, 2),
                curve=curve)
    return _finish(llava, out, meta)


@torch.no_grad()
def report(model_dir: Path, out_md: Path, questions: int = 500) -> dict:
    """Float test accuracy per question type beside its majority-answer prior, the training curve, and the
    statistics of the projected visual tokens (R_i distribution, digit vs background, CLS attention mass)."""
    from collections import Counter

    from qapruner.evaluate import accuracy
    from qapruner.model import encode_images, load
    from qapruner.pipeline import encode_inputs
    from qapruner.scoring import Scoring, cls_attention, quantization_error, token_range

    llava = load(model_dir)
    items = data.questions("test", questions, 0)
    per_type = {}
    for kind in data.QUESTION_TYPES:
        sub = [(s, q) for s, q in items if q.kind == kind]
        prior = Counter(q.answer for _, q in sub).most_common(1)[0][1] / len(sub)
        per_type[kind] = {"n": len(sub), "accuracy": accuracy(llava, sub, retention=1.0, scoring=Scoring()),
                          "prior": prior}
    overall = sum(v["accuracy"] * v["n"] for v in per_type.values()) / len(items)

    from PIL import Image

    scenes = [data.make_scene("test", i) for i in range(64)]
    batch = encode_inputs(llava, [Image.fromarray(s.image) for s in scenes], [s.prompts()[0] for s in scenes])
    enc = encode_images(llava.model, batch["pixel_values"], with_cls_attention=True)
    feats = enc["features"]
    R = token_range(feats)
    E = quantization_error(feats, group_size=128)
    digit = torch.from_numpy(np.stack([s.patch_digit.ravel() != data.BACKGROUND for s in scenes]))
    att = cls_attention(enc["attentions"], feats.shape[1])
    top32 = torch.topk(att, 32, dim=1).indices
    kept_digits = digit.gather(1, top32).sum() / digit.sum()
    from qapruner.pruning import select
    from qapruner.scoring import hybrid_scores

    hybrid = select(hybrid_scores(feats, att, alpha=0.7, group_size=128)["S"], 32)
    kept_digits_hybrid = digit.gather(1, hybrid).sum() / digit.sum()
    text_norm = llava.model.get_input_embeddings().weight.norm(dim=-1).median()
    flat = R.flatten()
    stats = {
        "R_median": float(flat.median()), "R_p99": float(flat.quantile(0.99)), "R_max": float(flat.max()),
        "R_max_over_median": float(flat.max() / flat.median()),
        "R_p99_over_median": float(flat.quantile(0.99) / flat.median()),
        "R_digit_mean": float(R[digit].mean()), "R_background_mean": float(R[~digit].mean()),
        "E_digit_mean": float(E[digit].mean()), "E_background_mean": float(E[~digit].mean()),
        "tokens_above_5x_median": int((flat > 5 * flat.median()).sum()), "tokens": int(flat.numel()),
        "visual_token_norm_median": float(feats.norm(dim=-1).median()), "text_embedding_norm_median": float(text_norm),
        "cls_mass_on_digits": float((att * digit).sum() / att.sum()), "digit_patch_fraction": float(digit.float().mean()),
        "digits_kept_by_cls_top32": float(kept_digits),
        "digits_kept_by_qapruner_top32": float(kept_digits_hybrid),
    }
    meta = json.loads((model_dir / "training.json").read_text()) if (model_dir / "training.json").exists() else {}
    lines = ["# The embedded model: training and activation statistics", "",
             f"Model `{model_dir}`; produced by `make train` (`python -m qapruner.train`), this page by "
             f"`python -m qapruner.train --report-only`.", "",
             f"## Float accuracy on {len(items)} DigitsVQA test questions (retention 1.0): **{100 * overall:.1f}%**", "",
             "| question type | n | accuracy | majority-answer prior |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['n']} | {100 * v['accuracy']:.1f}% | {100 * v['prior']:.1f}% |" for k, v in per_type.items()]
    if meta:
        lines += ["", f"## Training curve (seed {meta['seed']}, steps per stage {meta['steps']}, "
                      f"{meta['minutes']} min in all on this machine)", "",
                  "| stage | step | minutes | validation |", "|---|---|---|---|"]
        for row in meta["curve"]:
            vals = ", ".join(f"{k[4:]} {v:.3f}" for k, v in row.items() if k.startswith("val_"))
            lines.append(f"| {row['stage']} | {row['step']} | {row['minutes']} | {vals} |")
    lines += ["", "## Projected visual tokens (64 test scenes × 256 tokens)", "",
              "| statistic | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in stats.items()]
    lines += ["", "R_i = max − min over the 256 channels of a projected token; E_i its INT4 group-128 error. "
              "`cls_mass_on_digits` is the share of the feature layer's CLS attention that lands on digit patches; "
              "`digits_kept_by_cls_top32` the share of digit patches among the 32 most-attended tokens (12.5%); "
              "`digits_kept_by_qapruner_top32` the same for QAPruner's fused score (CLS attention, α = 0.7)."]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines) + "\n")
    return {"overall": overall, "per_type": per_type, "stats": stats}


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qapruner.train", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/digits-llava")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, nargs=4, default=[2000, 4500, 500, 1200], metavar=("S1", "S2", "S3", "S4"))
    ap.add_argument("--eval-every", type=int, default=750)
    ap.add_argument("--stage4-from", type=Path, help="run only stage 4 on this saved stages-1-3 model")
    ap.add_argument("--report", default="docs/results/training.md", help="where to write the report")
    ap.add_argument("--report-only", action="store_true", help="only (re)write the report for --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.stage4_from is not None:
        resume_stage4(args.stage4_from, out, steps4=args.steps[3])
    elif not args.report_only:
        train(out, seed=args.seed, steps1=args.steps[0], steps2=args.steps[1], steps3=args.steps[2],
              steps4=args.steps[3], eval_every=args.eval_every)
    res = report(out, Path(args.report))
    print(json.dumps({"overall": res["overall"], **{k: v["accuracy"] for k, v in res["per_type"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
