"""Float16 graphs: ONNX Runtime's float16 converter, plus the repairs its output needs.

`convert_float_to_float16` leaves identical Cast nodes repeated, graph-input casts at the end of the node list
and stale element types in value_info; `convert` removes the repeats, sorts the nodes topologically again,
drops value_info and checks the result (checker + strict shape inference). Inputs and outputs stay float32,
so the runtime is the same for every precision.
"""
from __future__ import annotations

from pathlib import Path


def _tidy(model):
    import onnx

    seen, nodes = set(), []
    for node in model.graph.node:  # one identical Cast per blocked consumer of a float16 tensor: keep one
        key = node.SerializeToString()
        if node.op_type == "Cast" and key in seen:
            continue
        seen.add(key)
        nodes.append(node)
    ready = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    ordered = []
    while nodes:
        done = [n for n in nodes if set(n.input) <= ready]
        if not done:
            raise ValueError("the float16 graph has a cycle or a dangling input")
        for n in done:
            ordered.append(n)
            ready.update(n.output)
        taken = {id(n) for n in done}
        nodes = [n for n in nodes if id(n) not in taken]
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model


def convert(path: str | Path, keep_float32: list[str] | None = None) -> Path:
    """Rewrite the graph at `path` in float16, except the nodes named in `keep_float32`."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True, node_block_list=keep_float32)
    onnx.save(_tidy(model), str(path))
    return Path(path)


def vision_fp16(path: str | Path) -> Path:
    """vision.onnx with the tower and projector in float16 (the nodes `tokens`' features depend on) and
    everything after them — the score, TopK, sort, gather, the CLS-row mean — in float32, so that E, R and
    the ranking are computed as in the float graph."""
    import onnx

    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    stack, tower = [producer["tokens"].input[0]], set()  # walk up from the gathered features
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in tower:
            tower.add(node.name)
            stack.extend(node.input)
    return convert(path, [n.name for n in model.graph.node if n.name not in tower])


def llm_fp16(path: str | Path) -> Path:
    """llm.onnx in float16: weights and arithmetic; inputs, logits and presents stay float32."""
    return convert(path)
