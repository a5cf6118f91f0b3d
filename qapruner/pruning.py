"""Budgeted top-K selection and gathering of visual tokens (QAPruner §3.2, last step)."""
from __future__ import annotations

import math
import numbers

import torch


def resolve_k(n: int, keep: int | None = None, retention: float | None = None) -> int:
    """K from exactly one of `keep` (1 ≤ keep ≤ n) or `retention` ∈ (0, 1] (K = ceil(retention·n))."""
    if (keep is None) == (retention is None):
        raise ValueError("give exactly one of keep (a token count) or retention (a fraction)")
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, numbers.Integral):
            raise ValueError(f"keep must be an integer, got {keep!r}")
        if not 1 <= keep <= n:
            raise ValueError(f"keep must be in [1, {n}] (the image has {n} visual tokens), got {keep}")
        return int(keep)
    if isinstance(retention, bool) or not isinstance(retention, numbers.Real) or not 0 < retention <= 1:
        raise ValueError(f"retention must be a fraction in (0, 1], got {retention!r}")
    # ceil with a 1e-9-token tolerance: 0.3·10 is 3.0000000000000004 in floating point and means 3 tokens
    return max(1, math.ceil(float(retention) * n - 1e-9))


def select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the top-k scores per row, in ascending original order. scores [B, N] -> [B, k] int64.

    Ties go to the lower index (a stable descending sort keeps equal scores in index order).
    """
    if not torch.is_tensor(scores) or scores.dim() != 2:
        raise ValueError(f"scores must be a tensor [B, N], got "
                         f"{tuple(scores.shape) if torch.is_tensor(scores) else type(scores).__name__}")
    n = scores.shape[1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, {n}], got {k!r}")
    k = int(k)
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.sort(order, dim=1).values


def prune(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather kept tokens: features [B, N, D], indices [B, k] -> [B, k, D]."""
    if features.dim() != 3:
        raise ValueError(f"features must be [B, N, D], got {tuple(features.shape)}")
    if indices.dim() != 2 or indices.shape[0] != features.shape[0] or indices.dtype != torch.int64:
        raise ValueError(f"indices must be int64 [B, k] with B = {features.shape[0]}, got "
                         f"{indices.dtype} {tuple(indices.shape)}")
    if indices.numel() and (indices.min() < 0 or indices.max() >= features.shape[1]):
        raise ValueError(f"indices out of range [0, {features.shape[1]})")
    return torch.gather(features, 1, indices[:, :, None].expand(-1, -1, features.shape[-1]))
