"""Simulated post-training quantization of a LLaVA: schemes, fake-quantized linears, QuaRot rotation,
RTN / GPTQ weights, dynamic or static activations, and a fake-quantized KV cache.

Everything is simulation (fake quantization in float), the accuracy-study side of the project. Which of
these run for real where: TensorRT has INT8 Q/DQ (W8A8, static per-tensor activations) and INT4 weight-only
(W4A16); ONNX Runtime's MatMulNBits runs W4A8; no deployed engine runs W4A4.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn
from transformers import DynamicCache

from qapruner.model import Llava
from qapruner.quant import compute_params, fake_quantize, qrange

_BITS = (None, 2, 3, 4, 5, 6, 7, 8)


@dataclass(frozen=True)
class Scheme:
    """A simulated quantization scheme for the LLM's linear layers (and optionally the vision side).

    w_bits / a_bits / kv_bits: None keeps that part in float.
    Weights: symmetric, per output channel or in groups of `w_group_size` input channels; RTN or GPTQ.
    Activations: "dynamic" = asymmetric min-max per token (or per `a_group_size` channels of a token), as the
    QAPruner paper's PTQ; "static" = symmetric per-tensor scales calibrated offline, as TensorRT INT8.
    rotate: QuaRot-style random Hadamard rotation of the residual stream and online Hadamard before down_proj.
    vision: also quantize the vision tower and projector (no rotation there).
    sequential: calibrate block by block (vision tower, projector, then each decoder layer), each block's
    statistics taken with every earlier block already quantized — GPTQ's order, and the activation ranges the
    deployed low-bit model really produces (QUOTA's point). False: one pass over the float model.
    """
    w_bits: int | None = None
    a_bits: int | None = None
    w_granularity: str = "group"
    w_group_size: int = 128
    w_method: str = "rtn"
    a_mode: str = "dynamic"
    a_group_size: int | None = None
    rotate: bool = False
    kv_bits: int | None = None
    vision: bool = False
    gptq_damp: float = 0.01
    sequential: bool = True
    seed: int = 0

    def __post_init__(self):
        for f in ("w_bits", "a_bits", "kv_bits"):
            v = getattr(self, f)
            if v is not None and (type(v) is not int or v not in _BITS):
                raise ValueError(f"{f} must be None (float) or an integer in [2, 8], got {v!r}")
        for f in ("rotate", "vision", "sequential"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{f} must be True or False, got {getattr(self, f)!r}")
        if type(self.seed) is not int:
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.w_granularity not in ("channel", "group"):
            raise ValueError(f"w_granularity must be 'channel' or 'group', got {self.w_granularity!r}")
        for f in ("w_group_size", "a_group_size"):
            v = getattr(self, f)
            if v is not None and (type(v) is not int or v <= 0):
                raise ValueError(f"{f} must be a positive integer, got {v!r}")
        if self.w_method not in ("rtn", "gptq"):
            raise ValueError(f"w_method must be 'rtn' or 'gptq', got {self.w_method!r}")
        if self.w_method == "gptq" and self.w_bits is None:
            raise ValueError("GPTQ needs quantized weights (w_bits)")
        if self.a_mode not in ("dynamic", "static"):
            raise ValueError(f"a_mode must be 'dynamic' or 'static', got {self.a_mode!r}")
        if self.a_mode == "static" and self.a_group_size is not None:
            raise ValueError("static activation scales are per tensor: a_group_size applies to dynamic only")
        if not self.gptq_damp > 0:
            raise ValueError(f"gptq_damp must be > 0, got {self.gptq_damp!r}")

    @property
    def name(self) -> str:
        """w{W}a{A}[kv{K}], 16 standing for float; 'fp' when nothing is quantized."""
        if self.w_bits is None and self.a_bits is None and self.kv_bits is None:
            return "fp"
        base = f"w{self.w_bits or 16}a{self.a_bits or 16}"
        return base + (f"kv{self.kv_bits}" if self.kv_bits else "")

    @property
    def needs_calibration(self) -> bool:
        return (self.a_bits is not None and self.a_mode == "static") or self.w_method == "gptq"

    def describe(self) -> dict:
        return {"name": self.name, **{f: getattr(self, f) for f in self.__dataclass_fields__}}


# The deployable schemes and the simulated W4A4; CLI strings map here and nowhere else.
PRESETS = {
    "fp": Scheme(),
    "w4a4": Scheme(w_bits=4, a_bits=4),
    "w4a8": Scheme(w_bits=4, a_bits=8),
    "w8a8": Scheme(w_bits=8, a_bits=8, w_granularity="channel"),
    "w4a16": Scheme(w_bits=4),
    "w8a16": Scheme(w_bits=8, w_granularity="channel"),
}


def scheme_from_name(name: str, **overrides) -> Scheme:
    if name not in PRESETS:
        raise ValueError(f"unknown scheme {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------------------------------------
# Weights

def rtn_weight(w: torch.Tensor, bits: int, granularity: str, group_size: int,
               return_scale: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric fake quantization of a weight [out, in]. With `return_scale`, also the
    scales [out, in/G] ("group") or [out, 1] ("channel"): the weight is exactly codes · scale."""
    if w.dim() != 2:
        raise ValueError(f"weights must be [out, in], got {tuple(w.shape)}")
    if granularity == "group":
        q = fake_quantize(w, bits, granularity="group", group_size=group_size)
        scale = compute_params(w, bits, granularity="group", group_size=group_size)[0]
    else:
        q = fake_quantize(w, bits, granularity="channel", axis=0)
        scale = compute_params(w, bits, granularity="channel", axis=0)[0]
    return (q, scale) if return_scale else q


def gptq_weight(w: torch.Tensor, hessian: torch.Tensor, bits: int, granularity: str, group_size: int,
                damp: float = 0.01, block: int = 128,
                return_scale: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al., 2023, Alg. 1): quantize columns in order, spreading each column's error over the
    not-yet-quantized columns through the inverse Hessian's Cholesky factor. w [out, in],
    hessian [in, in] = Σ xᵀx over calibration tokens. Returns the fake-quantized weight [out, in] (and with
    `return_scale` the scales used, [out, in/G] or [out, 1], so that the weight is exactly codes · scale)."""
    out_f, in_f = w.shape
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"hessian must be [{in_f}, {in_f}], got {tuple(hessian.shape)}")
    if granularity == "group" and in_f % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_f}")
    qmin, qmax = qrange(bits, True)
    W = w.detach().double().clone()
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(in_f, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    if granularity == "group":
        block = group_size * max(1, block // group_size)  # a group never straddles two blocks
    else:
        scale = W.abs().amax(dim=1) / qmax
    scales = []
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = W[:, i1:i2].clone()
        err = torch.zeros_like(W1)
        for j in range(i2 - i1):
            col = i1 + j
            if granularity == "group" and col % group_size == 0:
                scale = W1[:, j:j + group_size].abs().amax(dim=1) / qmax
                scales.append(scale)
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.clamp(torch.round(W1[:, j] / safe), qmin, qmax) * scale
            Q[:, col] = q
            e = (W1[:, j] - q) / U[col, col]
            W1[:, j:] -= e[:, None] * U[col, col:i2][None, :]
            err[:, j] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    if not return_scale:
        return Q.to(w.dtype)
    scale = torch.stack(scales, 1) if granularity == "group" else scale[:, None]
    # float32 codes·scale must reproduce the float32 weight: round through the stored dtype
    return Q.to(w.dtype), scale.to(w.dtype)


# ---------------------------------------------------------------------------------------------------------
# The fake-quantized linear

class QuantLinear(nn.Module):
    """y = fq_a(x·T) · fq_w(W·T)ᵀ + b. T is an optional orthogonal input transform (online Hadamard); with
    `observe` on, it accumulates what calibration needs: max |x| (static scales) and Σ xᵀx (GPTQ)."""

    def __init__(self, linear: nn.Linear, transform: torch.Tensor | None = None):
        super().__init__()
        w = linear.weight.detach()
        if transform is not None:
            w = (w.double() @ transform.double()).to(w.dtype)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(w.clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.register_buffer("transform", None if transform is None else transform.to(w.dtype))  # no copy if same dtype
        self.register_buffer("act_scale", None)
        self.register_buffer("w_scale", None)  # [out, in/G] or [out, 1] once weights are quantized
        self.w_bits: int | None = None
        self.a_bits: int | None = None
        self.a_mode = "dynamic"
        self.a_group_size: int | None = None
        self.observe = False
        self.want_hessian = False
        self.amax = torch.zeros(())
        self.hessian: torch.Tensor | None = None
        self.tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            x = x @ self.transform
        if self.observe:
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            self.amax = torch.maximum(self.amax, flat.abs().max().float())
            if self.want_hessian:
                h = flat.T @ flat
                self.hessian = h if self.hessian is None else self.hessian + h
            self.tokens += flat.shape[0]
        if self.a_bits is not None:
            if self.a_mode == "static":
                x = fake_quantize(x, self.a_bits, symmetric=True, scale=self.act_scale)
            elif self.a_group_size is None:
                x = fake_quantize(x, self.a_bits, symmetric=False, granularity="token")
            else:
                x = fake_quantize(x, self.a_bits, symmetric=False, granularity="group", group_size=self.a_group_size)
        return nn.functional.linear(x, self.weight, self.bias)

    def finalize(self, scheme: Scheme, name: str) -> None:
        """Quantize the weight and fix the activation quantizer from what was observed."""
        self.observe = False
        if scheme.w_bits is not None:
            if scheme.w_granularity == "group" and self.in_features % scheme.w_group_size:
                raise ValueError(f"weight group size {scheme.w_group_size} does not divide in_features "
                                 f"{self.in_features} of {name}")
            if scheme.w_method == "gptq":
                if self.hessian is None:
                    raise ValueError(f"GPTQ saw no calibration input for {name}")
                w, scale = gptq_weight(self.weight, self.hessian, scheme.w_bits, scheme.w_granularity,
                                       scheme.w_group_size, scheme.gptq_damp, return_scale=True)
            else:
                w, scale = rtn_weight(self.weight, scheme.w_bits, scheme.w_granularity, scheme.w_group_size,
                                      return_scale=True)
            self.weight.data.copy_(w)
            # weight == codes · w_scale: the exporter writes these codes as INT4/INT8 initializers
            self.w_scale, self.w_bits = scale.to(self.weight.dtype), scheme.w_bits
        self.hessian = None
        if scheme.a_bits is not None:
            if scheme.a_mode == "dynamic" and scheme.a_group_size and self.in_features % scheme.a_group_size:
                raise ValueError(f"activation group size {scheme.a_group_size} does not divide in_features "
                                 f"{self.in_features} of {name}")
            if scheme.a_mode == "static":
                if self.tokens == 0:
                    raise ValueError(f"static activation scales need calibration, and {name} saw no input")
                self.act_scale = (self.amax / qrange(scheme.a_bits, True)[1]).to(self.weight.dtype)
            self.a_bits, self.a_mode, self.a_group_size = scheme.a_bits, scheme.a_mode, scheme.a_group_size


# ---------------------------------------------------------------------------------------------------------
# Rotation (QuaRot, Ashkboos et al., 2024): fold RMSNorm scales into the next linears, then rotate the
# residual stream by an orthogonal Q. Function-preserving in float; spreads outlier channels for quantization.

def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """Orthogonal [n, n] float64. With n = 2^k·m (m odd): the normalised Sylvester Hadamard of size 2^k with
    random column signs, Kronecker a random orthogonal m×m (QR of a Gaussian) — a pure random Hadamard when
    n is a power of two (LLaMA-7B's 4096), and cheap for the rest (11008 = 256·43)."""
    if n < 1:
        raise ValueError(f"rotation size must be ≥ 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    p2 = n & -n  # largest power of two dividing n
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p2:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (p2,), generator=g).double() * 2 - 1
    h = h / math.sqrt(p2) * signs[None, :]
    m = n // p2
    if m == 1:
        return h
    q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    return torch.kron(h.contiguous(), (q * torch.sign(torch.diagonal(r))[None, :]).contiguous())


def _set_weight(linear: nn.Module, w: torch.Tensor) -> None:
    linear.weight = nn.Parameter(w.to(linear.weight.dtype).contiguous(), requires_grad=False)


@torch.no_grad()
def _is_scaled_rmsnorm(norm: nn.Module) -> bool:
    w = getattr(norm, "weight", None)
    if w is None or w.dim() != 1:
        return False
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.dtype)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    ref = w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(w.dtype)
    return torch.allclose(norm(x).float(), ref.float(), rtol=1e-2, atol=1e-3)


def rotate_(model, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate a Llama-style decoder in place. Returns (Q [D, D], H [I, I]): the LLM's inputs must be
    multiplied by Q (we keep the embedding table and projector unrotated, so that scoring sees the original
    features), and down_proj's input by H (QuantLinear's transform)."""
    lm = model.model.language_model
    first = lm.layers[0]
    needed = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
    if not all(hasattr(first, a) for a in needed) or not hasattr(first.mlp, "down_proj"):
        raise ValueError(f"rotation supports Llama-style decoders, not {type(lm).__name__}")
    for norm in (first.input_layernorm, first.post_attention_layernorm, lm.norm):
        if not _is_scaled_rmsnorm(norm):
            raise ValueError(f"rotation folds norms of the form w·x/rms(x); {type(norm).__name__} is not one")
    D = lm.config.hidden_size
    Q = random_hadamard(D, seed)
    H = random_hadamard(first.mlp.down_proj.in_features, seed + 1)

    def fold(norm, linears):
        g = norm.weight.detach().double()
        for lin in linears:
            _set_weight(lin, lin.weight.detach().double() * g[None, :] @ Q)
        norm.weight.data.fill_(1.0)

    def rotate_out(lin):
        _set_weight(lin, Q.T @ lin.weight.detach().double())
        if lin.bias is not None:
            lin.bias = nn.Parameter((lin.bias.detach().double() @ Q).to(lin.bias.dtype), requires_grad=False)

    for layer in lm.layers:
        at, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, (at.q_proj, at.k_proj, at.v_proj))
        fold(layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))
        rotate_out(at.o_proj)
        rotate_out(mlp.down_proj)
    head = model.lm_head  # a new Parameter: unties it from the (unrotated) embedding table
    _set_weight(head, head.weight.detach().double() * lm.norm.weight.detach().double()[None, :] @ Q)
    lm.norm.weight.data.fill_(1.0)
    return Q.float(), H


# ---------------------------------------------------------------------------------------------------------
# KV cache

class QuantizedKVCache(DynamicCache):
    """A DynamicCache whose stored keys (after RoPE) and values are fake-quantized on write: asymmetric
    min-max per token and head over head_dim, `bits` bits."""

    def __init__(self, bits: int, config=None):
        super().__init__(config=config)
        qrange(bits, False)
        self.bits = bits

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # [B, heads, T, head_dim]
        k = fake_quantize(key_states, self.bits, symmetric=False, granularity="token")
        v = fake_quantize(value_states, self.bits, symmetric=False, granularity="token")
        return super().update(k, v, layer_idx, *args, **kwargs)


def make_cache(llava: Llava) -> DynamicCache:
    """The KV cache a generation with this model should use."""
    kv = getattr(llava.scheme, "kv_bits", None)
    config = llava.model.config  # layer types (full or sliding-window attention) come from it
    return QuantizedKVCache(kv, config) if kv else DynamicCache(config=config)


# ---------------------------------------------------------------------------------------------------------
# Applying a scheme

def _targets(model, scheme: Scheme) -> dict[str, nn.Linear]:
    roots = {"model.language_model": model.model.language_model}
    if scheme.vision:
        roots["model.vision_tower"] = model.model.vision_tower
        roots["model.multi_modal_projector"] = model.model.multi_modal_projector
    return {f"{prefix}.{name}": m for prefix, root in roots.items() for name, m in root.named_modules()
            if isinstance(m, nn.Linear)}


def _swap(model, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def quant_linears(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def apply(llava: Llava, scheme: Scheme, calibrate: Callable[[Llava], None] | None = None) -> Llava:
    """A fake-quantized copy of `llava` under `scheme`; the input is left unchanged.

    Order: rotate (if asked) → wrap the target linears → run `calibrate(float_rotated_llava)` when the scheme
    needs statistics (static activation scales, GPTQ Hessians) → quantize weights, fix activation quantizers.
    `calibrate` runs forward passes, e.g. `qapruner.pipeline.calibrator(pairs, keep=K)` so that the LLM's
    activation ranges come from the pruned token set the deployment will see. The LM head stays in float.
    """
    if not isinstance(scheme, Scheme):
        raise TypeError(f"scheme must be a qapruner.ptq.Scheme, got {type(scheme).__name__}")
    if llava.scheme is not None:
        raise ValueError("the model is already quantized: apply a scheme to the float model")
    if scheme.needs_calibration and calibrate is None:
        raise ValueError(f"scheme {scheme.name} ({scheme.a_mode} activations, {scheme.w_method} weights) needs "
                         "calibration data: pass calibrate=qapruner.pipeline.calibrator(pairs, ...)")
    model = copy.deepcopy(llava.model)
    rotation, ffn = rotate_(model, scheme.seed) if scheme.rotate else (None, None)
    if scheme.w_bits is None and scheme.a_bits is None and ffn is None:
        return llava.replace(model=model, scheme=scheme)  # float weights and activations (KV cache aside)
    if ffn is not None:
        ffn = ffn.to(model.dtype)  # one tensor shared by every down_proj
    wrappers = {}
    for name, lin in _targets(model, scheme).items():
        online = ffn is not None and name.startswith("model.language_model") and name.endswith("mlp.down_proj")
        q = QuantLinear(lin, ffn if online else None)
        _swap(model, name, q)
        wrappers[name] = q
    # the scheme is visible during calibration, so that a quantized KV cache shapes the statistics too
    staged = llava.replace(model=model, rotation=rotation, scheme=scheme)
    blocks = _blocks(wrappers) if scheme.sequential else {"all": wrappers}
    for block in blocks.values():
        if scheme.needs_calibration:
            for q in block.values():
                q.observe, q.want_hessian = True, scheme.w_method == "gptq"
            calibrate(staged)
        for name, q in block.items():
            q.finalize(scheme, name)
    return staged


def _blocks(wrappers: dict[str, QuantLinear]) -> dict[str, dict[str, QuantLinear]]:
    """Wrappers grouped in forward order: vision tower, projector, then decoder layer by layer."""
    def key(name: str) -> tuple:
        if name.startswith("model.vision_tower"):
            return (0, 0)
        if name.startswith("model.multi_modal_projector"):
            return (1, 0)
        parts = name.split(".")
        return (2, int(parts[parts.index("layers") + 1])) if "layers" in parts else (3, 0)
    blocks: dict[str, dict[str, QuantLinear]] = {}
    for name in sorted(wrappers, key=key):
        blocks.setdefault(str(key(name)), {})[name] = wrappers[name]
    return blocks
