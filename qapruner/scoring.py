"""QAPruner's token score (QAPruner §3.2, Eq. 1-5) and the semantic scores it is fused with.

For projected visual tokens v_i ∈ R^D (what enters the LLM), i = 1..N, per image:
  E_i  = ||v_i − Q(v_i)||₂   Q: symmetric group-wise fake quantization (Eq. 1-2)
  R_i  = max_j v_ij − min_j v_ij                                            (Eq. 3)
  S^Q  = ½·norm(E) + ½·norm(R)                                              (Eq. 4)
  S    = α·norm(S^P) + (1 − α)·S^Q                                          (Eq. 5)
norm is min-max over the N tokens of one image; a constant vector normalises to zeros.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from qapruner.quant import fake_quantize

SQ_MODES = ("hybrid", "error", "range")
SEMANTIC_SOURCES = ("cls", "text", None)


@dataclass(frozen=True)
class Scoring:
    """How tokens are scored. `semantic`: "cls" (vision tower CLS attention, VisionZip style),
    "text" (cosine similarity to the prompt's mean text embedding, CDPruner style) or None."""
    semantic: str | None = "cls"
    alpha: float = 0.7
    group_size: int = 128
    bits: int = 4
    sq_mode: str = "hybrid"

    def __post_init__(self):
        if self.semantic not in SEMANTIC_SOURCES:
            raise ValueError(f"semantic must be one of {SEMANTIC_SOURCES}, got {self.semantic!r}")
        _check_args(self.alpha, self.group_size, self.bits, self.sq_mode)
        if self.semantic is None and self.alpha == 1:
            raise ValueError("alpha=1 ranks by the semantic score alone: choose semantic 'cls' or 'text'")


def _check_args(alpha, group_size, bits, sq_mode) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8], got {bits!r}")
    if sq_mode not in SQ_MODES:
        raise ValueError(f"sq_mode must be one of {SQ_MODES}, got {sq_mode!r}")


def _check_features(features: torch.Tensor) -> None:
    if not torch.is_tensor(features) or features.dim() != 3 or not features.is_floating_point():
        raise ValueError("features must be a float tensor [B, N, D], got "
                         f"{tuple(features.shape) if torch.is_tensor(features) else type(features).__name__}")
    if features.shape[1] == 0:
        raise ValueError("features hold no tokens (N = 0)")
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or Inf values")


def minmax_normalize(x: torch.Tensor) -> torch.Tensor:
    """Min-max over the last dimension ([B, N] -> [B, N] in [0, 1]); a constant row becomes zeros."""
    lo = x.amin(dim=-1, keepdim=True)
    span = x.amax(dim=-1, keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(x))


def _check_groups(features: torch.Tensor, group_size: int) -> None:
    if features.shape[-1] % group_size:
        raise ValueError(f"group_size {group_size} does not divide the feature dimension D = "
                         f"{features.shape[-1]}; pick a divisor of D")


def _error(v: torch.Tensor, group_size: int, bits: int) -> torch.Tensor:
    return (v - fake_quantize(v, bits, symmetric=True, granularity="group", group_size=group_size)).norm(dim=-1)


def _range(v: torch.Tensor) -> torch.Tensor:
    return v.amax(dim=-1) - v.amin(dim=-1)


def quantization_error(features: torch.Tensor, group_size: int = 128, bits: int = 4) -> torch.Tensor:
    """E_i = ||v_i − Q(v_i)||₂ (QAPruner Eq. 1-2): [B, N, D] -> [B, N], computed in float32."""
    _check_features(features)
    _check_groups(features, group_size)
    return _error(features.float(), group_size, bits)


def token_range(features: torch.Tensor) -> torch.Tensor:
    """R_i = max_j v_ij − min_j v_ij (QAPruner Eq. 3): [B, N, D] -> [B, N]."""
    _check_features(features)
    return _range(features.float())


def score_terms(features: torch.Tensor, semantic: torch.Tensor | None, alpha: float, group_size: int, bits: int,
                sq_mode: str) -> dict[str, torch.Tensor]:
    """The arithmetic of `hybrid_scores` (Eq. 1-5) with no value checks: no data-dependent branch, so
    `torch.onnx.export` can trace it (the exported vision graph scores with exactly this). Inputs as there."""
    v = features.float()
    E, R = _error(v, group_size, bits), _range(v)
    sq = {"hybrid": lambda: 0.5 * minmax_normalize(E) + 0.5 * minmax_normalize(R),
          "error": lambda: minmax_normalize(E),
          "range": lambda: minmax_normalize(R)}[sq_mode]()
    sp = torch.zeros_like(sq) if semantic is None else minmax_normalize(semantic.float())  # S^P = 0: S ranks as S^Q
    return {"E": E, "R": R, "SQ": sq, "SP": sp, "S": alpha * sp + (1 - alpha) * sq}


def hybrid_scores(features: torch.Tensor, semantic: torch.Tensor | None = None, alpha: float = 0.7,
                  group_size: int = 128, bits: int = 4, sq_mode: str = "hybrid") -> dict[str, torch.Tensor]:
    """QAPruner's fused score (Eq. 4-5). features [B, N, D], semantic [B, N] (raw; normalised here) or None.

    Returns float32 tensors E, R, SQ, SP, S, each [B, N]. Without a semantic score SP is zeros.
    """
    _check_features(features)
    _check_args(alpha, group_size, bits, sq_mode)
    alpha, group_size, bits = float(alpha), int(group_size), int(bits)  # numpy scalars welcome
    _check_groups(features, group_size)
    B, N, _ = features.shape
    if semantic is None:
        if alpha == 1:
            raise ValueError("alpha=1 ranks by the semantic score alone, but no semantic score was given")
    elif not torch.is_tensor(semantic) or tuple(semantic.shape) != (B, N):
        raise ValueError(f"semantic must be a tensor [B, N] = [{B}, {N}], got "
                         f"{tuple(semantic.shape) if torch.is_tensor(semantic) else type(semantic).__name__}")
    scores = score_terms(features, semantic, alpha, group_size, bits, sq_mode)
    if torch.isnan(scores["S"]).any():
        raise ValueError("scores contain NaN: the semantic score holds NaN or Inf values")
    return scores


def cls_attention(attentions: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """VisionZip-style semantic score: attention of the CLS query to every key, mean over heads.

    attentions [B, H, 1+P, 1+P] (CLS first) from the vision layer whose output LLaVA takes as features.
    Returns [B, num_tokens]: the P patch scores when the CLS token is dropped ("default" strategy,
    num_tokens = P), or CLS's own score followed by them ("full", num_tokens = 1+P).
    """
    if attentions.dim() != 4 or attentions.shape[-1] != attentions.shape[-2]:
        raise ValueError(f"attentions must be [B, H, T, T], got {tuple(attentions.shape)}")
    row = attentions[:, :, 0, :].float().mean(dim=1)  # [B, 1+P]
    if num_tokens == row.shape[-1] - 1:
        return row[:, 1:]
    if num_tokens == row.shape[-1]:
        return row
    raise ValueError(f"{num_tokens} visual tokens do not match attention over {row.shape[-1]} positions")


def text_relevance(features: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
    """CDPruner-style semantic score: cos(v_i, t̄) with t̄ the mean of the prompt's text-token embeddings in
    the LLM input space. features [B, N, D], text_embedding [B, D] -> [B, N]."""
    _check_features(features)
    if text_embedding.dim() != 2 or text_embedding.shape != (features.shape[0], features.shape[-1]):
        raise ValueError(f"text_embedding must be [B, D] = [{features.shape[0]}, {features.shape[-1]}], got "
                         f"{tuple(text_embedding.shape)}")
    return torch.nn.functional.cosine_similarity(features.float(), text_embedding.float()[:, None, :], dim=-1)
