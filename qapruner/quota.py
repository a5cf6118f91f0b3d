"""QUOTA (Li et al., 2026, "Towards Joint Quantization and Token Pruning of Vision-Language Models"):
visual tokens are dropped progressively inside the quantized LLM on a schedule calibrated offline, under
the deployed low-bit operators (and a quantized KV cache), and materialised as a versioned recipe.

Schedule (QUOTA §3): over the candidate layers L_c = (l_1 < … < l_m), with layer sensitivities S_l,
  Ŝ = clip((S − P10(S)) / (P90(S) − P10(S)), 0.1, 0.9),  π = softmax((1 − Ŝ)/τ),  B = 1 − p_min,
  d_i = B·π_i,  r_i = max(p_min, 1 − Σ_{j≤i} d_j)  (non-increasing),  K_i = ceil(r_i·V₀).
Layers before l_1 see all V₀ tokens, layers after l_m keep K_m. The *budget* is the average fraction of the N
visual tokens each decoder layer processes; with QAPruner's pre-LLM pruning to V₀ = ceil(pre·N) it is
pre · mean_l(r_l). τ and p_min are searched so that the budget is met.

Token score at l ∈ L_c (inside the quantized forward, from the layer's input and the previous layer's
attention): magnitude ||v||₂, text→visual attention, visual→visual attention and the low-bit residual
||Q(v) − v||₂, each clipped to its calibration percentiles [P5, P95] and rescaled to [0, 1], combined with
weights shared across layers; the top K_l visual tokens stay (text tokens are never dropped).

Execution runs the decoder's own layers in a loop of ours (no patched transformers classes): hidden states,
position ids, the attention mask and the KV cache of the layers from l on shrink with the kept set. The same
token scoring (`token_features`, `combine`, `keep_top`) is traced into the exported LLM by export/quota.py.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from qapruner import ptq
from qapruner.model import Llava
from qapruner.quant import fake_quantize

RECIPE_FORMAT = "qapruner-quota-recipe/1"
FEATURES = ("magnitude", "text_attention", "visual_attention", "residual")
DEFAULT_WEIGHTS = {"magnitude": 0.25, "text_attention": 0.25, "visual_attention": 0.25, "residual": 0.25}
TAUS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)


# ---------------------------------------------------------------------------------------------------------
# The schedule (pure)

def normalized_sensitivity(s: Sequence[float]) -> np.ndarray:
    """Ŝ = clip((S − P10)/(P90 − P10), 0.1, 0.9); a flat S gives 0.5 everywhere."""
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 1 or s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError(f"sensitivities must be a non-empty finite vector, got {s!r}")
    lo, hi = np.percentile(s, 10), np.percentile(s, 90)
    if hi - lo <= 0:
        return np.full_like(s, 0.5)
    return np.clip((s - lo) / (hi - lo), 0.1, 0.9)


def schedule(sensitivity: Sequence[float], v0: int, tau: float, p_min: float) -> tuple[list[float], list[int]]:
    """Keep ratios r_i and token counts K_i = ceil(r_i·V₀) over the candidate layers (QUOTA's allocation):
    sensitive layers (high Ŝ) get a small share of the drop budget B = 1 − p_min."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if not 0 < p_min <= 1:
        raise ValueError(f"p_min must be in (0, 1], got {p_min!r}")
    if v0 < 1:
        raise ValueError(f"V0 must be ≥ 1, got {v0!r}")
    z = (1 - normalized_sensitivity(sensitivity)) / tau
    pi = np.exp(z - z.max())
    pi /= pi.sum()
    drops = (1 - p_min) * pi
    ratios = np.maximum(p_min, 1 - np.cumsum(drops))
    keeps = [max(1, math.ceil(float(r) * v0 - 1e-9)) for r in ratios]
    return [float(r) for r in ratios], keeps


def processed_fraction(keeps: Sequence[int], layers: Sequence[int], num_layers: int, v0: int,
                       n: int | None = None) -> float:
    """Average over the decoder's layers of the fraction of the N visual tokens each one processes."""
    n = v0 if n is None else n
    per_layer, current = [], v0
    where = dict(zip(layers, keeps))
    for l in range(num_layers):
        current = where.get(l, current)
        per_layer.append(current / n)
    return float(np.mean(per_layer))


def fit_schedule(sensitivity: Sequence[float], layers: Sequence[int], num_layers: int, v0: int, n: int,
                 budget: float, taus: Sequence[float] = TAUS) -> dict:
    """Search τ and p_min so that the processed fraction is at most `budget` (within one token per layer),
    as close to it as possible; ties go to the larger p_min (the gentlest floor). Raises if unreachable."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget!r}")
    slack = 1 / n  # one token per layer
    best = None
    for tau in taus:
        for p_min in np.linspace(1.0, 1.0 / v0, 400):
            ratios, keeps = schedule(sensitivity, v0, tau, float(p_min))
            got = processed_fraction(keeps, layers, num_layers, v0, n)
            if got <= budget + slack:
                key = (budget - got, -p_min)
                if best is None or key < best[0]:
                    best = (key, {"tau": float(tau), "p_min": float(p_min), "ratios": ratios, "keeps": keeps,
                                  "achieved": got})
                break  # p_min decreasing: the first feasible one is the closest for this tau
    if best is None:
        floor = processed_fraction([1] * len(layers), layers, num_layers, v0, n)
        raise ValueError(f"budget {budget:g} is unreachable: with candidate layers {list(layers)} of {num_layers} "
                         f"and {v0} of {n} visual tokens entering the LLM, dropping all but one token from "
                         f"layer {layers[0]} on still processes {floor:.3f}; prune before the LLM (--pre) or "
                         "raise the budget")
    return best[1]


def pre_retention_for(budget: float, num_layers: int, tail: float = 0.25, first: int = 2) -> float:
    """QAPruner's pre-LLM retention V₀/N when a decoder is too shallow for in-LLM pruning alone to meet the
    budget: layers before the first candidate (`first`) see V₀, the rest about `tail`·V₀, so
    V₀/N = min(1, budget·L / (first + (L − first)·tail)). Deep decoders get 1 (no pre-LLM cut) when it fits."""
    if num_layers <= first:
        raise ValueError(f"a {num_layers}-layer decoder has no layer to prune at (QUOTA never prunes the first "
                         f"{first})")
    if not 0 < budget <= 1 or not 0 < tail <= 1:
        raise ValueError(f"budget and tail must be in (0, 1], got {budget!r} and {tail!r}")
    return round(min(1.0, budget * num_layers / (first + (num_layers - first) * tail)), 6)


# ---------------------------------------------------------------------------------------------------------
# The recipe

@dataclass(frozen=True)
class Recipe:
    """What `calibrate` decides, applied unchanged at run time (and baked into the exported LLM)."""
    model_sha256: str
    scheme: dict
    kv_bits: int | None
    num_layers: int
    n: int                       # visual tokens per image out of the projector
    v0: int                      # visual tokens entering the LLM (after optional pre-LLM pruning)
    pre_retention: float
    layers: tuple[int, ...]      # L_c
    keeps: tuple[int, ...]       # K_l per candidate layer, non-increasing
    ratios: tuple[float, ...]
    tau: float
    p_min: float
    budget: float
    achieved: float
    weights: dict = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    percentiles: dict = field(default_factory=dict)  # str(layer) -> feature -> [P5, P95]
    statistics: dict = field(default_factory=dict)   # per-layer calibration statistics
    calibration: dict = field(default_factory=dict)
    format: str = RECIPE_FORMAT

    def __post_init__(self):
        if self.format != RECIPE_FORMAT:
            raise ValueError(f"recipe format {self.format!r} is not {RECIPE_FORMAT!r}: recalibrate")
        if not self.layers or len(self.layers) != len(self.keeps) or len(self.keeps) != len(self.ratios):
            raise ValueError("a recipe needs one keep count and ratio per candidate layer")
        if list(self.layers) != list(range(self.layers[0], self.layers[0] + len(self.layers))):
            raise ValueError(f"candidate layers must be contiguous, got {list(self.layers)}")
        if self.layers[0] < 2 or self.layers[-1] >= self.num_layers:
            raise ValueError(f"candidate layers must lie in [2, {self.num_layers - 1}], got {list(self.layers)}")
        if any(b > a for a, b in zip(self.keeps, self.keeps[1:])) or not 1 <= self.keeps[-1] <= self.keeps[0] \
                <= self.v0:
            raise ValueError(f"keep counts must be non-increasing within [1, V0 = {self.v0}], got {list(self.keeps)}")
        if not 1 <= self.v0 <= self.n:
            raise ValueError(f"V0 = {self.v0} must be in [1, N = {self.n}]")
        if set(self.weights) != set(FEATURES):
            raise ValueError(f"weights must name {FEATURES}, got {sorted(self.weights)}")

    def keep_at(self, layer: int) -> int | None:
        return dict(zip(self.layers, self.keeps)).get(layer)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @staticmethod
    def load(path: str | Path, llava: Llava | None = None) -> "Recipe":
        """Read and validate a recipe; with `llava`, refuse one made for another model or token count."""
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"recipe not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a JSON recipe: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != RECIPE_FORMAT:
            raise ValueError(f"{path} is not a {RECIPE_FORMAT} recipe (format {raw.get('format') if isinstance(raw, dict) else None!r})")
        try:
            recipe = Recipe(**{**raw, "layers": tuple(raw["layers"]), "keeps": tuple(raw["keeps"]),
                               "ratios": tuple(raw["ratios"])})
        except (TypeError, KeyError) as e:
            raise ValueError(f"{path}: malformed recipe ({e})") from None
        if llava is not None:
            recipe.check(llava)
        return recipe

    def check(self, llava: Llava) -> None:
        from qapruner.model import model_sha256

        n_layers = llava.model.config.text_config.num_hidden_layers
        if self.num_layers != n_layers or self.n != llava.num_image_tokens:
            raise ValueError(f"recipe for a {self.num_layers}-layer decoder with N = {self.n} visual tokens, the "
                             f"model has {n_layers} layers and N = {llava.num_image_tokens}: recalibrate")
        sha = model_sha256(llava.source) if Path(llava.source).is_dir() else None
        if sha is not None and sha != self.model_sha256:
            raise ValueError(f"recipe made for model {self.model_sha256[:12]}…, this is {sha[:12]}… "
                             f"({llava.source}): recalibrate")


# ---------------------------------------------------------------------------------------------------------
# Token features and the layer loop

def visual_positions(visual: torch.Tensor) -> torch.Tensor:
    """[B, T] bool -> [B, V] positions of the visual tokens of each row (the same count in every row)."""
    B = visual.shape[0]
    v = visual.sum(1)
    if (v != v[0]).any():
        raise ValueError("every row must hold the same number of visual tokens")
    return visual.nonzero()[:, 1].view(B, int(v[0]))


def token_features(h: torch.Tensor, attn: torch.Tensor | None, idx: torch.Tensor, text: torch.Tensor,
                   group_size: int = 128, bits: int = 4) -> dict[str, torch.Tensor]:
    """Per visual token of each row: h [B, T, D] the layer's input, attn [B, H, T, T] the previous layer's
    attention probabilities over the same positions, idx [B, V] the visual positions (ascending), text [B, T]
    bool mask of the text tokens. Returns each feature as [B, V]. Traceable (the exported LLM runs it)."""
    B, T, D = h.shape
    V = idx.shape[1]
    hv = torch.gather(h.float(), 1, idx[..., None].expand(-1, -1, D))            # [B, V, D]
    g = group_size if D % group_size == 0 else D
    feats = {"magnitude": hv.norm(dim=-1),
             "residual": (fake_quantize(hv, bits, granularity="group", group_size=g) - hv).norm(dim=-1)}
    if attn is None:
        feats["text_attention"] = hv.new_zeros(B, V)
        feats["visual_attention"] = hv.new_zeros(B, V)
    else:
        a = attn.float().mean(1)                                 # [B, T(query), T(key)]
        cols = torch.gather(a, 2, idx[:, None, :].expand(-1, T, -1))  # [B, T, V] attention to visual keys
        visual = torch.zeros(B, T, dtype=torch.bool, device=h.device).scatter(1, idx, True)
        tq, vq = text.float()[..., None], visual.float()[..., None]
        feats["text_attention"] = (cols * tq).sum(1) / tq.sum(1).clamp(min=1)
        feats["visual_attention"] = (cols * vq).sum(1) / vq.sum(1).clamp(min=1)
    return feats


def keep_top(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k best of each row of score [B, V] as ascending indices [B, k]; equal scores go to the lower
    index (ONNX TopK's rule, so the exported graph keeps the same set)."""
    if torch.compiler.is_exporting():  # ONNX TopK breaks ties by the lower index (no stable sort in ONNX)
        order = torch.topk(score, k, dim=1).indices
    else:
        order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=1).values


def combine(feats: dict[str, torch.Tensor], percentiles: dict, weights: dict) -> torch.Tensor:
    """Σ_f w_f · clip((x_f − P5_f)/(P95_f − P5_f), 0, 1): [B, V]."""
    score = 0
    for f in FEATURES:
        lo, hi = percentiles.get(f, (0.0, 0.0))
        x = feats[f]
        span = hi - lo
        z = torch.clamp((x - lo) / span, 0, 1) if span > 0 else torch.zeros_like(x)
        score = score + weights[f] * z
    return score


def additive_mask(key_mask: torch.Tensor, q_len: int, dtype) -> torch.Tensor:
    """key_mask [B, P + q] (nonzero = valid key) -> additive mask [B, 1, q, P + q]: key padding, and causal order
    among the last q keys. Traceable with symbolic shapes (the exported LLM builds its masks with it)."""
    total = key_mask.shape[1]
    j = torch.arange(total)[None, :]                     # [1, P + q]
    i = torch.arange(q_len)[:, None]                     # [q, 1]
    allowed = key_mask.bool()[:, None, None, :] & (j <= i + (total - q_len))[None, None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass
class State:
    """Decoding state of a recipe run: the cache, each layer's key mask, the last position id."""
    cache: object
    key_masks: list
    last_pos: torch.Tensor
    kept: dict                   # layer -> kept visual positions (indices into that layer's input) [B, K]


def _layer(layer, h, mask4d, pos, cache, rotary):
    cos_sin = rotary(h, pos)
    residual = h
    a, weights = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=mask4d, position_ids=pos,
                                 past_key_values=cache, use_cache=True, position_embeddings=cos_sin)
    h = residual + a
    return h + layer.mlp(layer.post_attention_layernorm(h)), weights


@torch.no_grad()
def prefill(llava: Llava, recipe: Recipe | None, embeds: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
            visual: torch.Tensor, trace: bool = False):
    """The decoder over a prefill, dropping visual tokens at the recipe's layers. embeds [B, T, D]
    (unrotated), mask / pos / visual [B, T]. Returns (last logits [B, 1, V], State, trace) where trace (if
    asked) holds per layer its input hidden states, attention and masks (for calibration)."""
    lm = llava.model.model.language_model
    h = embeds @ llava.rotation.to(embeds.dtype) if llava.rotation is not None else embeds
    cache = ptq.make_cache(llava)
    key_masks, kept, records = [], {}, []
    attn = None
    for i, layer in enumerate(lm.layers):
        text = ~visual & mask.bool()
        k = recipe.keep_at(i) if recipe is not None else None
        if trace:
            records.append({"h": h, "attn": attn, "visual": visual.clone(), "text": text})
        if k is not None and k < int(visual.sum(1)[0]):
            vpos = visual_positions(visual)                                                 # [B, V]
            feats = token_features(h @ llava.rotation.T.to(h.dtype) if llava.rotation is not None else h,
                                   attn, vpos, text)
            score = combine(feats, recipe.percentiles.get(str(i), {}), recipe.weights)       # [B, V]
            B = visual.shape[0]
            kept[i] = torch.gather(vpos, 1, keep_top(score, k))                             # positions
            keep = ~visual
            keep[torch.arange(B)[:, None], kept[i]] = True
            Tk = int(keep.sum(1)[0])
            h = h[keep].view(B, Tk, -1)
            mask, pos, visual = mask[keep].view(B, Tk), pos[keep].view(B, Tk), visual[keep].view(B, Tk)
        key_masks.append(mask.clone())
        h, attn = _layer(layer, h, additive_mask(mask, h.shape[1], h.dtype), pos, cache, lm.rotary_emb)
    logits = llava.model.lm_head(lm.norm(h[:, -1:]))
    return logits, State(cache, key_masks, pos[:, -1:], kept), records


@torch.no_grad()
def step(llava: Llava, state: State, embed: torch.Tensor) -> torch.Tensor:
    """One decode step [B, 1, D] -> logits [B, 1, V]; each layer attends over its own (possibly shrunk) cache."""
    lm = llava.model.model.language_model
    h = embed @ llava.rotation.to(embed.dtype) if llava.rotation is not None else embed
    state.last_pos = state.last_pos + 1
    for i, layer in enumerate(lm.layers):
        state.key_masks[i] = torch.cat([state.key_masks[i], torch.ones_like(state.key_masks[i][:, :1])], 1)
        h, _ = _layer(layer, h, additive_mask(state.key_masks[i], 1, h.dtype), state.last_pos, state.cache,
                      lm.rotary_emb)
    return llava.model.lm_head(lm.norm(h))


@torch.no_grad()
def generate(llava: Llava, recipe: Recipe | None, p, visual: torch.Tensor, max_new_tokens: int = 16) -> torch.Tensor:
    """Greedy decoding with the recipe from a `qapruner.pipeline.Prefill` `p`; visual [B, T'] marks its
    visual positions. Same contract as `qapruner.pipeline.generate`."""
    from qapruner.pipeline import greedy

    logits, state, _ = prefill(llava, recipe, p.inputs_embeds, p.attention_mask, p.position_ids, visual)
    embed = llava.model.get_input_embeddings()
    return greedy(llava, logits, lambda nxt: step(llava, state, embed(nxt[:, None])), max_new_tokens)


# ---------------------------------------------------------------------------------------------------------
# Inputs and calibration

@torch.no_grad()
def prepare(llava: Llava, images, prompts, *, pre_retention: float = 1.0, scoring=None, keep: int | None = None,
            positions: str = "original"):
    """The LLM input for QUOTA: `qapruner.pipeline.prefill_inputs` (QAPruner's pre-LLM pruning to
    V₀ = ceil(pre_retention·N) — or `keep` — or none at 1.0) and the mask of visual positions [B, T'] in it."""
    from qapruner.pipeline import encode_inputs, prefill_inputs
    from qapruner.scoring import Scoring

    scoring = scoring or Scoring()
    size = {"keep": keep} if keep is not None else {"retention": pre_retention}
    p = prefill_inputs(llava, images, prompts, scoring=scoring, positions=positions, **size)
    ids = encode_inputs(llava, images, prompts)["input_ids"]
    is_img = ids == llava.image_token_id
    B, N = ids.shape[0], llava.num_image_tokens
    kept = torch.zeros(B, N, dtype=torch.bool).scatter_(1, p.indices, True)
    ordinal = (is_img.long().cumsum(1) - 1).clamp(min=0)
    keep = ~is_img | (is_img & kept.gather(1, ordinal))
    visual = is_img[keep].view(B, -1)
    return p, visual


def _layer_stats(float_rec: list, quant_rec: list, eps: float = 1e-12) -> list[dict]:
    """Per layer, for one sample: sensitivity ||x_q − x||²/(||x||² + ε) over visual tokens, the median of
    the top-10 text→visual attention scores (of the previous layer), and the median pairwise cosine
    similarity of the visual tokens."""
    out = []
    for f, q in zip(float_rec, quant_rec):
        vis = f["visual"][0]
        x, xq = f["h"][0][vis].float(), q["h"][0][vis].float()
        sens = float(((xq - x) ** 2).sum() / ((x ** 2).sum() + eps))
        xn = torch.nn.functional.normalize(x, dim=-1)
        sim = xn @ xn.T
        off = sim[~torch.eye(sim.shape[0], dtype=torch.bool)]
        red = float(off.median()) if off.numel() else 1.0
        if q["attn"] is None:
            conc = float("nan")
        else:
            feats = token_features(q["h"], q["attn"], visual_positions(q["visual"]), q["text"])
            top = torch.topk(feats["text_attention"][0], min(10, feats["text_attention"].shape[1])).values
            conc = float(top.median())
        out.append({"sensitivity": sens, "concentration": conc, "redundancy": red})
    return out


def candidate_layers(stats: dict, num_layers: int) -> list[int]:
    """A contiguous early range, never the first two layers, avoiding the last block when the decoder has
    4 or more: it starts at the first allowed layer whose text→visual attention concentration is at least
    the median of the allowed layers', and spans a quarter of the decoder (at least one layer)."""
    last = num_layers - 2 if num_layers >= 4 else num_layers - 1
    allowed = list(range(2, last + 1))
    if not allowed:
        raise ValueError(f"a {num_layers}-layer decoder has no layer to prune at (never the first two)")
    conc = [stats[l]["concentration"] for l in allowed]
    med = float(np.nanmedian(conc)) if not all(np.isnan(conc)) else 0.0
    start = next((l for l, c in zip(allowed, conc) if not np.isnan(c) and c >= med), allowed[0])
    length = max(1, round(num_layers / 4))
    return [l for l in allowed if start <= l < start + length]


@torch.no_grad()
def calibrate(llava: Llava, scheme: ptq.Scheme, pairs, *, budget: float = 0.30, pre_retention: float = 1.0,
              weights: dict | None = None, scoring=None, quantized: Llava | None = None,
              log=lambda m: None) -> Recipe:
    """QUOTA's offline calibration: quantize `llava` under `scheme` (KV cache included) — or take `quantized`,
    already made so from the same pairs at the same pre-LLM cut —, run the calibration pairs through the float
    and the quantized decoder, derive candidate layers, sensitivities, the schedule for `budget` and the
    token-feature percentiles, and return the recipe."""
    from qapruner.model import model_sha256
    from qapruner.pipeline import calibrator

    pairs = list(pairs)
    if not pairs:
        raise ValueError("QUOTA calibration needs at least one (image, prompt) pair")
    n = llava.num_image_tokens
    v0 = max(1, math.ceil(pre_retention * n - 1e-9))
    if quantized is None:
        calib = calibrator(pairs, retention=pre_retention, **({"scoring": scoring} if scoring else {})) \
            if scheme.needs_calibration else None
        quantized = ptq.apply(llava, scheme, calib)
    num_layers = llava.model.config.text_config.num_hidden_layers
    per_sample = []
    inputs = []
    for image, prompt in pairs:
        p, visual = prepare(llava, [image], [prompt], pre_retention=pre_retention, scoring=scoring)
        inputs.append((p, visual))
        _, _, f = prefill(llava, None, p.inputs_embeds, p.attention_mask, p.position_ids, visual, trace=True)
        _, _, q = prefill(quantized, None, p.inputs_embeds, p.attention_mask, p.position_ids, visual, trace=True)
        per_sample.append(_layer_stats(f, q))
    stats = {}
    for l in range(num_layers):
        s = [x[l]["sensitivity"] for x in per_sample]
        c = [x[l]["concentration"] for x in per_sample]
        r = [x[l]["redundancy"] for x in per_sample]
        stats[l] = {"sensitivity": float(np.median(s)), "concentration": float(np.nanmedian(c)) if not all(
            np.isnan(c)) else float("nan"), "concentration_iqr": float(np.subtract(*np.nanpercentile(c, [75, 25])))
            if not all(np.isnan(c)) else float("nan"), "redundancy": float(np.median(r))}
    layers = candidate_layers(stats, num_layers)
    chosen = list(layers)
    # a range that starts too late cannot meet the budget however hard it prunes: move it earlier (never
    # before layer 2) until it can
    while layers[0] > 2 and processed_fraction([1] * len(layers), layers, num_layers, v0, n) > budget + 1 / n:
        layers = [l - 1 for l in layers]
    if layers != chosen:
        log(f"QUOTA: candidate layers {chosen} cannot meet budget {budget:g}; moved to {layers}")
    fit = fit_schedule([stats[l]["sensitivity"] for l in layers], layers, num_layers, v0, n, budget)
    # feature percentiles at each candidate layer, on the quantized forward with the schedule applied so far
    draft = Recipe(model_sha256=model_sha256(llava.source) if Path(str(llava.source)).is_dir() else "",
                   scheme=scheme.describe(), kv_bits=scheme.kv_bits, num_layers=num_layers, n=n, v0=v0,
                   pre_retention=pre_retention, layers=tuple(layers), keeps=tuple(fit["keeps"]),
                   ratios=tuple(fit["ratios"]), tau=fit["tau"], p_min=fit["p_min"], budget=budget,
                   achieved=fit["achieved"], weights=dict(weights or DEFAULT_WEIGHTS),
                   statistics={str(k): {f: (None if isinstance(x, float) and np.isnan(x) else x)
                                        for f, x in v.items()} for k, v in stats.items()})
    percentiles = {}
    for l in layers:
        values = {f: [] for f in FEATURES}
        for p, visual in inputs:
            earlier = [i for i, x in enumerate(layers) if x < l]
            use = None if not earlier else Recipe(**{
                **asdict(draft), "layers": tuple(layers[i] for i in earlier),
                "keeps": tuple(draft.keeps[i] for i in earlier), "ratios": tuple(draft.ratios[i] for i in earlier),
                "percentiles": percentiles})
            _, _, rec = prefill(quantized, use, p.inputs_embeds, p.attention_mask, p.position_ids, visual, trace=True)
            r = rec[l]
            feats = token_features(r["h"], r["attn"], visual_positions(r["visual"]), r["text"])
            for f in FEATURES:
                values[f].append(feats[f].flatten())
        percentiles[str(l)] = {f: [float(torch.quantile(torch.cat(v), 0.05)), float(torch.quantile(torch.cat(v), 0.95))]
                               for f, v in values.items()}
    log(f"QUOTA: layers {layers}, keeps {list(fit['keeps'])} of V0 = {v0}, tau {fit['tau']:g}, "
        f"p_min {fit['p_min']:.3f}, processed {draft.achieved:.3f} (budget {budget:g})")
    return Recipe(**{**asdict(draft), "percentiles": percentiles,
                     "calibration": {"pairs": len(pairs), "pre_retention": pre_retention,
                                     "candidate_layers_from_statistics": chosen}})


# ---------------------------------------------------------------------------------------------------------
# Evaluation at an equal budget

BASELINES = ("quota", "fastv", "visionzip", "qapruner")


def fastv_recipe(llava: Llava, budget: float, pre_retention: float = 1.0, layer: int = 2) -> Recipe:
    """FastV-style: one cut at `layer` by text→visual attention alone, sized to meet the budget."""
    n = llava.num_image_tokens
    v0 = max(1, math.ceil(pre_retention * n - 1e-9))
    num_layers = llava.model.config.text_config.num_hidden_layers
    k = None
    for cand in range(v0, 0, -1):  # the largest K that meets the budget
        if processed_fraction([cand], [layer], num_layers, v0, n) <= budget + 1 / n:
            k = cand
            break
    if k is None:
        raise ValueError(f"budget {budget:g} is unreachable with one cut at layer {layer} of {num_layers}")
    weights = {f: 1.0 if f == "text_attention" else 0.0 for f in FEATURES}
    return Recipe(model_sha256="", scheme={}, kv_bits=None, num_layers=num_layers, n=n, v0=v0,
                  pre_retention=pre_retention, layers=(layer,), keeps=(k,), ratios=(k / v0,), tau=0.0,
                  p_min=k / v0, budget=budget, achieved=processed_fraction([k], [layer], num_layers, v0, n),
                  weights=weights, percentiles={str(layer): {"text_attention": [0.0, 1.0]}})


@torch.no_grad()
def answer(llava: Llava, recipe: Recipe | None, images, prompts, *, pre_retention: float = 1.0,
           keep: int | None = None, scoring=None, positions: str = "original", max_new_tokens: int = 16) -> list[str]:
    """Answer each prompt about its image: QAPruner's cut to V₀ before the LLM (`prepare`), then the recipe
    inside it, greedy — the texts, as `qapruner.pipeline.answer` gives them."""
    p, visual = prepare(llava, images, prompts, pre_retention=pre_retention, keep=keep, scoring=scoring,
                        positions=positions)
    ids = generate(llava, recipe, p, visual, max_new_tokens=max_new_tokens)
    return [t.strip() for t in llava.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def accuracy(llava: Llava, recipe: Recipe | None, items, *, retention: float, scoring=None, batch: int = 25) -> float:
    """Exact match of the first answer word, with pre-LLM pruning at `retention` then the recipe in the LLM."""
    from PIL import Image

    from qapruner import data

    hits = 0
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        texts = answer(llava, recipe, [Image.fromarray(s.image) for s, _ in chunk],
                       [data.PROMPT.format(question=q.text) for _, q in chunk], pre_retention=retention,
                       scoring=scoring, max_new_tokens=2)
        hits += sum((t.split() or [""])[0] == q.answer for t, (_, q) in zip(texts, chunk))
    return hits / len(items)


def evaluate(llava: Llava, scheme: ptq.Scheme, *, budget: float, pre_retention: float, items, calib_pairs,
             methods=BASELINES, scoring=None) -> dict[str, dict]:
    """Accuracy of QUOTA and the stage-wise baselines at the same average budget under `scheme`:
    quota (QAPruner to V0, then the calibrated schedule), fastv (QAPruner to V0, then one text-attention cut at
    layer 2), visionzip (CLS-attention pruning to the budget before the LLM), qapruner (QAPruner's score to
    the budget before the LLM). Static scales / GPTQ are calibrated on the calibration pairs pruned as each
    method runs them. `scoring` is QAPruner's pre-LLM score (default `Scoring()`)."""
    from qapruner.pipeline import calibrator
    from qapruner.scoring import Scoring

    hybrid = scoring or Scoring()

    out = {}
    for m in methods:
        if m in ("quota", "fastv"):
            retention, scoring = pre_retention, hybrid
        else:
            retention = budget
            scoring = Scoring(semantic="cls", alpha=1.0, group_size=hybrid.group_size) if m == "visionzip" \
                else hybrid
        calib = calibrator(calib_pairs, retention=retention, scoring=scoring) if scheme.needs_calibration else None
        q = ptq.apply(llava, scheme, calib)
        recipe = None
        if m == "quota":  # calibrated on the model just quantized (the same pairs at the same cut)
            recipe = calibrate(llava, scheme, calib_pairs, budget=budget, pre_retention=pre_retention,
                               scoring=hybrid, quantized=q)
        elif m == "fastv":
            recipe = fastv_recipe(llava, budget, pre_retention)
        out[m] = {"accuracy": accuracy(q, recipe, items, retention=retention, scoring=scoring),
                  "processed": recipe.achieved if recipe is not None else retention,
                  "layers": list(recipe.layers) if recipe else [], "keeps": list(recipe.keeps) if recipe else []}
    return out


# ---------------------------------------------------------------------------------------------------------
# CLI

def _main(argv=None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m qapruner.quota", description="QUOTA recipes: calibrate, inspect")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="calibrate a layer-wise keep schedule under a low-bit scheme")
    c.add_argument("--model", required=True)
    c.add_argument("--scheme", default="w4a4", help="fp | w4a4 | w4a8 | w8a8 | w4a16 | w8a16")
    c.add_argument("--kv-bits", type=int, choices=[4, 8], default=None)
    c.add_argument("--weights", default="gptq", choices=["gptq", "rtn"])
    c.add_argument("--budget", type=float, default=0.30, help="average fraction of visual tokens per layer")
    c.add_argument("--pre", type=_pre, default=1.0, help="QAPruner pre-LLM retention (V0 = ceil(pre·N)), or auto: only "
                   "as much as the decoder's depth needs for the budget (quota.pre_retention_for)")
    c.add_argument("--calibration", default=None, help="calibration folder (default: 16 DigitsVQA train pairs)")
    c.add_argument("--calib-limit", type=int, default=16)
    c.add_argument("--out", required=True)
    i = sub.add_parser("info", help="print a recipe's schedule")
    i.add_argument("recipe")
    e = sub.add_parser("evaluate", help="QUOTA vs stage-wise baselines at one budget (DigitsVQA)")
    e.add_argument("--model", required=True)
    e.add_argument("--scheme", default="w4a4")
    e.add_argument("--weights", default="gptq", choices=["gptq", "rtn"])
    e.add_argument("--kv-bits", type=int, nargs="+", default=[4, 8])
    e.add_argument("--budget", type=float, default=0.30)
    e.add_argument("--pre", type=_pre, default="auto", help="pre-LLM retention for quota and fastv, or auto")
    e.add_argument("--questions", type=int, default=200)
    e.add_argument("--calib-seeds", type=int, default=3)
    e.add_argument("--out", required=True, help="results JSON (a Markdown table is written beside it)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "evaluate":
            return _evaluate_cli(args)
        if args.cmd == "info":
            r = Recipe.load(args.recipe)
            print(f"{args.recipe}: V0 = {r.v0} of N = {r.n}; layers {list(r.layers)} keep {list(r.keeps)}; "
                  f"tau {r.tau:g}, p_min {r.p_min:.3f}; processed {r.achieved:.3f} (budget {r.budget:g}); "
                  f"scheme {r.scheme.get('name')} kv {r.kv_bits}")
            return 0
        from qapruner.model import load

        llava = load(args.model)
        overrides = {"kv_bits": args.kv_bits}
        if args.weights == "gptq" and args.scheme not in ("fp",):
            overrides["w_method"] = "gptq"
        scheme = ptq.scheme_from_name(args.scheme, **overrides)
        if args.calibration:
            from export.calibration import load_pairs  # the shipped folder format

            pairs = load_pairs(args.calibration)[: args.calib_limit]
        else:
            from qapruner.evaluate import calibration_pairs

            pairs = calibration_pairs(0)[: args.calib_limit]
        args.pre = _resolve_pre(args.pre, args.budget, llava)
        recipe = calibrate(llava, scheme, pairs, budget=args.budget, pre_retention=args.pre,
                           log=lambda m: print(m, file=sys.stderr))
        if args.calibration:
            from export.calibration import dataset_sha256

            calib_sha = dataset_sha256(args.calibration)
        else:
            calib_sha = pairs_sha256(pairs)
        recipe = Recipe(**{**asdict(recipe), "calibration": {**recipe.calibration, "source": args.calibration
                                                             or "DigitsVQA train, seed 0", "sha256": calib_sha}})
        recipe.save(args.out)
        print(f"wrote {args.out}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def pairs_sha256(pairs) -> str:
    """sha256 over the calibration pairs' RGB pixels, sizes and prompts, in order."""
    import hashlib

    h = hashlib.sha256()
    for image, prompt in pairs:
        a = np.asarray(image.convert("RGB"))
        h.update(f"{a.shape}".encode())
        h.update(a.tobytes())
        h.update(prompt.encode())
    return h.hexdigest()


def _pre(text: str):
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--pre must be a retention in (0, 1] or auto, got {text!r}") from None
    if not 0 < value <= 1:
        raise ValueError(f"--pre must be in (0, 1], got {value:g}")
    return value


def _resolve_pre(pre, budget: float, llava: Llava) -> float:
    return pre_retention_for(budget, llava.model.config.text_config.num_hidden_layers) if pre == "auto" else pre


def _evaluate_cli(args) -> int:
    import statistics
    import sys

    from qapruner import data
    from qapruner.evaluate import accuracy as dense_accuracy
    from qapruner.evaluate import calibration_pairs
    from qapruner.model import load
    from qapruner.scoring import Scoring

    llava = load(args.model)
    args.pre = _resolve_pre(args.pre, args.budget, llava)
    items = data.questions("test", args.questions, seed=0)
    fp = dense_accuracy(llava, items, retention=1.0, scoring=Scoring())
    rows = []
    for kv in args.kv_bits:
        scheme = ptq.scheme_from_name(args.scheme, kv_bits=kv, w_method=args.weights)
        for seed in range(args.calib_seeds):
            res = evaluate(llava, scheme, budget=args.budget, pre_retention=args.pre, items=items,
                           calib_pairs=calibration_pairs(seed))
            for m, r in res.items():
                rows.append({"method": m, "kv_bits": kv, "calib_seed": seed, **r})
                print(f"kv{kv} seed {seed} {m}: {100 * r['accuracy']:.1f}% (processed {r['processed']:.3f})",
                      file=sys.stderr)
    doc = {"model": args.model, "scheme": args.scheme, "weights": args.weights, "budget": args.budget,
           "pre_retention": args.pre, "questions": args.questions, "fp_dense_accuracy": fp, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out)
    lines = [f"# QUOTA vs stage-wise pruning at an average budget of {args.budget:g}", "",
             f"`python -m qapruner.quota evaluate --model {args.model} --scheme {args.scheme} --weights {args.weights} "
             f"--budget {args.budget:g} --pre {args.pre:.4g} --questions {args.questions} --calib-seeds "
             f"{args.calib_seeds} --kv-bits {' '.join(map(str, args.kv_bits))}`. {args.scheme.upper()} *simulated* "
             f"({args.weights} weights), KV cache quantized as shown; accuracy on {args.questions} DigitsVQA test "
             f"questions, mean ± std over calibration seeds; retention = % of the float model with all tokens "
             f"({100 * fp:.1f}%). quota and fastv prune to V0 = {args.pre:.4g}·N with QAPruner before the LLM, then "
             "inside it; visionzip and qapruner prune to the budget before the LLM.", "",
             "| method | KV bits | processed | accuracy | retention |", "|---|---|---|---|---|"]
    for kv in args.kv_bits:
        for m in BASELINES:
            accs = [r["accuracy"] for r in rows if r["method"] == m and r["kv_bits"] == kv]
            proc = next(r["processed"] for r in rows if r["method"] == m and r["kv_bits"] == kv)
            mean = statistics.mean(accs)
            std = statistics.pstdev(accs) if len(accs) > 1 else 0.0
            lines.append(f"| {m} | {kv} | {proc:.3f} | {100 * mean:.1f} ± {100 * std:.1f} | {100 * mean / fp:.1f}% |")
    md = out.with_suffix(".md")
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, md)
    print(f"wrote {out} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
