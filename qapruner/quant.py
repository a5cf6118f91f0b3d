"""Quantization primitives: pure tensor functions, no modules, no state.

Integer grid (QAPruner §3.2 for the symmetric case):
  symmetric:  scale = max|x| / (2^(b-1) - 1),            q = clamp(round(x/scale), -2^(b-1), 2^(b-1) - 1)
  asymmetric: scale = (max(x,0) - min(x,0)) / (2^b - 1),  zero = round(-min(x,0)/scale),
              q = clamp(round(x/scale) + zero, 0, 2^b - 1)
  dequantize: (q - zero) * scale

Granularity says which elements share one (scale, zero):
  "tensor"  one pair for the whole tensor
  "channel" one pair per index along `axis` (weights [out, in]: axis=0 is per output channel)
  "token"   one pair per row of the last dimension (activations [..., T, D]: per token)
  "group"   one pair per `group_size` consecutive elements of the last dimension

Rounding is half-to-even (torch.round), the same as ONNX QuantizeLinear. A group whose range is zero
gets scale 0 and dequantizes to exactly 0 (for the symmetric case that is an all-zero group).
"""
from __future__ import annotations

import torch

GRANULARITIES = ("tensor", "channel", "token", "group")


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a `bits`-bit grid: [-2^(b-1), 2^(b-1)-1] symmetric, [0, 2^b-1] asymmetric."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8], got {bits!r}")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _check(x: torch.Tensor, granularity: str, group_size: int | None, axis: int) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {type(x).__name__}"
                        f"{'' if not torch.is_tensor(x) else ' of ' + str(x.dtype)}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity != "tensor" and x.dim() == 0:
        raise ValueError(f"granularity {granularity!r} needs a tensor with at least one dimension")
    if granularity == "channel" and not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} out of range for a tensor of shape {tuple(x.shape)}")
    if granularity == "group":
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group granularity needs a positive integer group_size, got {group_size!r}")
        if x.shape[-1] % group_size:
            raise ValueError(f"group_size {group_size} does not divide the last dimension {x.shape[-1]}"
                             f" of shape {tuple(x.shape)}")


def _reduce_dims(x: torch.Tensor, granularity: str, axis: int) -> tuple[int, ...]:
    if granularity == "tensor":
        return tuple(range(x.dim()))
    if granularity == "channel":
        axis %= x.dim()
        return tuple(d for d in range(x.dim()) if d != axis)
    return (x.dim() - 1,)  # token, and group on the grouped view


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    # [..., D] -> [..., D/G, G]
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def compute_params(x: torch.Tensor, bits: int, *, symmetric: bool = True, granularity: str = "tensor",
                   group_size: int | None = None, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max (scale, zero) for `x`, ready for `quantize(x, scale, zero, ...)`.

    Shapes: broadcastable to `x` for tensor/channel/token; [..., D/G] for group (one per group; `quantize`
    expands them). `zero` is None when symmetric (the signed grid has no zero point).
    """
    _check(x, granularity, group_size, axis)
    qmin, qmax = qrange(bits, symmetric)
    v = _grouped(x, group_size) if granularity == "group" else x
    dims = _reduce_dims(v, granularity, axis)
    if symmetric:
        scale = v.abs().amax(dim=dims, keepdim=True) / qmax
        zero = None
    else:
        lo = v.amin(dim=dims, keepdim=True).clamp(max=0)
        hi = v.amax(dim=dims, keepdim=True).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
        zero = torch.round(-lo / torch.where(scale > 0, scale, torch.ones_like(scale)))
    if granularity == "group":
        scale = scale.squeeze(-1)
        zero = None if zero is None else zero.squeeze(-1)
    return scale, zero


def _view(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    # the data as the parameters see it: [..., D], or [..., D/G, G] for groups
    return x if group_size is None else _grouped(x, group_size)


def _expand(p: torch.Tensor, x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """`p` made broadcastable to `_view(x, group_size)` (group parameters [..., D/G] -> [..., D/G, 1]: each
    group's parameter is broadcast over its G elements, never copied G times)."""
    shape = tuple(p.shape)
    if group_size is not None:
        if p.shape[-1] * group_size != x.shape[-1]:
            raise ValueError(f"group parameters of shape {shape} do not match data of shape "
                             f"{tuple(x.shape)} with group_size {group_size}")
        p = p[..., None]
    try:
        torch.broadcast_shapes(p.shape, _view(x, group_size).shape)
    except RuntimeError:
        raise ValueError(f"parameters of shape {shape} do not broadcast to data of shape "
                         f"{tuple(x.shape)}") from None
    return p


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None, *, bits: int,
             group_size: int | None = None) -> torch.Tensor:
    """Map `x` onto the integer grid. Symmetric when `zero` is None (int8 result), else asymmetric (uint8).

    `scale`/`zero` broadcast to `x`, or with `group_size` have shape [..., D/G].
    """
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError("quantize expects a floating-point tensor")
    if group_size is not None and (group_size <= 0 or x.shape[-1] % group_size):
        raise ValueError(f"group_size {group_size} does not divide the last dimension {x.shape[-1]}")
    symmetric = zero is None
    qmin, qmax = qrange(bits, symmetric)
    s = _expand(scale, x, group_size)
    safe = torch.where(s > 0, s, torch.ones_like(s))  # zero-range group: q = zero point, dequantizes to 0
    # (its data is all zeros: a symmetric group of zeros, or an asymmetric range clamped to include 0)
    q = torch.round(_view(x, group_size) / safe)
    if not symmetric:
        q = q + _expand(zero, x, group_size)
    return q.clamp(qmin, qmax).to(torch.int8 if symmetric else torch.uint8).reshape(x.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None, *,
               group_size: int | None = None) -> torch.Tensor:
    """(q - zero) * scale, in the dtype of `scale`."""
    if not torch.is_tensor(q) or q.is_floating_point():
        raise TypeError("dequantize expects an integer tensor")
    s = _expand(scale, q, group_size)
    v = _view(q, group_size).to(s.dtype)
    if zero is not None:
        v = v - _expand(zero, q, group_size).to(s.dtype)
    return (v * s).reshape(q.shape)


def fake_quantize(x: torch.Tensor, bits: int, *, symmetric: bool = True, granularity: str = "tensor",
                  group_size: int | None = None, axis: int = 0, scale: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize(quantize(x)) with min-max parameters, or with a given symmetric `scale` (static
    calibration). Same shape and dtype as `x`.
    """
    _check(x, granularity, group_size, axis)
    gs = group_size if granularity == "group" else None
    if scale is None:
        scale, zero = compute_params(x, bits, symmetric=symmetric, granularity=granularity,
                                     group_size=group_size, axis=axis)
    else:
        if not symmetric:
            raise ValueError("a given scale is only supported for symmetric quantization")
        zero = None
    q = quantize(x, scale, zero, bits=bits, group_size=gs)
    return dequantize(q, scale.to(x.dtype), zero, group_size=gs)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10·log10(||ref||² / ||ref − approx||²), in dB."""
    if reference.shape != approx.shape:
        raise ValueError(f"shape mismatch: {tuple(reference.shape)} vs {tuple(approx.shape)}")
    signal = reference.double().pow(2).sum()
    noise = (reference.double() - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
