"""ONNX export of the QAPruner pipeline (vision + scoring/pruning subgraph, quantized LLM)."""
