"""The slim runtime: numpy + onnxruntime (or tensorrt) + tokenizers, never torch."""
