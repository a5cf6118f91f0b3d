"""qapruner: quantization-aware vision-token pruning for LLaVA-style models (torch reference path).

Names are imported lazily so that `python -m qapruner.<stage>` runs each stage module exactly once.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Llava": "model", "load": "model", "tiny": "model",
    "answer": "pipeline", "logits": "pipeline",
    "prune": "pruning", "resolve_k": "pruning", "select": "pruning",
    "PRESETS": "ptq", "Scheme": "ptq",
    "Scoring": "scoring", "hybrid_scores": "scoring",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"qapruner.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'qapruner' has no attribute {name!r}")
