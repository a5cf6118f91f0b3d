"""INT8 explicit Q/DQ in the TensorRT style, done by onnxruntime.quantization (no hand-written pass).

Symmetric everywhere (TensorRT has no zero points): per-output-channel INT8 weights, per-tensor static INT8
activations calibrated (MinMax) on the calibration feeds. Only MatMul / Gemm nodes whose second input is a
weight initializer are quantized — the attention products (activation × activation) and the
scoring-and-pruning arithmetic stay in float, as do the weights listed in `exclude`. The vision tower's
patch-embedding Conv stays float too: of all layers it cost the kept-index agreement most when quantized.
Q/DQ go on the MatMul inputs only, as TensorRT places them (ORT's default also quantizes each MatMul's output
before the bias Add, which cost the embedded model 1.6 points of kept-index overlap with float torch:
93.7% -> 95.3% without it).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

WEIGHT_OPS = ("MatMul", "Gemm")
MAX_OPSET = 20  # see export.artifact.INT8_OPSET


def value_key(a: np.ndarray) -> str:
    """Identity of a weight by value (exporters rename initializers): sha256 of its float32 bytes."""
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def weight_nodes(model, exclude: Iterable[np.ndarray] = ()) -> list[str]:
    """Names of the MatMul / Gemm nodes whose weight input is an initializer, except those whose
    weight equals (as stored in the graph) one of the arrays in `exclude`."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    skip = {value_key(a) for a in exclude}
    return [n.name for n in model.graph.node
            if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in inits
            and value_key(numpy_helper.to_array(inits[n.input[1]])) not in skip]


class _Feeds:
    """onnxruntime CalibrationDataReader over a list of feed dicts (duck-typed: get_next / rewind)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds, self.i = list(feeds), 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0


def quantize_int8(src: str | Path, dst: str | Path, feeds: list[dict[str, np.ndarray]],
                  exclude: Iterable[np.ndarray] = ()) -> list[str]:
    """Write the INT8 Q/DQ version of `src` to `dst`, calibrated on `feeds`; weights equal to an array in
    `exclude` stay float (the LM head). Returns the quantized node names."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not feeds:
        raise ValueError("INT8 quantization needs calibration feeds, got none")
    opset = next(o.version for o in onnx.load(str(src), load_external_data=False).opset_import
                 if o.domain in ("", "ai.onnx"))
    if opset > MAX_OPSET:
        raise ValueError(f"{src} is opset {opset}: export INT8 graphs at opset ≤ {MAX_OPSET} (ONNX Runtime "
                         "cannot load its own opset-21 QDQ models, onnxruntime issue #25526)")
    with tempfile.TemporaryDirectory(prefix="qdq-") as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        # shape inference + ORT basic folding (turns some MatMul+Add into Gemm: Gemm is quantized too)
        quant_pre_process(str(src), pre, skip_symbolic_shape=True)
        nodes = weight_nodes(onnx.load(pre), exclude)
        if not nodes:
            raise ValueError(f"{src} has no MatMul/Gemm with weight initializers to quantize")
        quantize_static(pre, str(dst), _Feeds(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(WEIGHT_OPS), nodes_to_quantize=nodes, per_channel=True,
                        reduce_range=False, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                                       # Q/DQ on the inputs only, as TensorRT places them: by default ORT
                                       # also quantizes each MatMul's output (before the bias Add)
                                       "OpTypesToExcludeOutputQuantization": list(WEIGHT_OPS)})
    return nodes


def int8_parameters(path: str | Path) -> list[dict]:
    """The INT8 Q/DQ parameters ONNX Runtime wrote, per quantized MatMul / Gemm: the dequantized weight
    [in, out] (as the graph computes it), the per-tensor activation scale of its input, the bias if any
    (for a Gemm). What a torch reference needs to simulate exactly this quantized model."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_OPS:
            continue
        a, b = producer.get(node.input[0]), producer.get(node.input[1])
        if a is None or b is None or a.op_type != "DequantizeLinear" or b.op_type != "DequantizeLinear" \
                or b.input[0] not in inits:
            continue
        q = inits[b.input[0]].astype(np.float32)
        zero = inits[b.input[2]].astype(np.float32) if len(b.input) > 2 else 0
        axis = next((att.i for att in b.attribute if att.name == "axis"), 1)
        scale = inits[b.input[1]].astype(np.float32)
        shape = [1] * q.ndim
        shape[axis] = -1
        weight = (q - np.reshape(zero, shape)) * np.reshape(scale, shape)
        act_scale = float(inits[a.input[1]]) if a.input[1] in inits else None
        bias = None
        if node.op_type == "Gemm" and len(node.input) > 2:
            src = producer.get(node.input[2])
            if src is not None and src.op_type == "DequantizeLinear":
                bq, bs = inits[src.input[0]].astype(np.float64), inits[src.input[1]].astype(np.float64)
                bias = (bq * bs).astype(np.float32)
            elif node.input[2] in inits:
                bias = inits[node.input[2]]
        found.append({"node": node.name, "weight": weight, "act_scale": act_scale, "bias": bias})
    return found
