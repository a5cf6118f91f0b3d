"""make engines: TensorRT plans where TensorRT and a GPU exist, ONNX Runtime CPU models everywhere else."""
