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


class _Cuda:
    """The few CUDA runtime calls a TensorRT session needs, through ctypes (no pycuda / cuda-python)."""

    H2D, D2H = 1, 2

    def __init__(self):
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("cudart") or "libcudart.so"
        try:
            self.lib = ctypes.CDLL(name)
        except OSError as e:
            raise RuntimeError(f"cannot load the CUDA runtime ({name}): {e}") from None
        self.ctypes = ctypes

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"CUDA {what} failed with error {code}")

    def malloc(self, nbytes: int) -> int:
        ptr = self.ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(self.ctypes.byref(ptr), self.ctypes.c_size_t(max(nbytes, 1))), "cudaMalloc")
        return ptr.value

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(self.ctypes.c_void_p(ptr))

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        self._check(self.lib.cudaMemcpy(self.ctypes.c_void_p(dst), self.ctypes.c_void_p(src),
                                        self.ctypes.c_size_t(nbytes), kind), "cudaMemcpy")

    def synchronize(self) -> None:
        self._check(self.lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")


class TrtBackend:
    """A TensorRT plan behind the same contract. Inputs are copied to the device, the engine runs on the
    default stream with `execute_async_v3`, outputs are copied back (shapes from the context once every input
    shape is set). Profile 0 is used for calls with an empty past (prefill), profile 1 otherwise (decode)."""

    def __init__(self, path: str | Path):
        import tensorrt as trt

        self.trt = trt
        self.cuda = _Cuda()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise ValueError(f"{path}: TensorRT could not deserialize the plan (built by another TensorRT "
                             "version or for another GPU?): rebuild it with make engines")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.profile = 0

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt = self.trt
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ValueError(f"missing inputs {missing}; the plan takes {self.inputs}")
        want = 1 if self.engine.num_optimization_profiles > 1 and any(
            feeds[n].shape[-2] > 0 for n in self.inputs if n.startswith("past_key_values.")) else 0
        if want != self.profile:
            self.context.set_optimization_profile_async(want, 0)
            self.profile = want
        allocations = []
        try:
            for name in self.inputs:
                dtype = trt.nptype(self.engine.get_tensor_dtype(name))
                host = np.ascontiguousarray(feeds[name], dtype=dtype)
                ptr = self.cuda.malloc(host.nbytes)
                allocations.append(ptr)
                if host.nbytes:
                    self.cuda.copy(ptr, host.ctypes.data, host.nbytes, _Cuda.H2D)
                self.context.set_input_shape(name, host.shape)
                self.context.set_tensor_address(name, ptr)
            results = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                host = np.empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(name)))
                ptr = self.cuda.malloc(host.nbytes)
                allocations.append(ptr)
                self.context.set_tensor_address(name, ptr)
                results[name] = (host, ptr)
            if not self.context.execute_async_v3(0):
                raise RuntimeError("TensorRT execution failed")
            self.cuda.synchronize()
            for name, (host, ptr) in results.items():
                if host.nbytes:
                    self.cuda.copy(host.ctypes.data, ptr, host.nbytes, _Cuda.D2H)
            return {name: host for name, (host, _) in results.items()}
        finally:
            for ptr in allocations:
                self.cuda.free(ptr)
