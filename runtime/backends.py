"""Inference backends behind one contract: `infer(dict[str, ndarray]) -> dict[str, ndarray]`.

Heavy imports are lazy: importing this module imports neither onnxruntime nor tensorrt.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


class OrtBackend:
    """An ONNX Runtime session on the CPU (or the given providers). `config` holds session config entries
    (e.g. the artifact's session.qdq_matmulnbits_accuracy_level)."""

    def __init__(self, path: str | Path, config: dict[str, str] | None = None, providers=None,
                 threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        for k, v in (config or {}).items():
            opts.add_session_config_entry(k, str(v))
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ValueError(f"missing inputs {missing}; the graph takes {self.inputs}")
        return dict(zip(self.outputs, self.session.run(self.outputs, {n: feeds[n] for n in self.inputs})))
