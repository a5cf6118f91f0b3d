"""The LLM graph: the LLaVA's decoder with a KV cache, in standard ONNX ops.

inputs   inputs_embeds [B, S, D] (kept visual tokens spliced into the prompt's embeddings), attention_mask
         [B, P+S] int64, position_ids [B, S] int64, past_key_values.{i}.key / .value [B, Hkv, P, Dh]
outputs  logits [B, 1, V] (last position only: the lm_head over every prompt position would cost more than a
         small decoder's layers and nothing reads it), present.{i}.key / .value [B, Hkv, P+S, Dh]
Prefill passes P = 0 (empty past tensors); each decode step feeds the presents back.

INT4 weights (`int4_weights`): each decoder MatMul whose weight is a quantized core-library linear gets an
opset-21 block-wise DequantizeLinear of the library's own INT4 codes and scales in front of it — standard ops
that TensorRT reads as weight-only INT4 and ONNX Runtime fuses into MatMulNBits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from export.qdq import value_key
from qapruner import ptq
from qapruner.model import Llava

INT4_BLOCKS = (32, 64, 128)  # block sizes TensorRT and MatMulNBits both take


def decoder_parts(llava: Llava):
    """(language model, LM head, text config) of an exportable LLaVA: rotated models are refused."""
    if llava.rotation is not None:
        raise ValueError("export of rotated (QuaRot) models is not supported: export an unrotated scheme")
    return llava.model.model.language_model, llava.model.lm_head, llava.model.config.text_config


def cache_from(config, past) -> DynamicCache:
    """A transformers cache holding the flat past tensors (key, value per layer, in order)."""
    cache = DynamicCache(config=config)
    for i in range(len(past) // 2):
        cache.update(past[2 * i], past[2 * i + 1], i)
    return cache


def presents(cache) -> list:
    """The cache as flat present tensors (key, value per layer, in order)."""
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


class Decoder(nn.Module):
    """Flat-tensor wrapper of the LLaVA decoder for tracing: the cache is rebuilt from the past tensors and
    handed to the unmodified transformers model."""

    def __init__(self, llava: Llava):
        super().__init__()
        self.lm, self.head, self.config = decoder_parts(llava)
        self.layers = self.config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        cache = cache_from(self.config, past)
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True)
        logits = self.head(out.last_hidden_state[:, -1:])  # [B, 1, V]
        return (logits, *presents(cache))


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{i}.{t}" for i in range(num_layers) for t in ("key", "value")]
    return (["inputs_embeds", "attention_mask", "position_ids"] + [f"past_key_values.{x}" for x in kv],
            ["logits"] + [f"present.{x}" for x in kv])


def kv_shape(llava: Llava) -> tuple[int, int]:
    """(KV heads, head dim) of the decoder."""
    c = llava.model.config.text_config
    return c.num_key_value_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def export_llm(llava: Llava, path: str | Path, *, opset: int = 21) -> Path:
    """Trace `Decoder` to ONNX at `path`; single file where the weights fit protobuf's 2 GB, else the weights
    go to `path`.data beside it. Dynamic batch, sequence and past length."""
    dec = Decoder(llava).eval()
    n = dec.layers
    hkv, dh = kv_shape(llava)
    d = dec.config.hidden_size
    B, S, P = 2, 5, 3  # example sizes ≥ 2: torch.export specialises dimensions of size 0 and 1
    args = (torch.randn(B, S, d), torch.ones(B, P + S, dtype=torch.int64),
            torch.arange(P, P + S).expand(B, S).contiguous(), *[torch.randn(B, hkv, P, dh) for _ in range(2 * n)])
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("sequence", min=1, max=32768)
    past, total = torch.export.Dim("past_sequence", min=0, max=32768), torch.export.Dim("total_sequence", min=1)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
              tuple({0: batch, 2: past} for _ in range(2 * n)))
    return save_onnx(dec, args, io_names(n), shapes, Path(path), opset)


def save_onnx(module: nn.Module, args, names: tuple[list[str], list[str]], shapes, path: Path,
              opset: int) -> Path:
    """torch.onnx.export(dynamo=True) of `module` to `path`: one file where the weights fit protobuf's 2 GB,
    else the weights in `path`.data beside it."""
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > 1.8 * 2**30
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=names[0],
                                    output_names=names[1], dynamic_shapes=shapes, external_data=big, verbose=False)
    program.save(str(path), external_data=big)
    return path


def embedding_table(llava: Llava) -> np.ndarray:
    """The token-embedding table [V, D] float32, for the runtime to embed text without torch."""
    return llava.model.get_input_embeddings().weight.detach().float().numpy().copy()


# ---------------------------------------------------------------------------------------------------------
# INT4 weight-only Q/DQ

def weight_codes(quantized: Llava) -> dict[str, tuple[np.ndarray, np.ndarray, int, str]]:
    """Integer codes and scales of each quantized decoder linear, from the core library (not re-derived):
    name -> (codes [out, in] int8, scale [out, in/G] or [out, 1] float32, bits, value_key of weightᵀ), with
    weight == codes · scale."""
    result = {}
    for name, q in ptq.quant_linears(quantized.model).items():
        if q.w_scale is None:
            continue
        if q.transform is not None:
            raise ValueError(f"{name} has an online rotation: export an unrotated scheme")
        w, scale = q.weight.detach().float(), q.w_scale.detach().float()
        g = w.shape[1] // scale.shape[1]
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).repeat_interleave(g, 1)
        codes = torch.round(w / safe)
        lo, hi = -(2 ** (q.w_bits - 1)), 2 ** (q.w_bits - 1) - 1
        if codes.min() < lo or codes.max() > hi or (codes * scale.repeat_interleave(g, 1) - w).abs().max() > \
                1e-6 * max(1.0, float(w.abs().max())):
            raise ValueError(f"{name}: the weight is not codes · scale on a {q.w_bits}-bit grid")
        result[name] = (codes.to(torch.int8).numpy(), scale.numpy(), q.w_bits, value_key(w.numpy().T))
    return result


def int4_weights(model, codes: dict[str, tuple[np.ndarray, np.ndarray, int, str]]):
    """Put `DequantizeLinear(int4 codes, scale, axis=0, block_size=G)` in front of every MatMul whose weight
    initializer equals a quantized linear's weightᵀ (matched by value: the exporter renames initializers).
    Returns (model, names of the linears rewritten). The weight [in, out] is blocked along `in`, G ∈ {32, 64, 128}."""
    import ml_dtypes
    import onnx
    from onnx import helper, numpy_helper

    by_value = {}
    for name, (c, s, bits, key) in codes.items():
        if bits != 4:
            raise ValueError(f"{name} has {bits}-bit weights; INT4 export needs a 4-bit scheme")
        g = c.shape[1] // s.shape[1]
        if s.shape[1] > 1 and g not in INT4_BLOCKS:
            raise ValueError(f"INT4 block size {g} of {name} is not one of {INT4_BLOCKS}")
        by_value[key] = name
    inits = {i.name: i for i in model.graph.initializer}
    done, nodes = [], []
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None:
            nodes.append(node)
            continue
        name = by_value.get(value_key(numpy_helper.to_array(w)))
        if name is None:
            nodes.append(node)
            continue
        c, s = codes[name][:2]
        g = c.shape[1] // s.shape[1]
        base = node.input[1]
        q = numpy_helper.from_array(np.ascontiguousarray(c.T).astype(ml_dtypes.int4), base + "_int4")
        if s.shape[1] == 1:  # per output channel: per-axis DQ along the output axis of [in, out]
            scale = numpy_helper.from_array(np.ascontiguousarray(s[:, 0]), base + "_scale")
            attrs = {"axis": 1}
        else:
            scale = numpy_helper.from_array(np.ascontiguousarray(s.T), base + "_scale")  # [in/G, out]
            attrs = {"axis": 0, "block_size": int(g)}
        model.graph.initializer.extend([q, scale])
        nodes.append(helper.make_node("DequantizeLinear", [q.name, scale.name], [base + "_dq"],
                                      name=node.name + "_weight_dq", **attrs))
        node.input[1] = base + "_dq"
        nodes.append(node)
        done.append(name)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {x for n in model.graph.node for x in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    missing = sorted(set(codes) - set(done))
    if missing:
        raise ValueError(f"{len(missing)} quantized linears were not found in the graph, e.g. {missing[0]}")
    onnx.checker.check_model(model)
    return model, done
