"""Open an artifact folder (`engines/NAME/`) for inference: check that it is complete and consistent, pick
the backend, and refuse engines built for another artifact, precision or TensorRT version.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.backends import OrtBackend, TrtBackend

ARTIFACT_FORMAT = "qapruner-artifact/1"
ENGINES_FORMAT = "qapruner-engines/1"
REQUIRED = ("manifest.json", "vision.onnx", "llm.onnx", "embed_tokens.npy", "tokenizer.json", "processor_config.json")


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Artifact:
    """What the runtime needs of one artifact: the manifest, the two sessions (`infer` contract), the
    embedding table [V, D], the processor config, and which backend runs it and why."""
    root: Path
    manifest: dict
    vision: object
    llm: object
    table: np.ndarray
    processor_config: dict
    backend: str
    reason: str
    llm_prefill: object | None = None  # a QUOTA artifact's prefill graph (in-LLM token dropping)


def graphs(manifest: dict) -> tuple[str, ...]:
    """The graphs of an artifact: vision and llm, and llm_prefill where a QUOTA recipe is baked in."""
    return ("vision", "llm") + (("llm_prefill",) if manifest["llm"].get("recipe") else ())


def _fail(msg: str):
    raise ValueError(msg)


def check(root: str | Path) -> dict:
    """Validate the folder and return its manifest: every required file present, the manifest of a format
    this runtime reads."""
    root = Path(root)
    if not root.is_dir():
        _fail(f"engines folder not found: {root}")
    missing = [f for f in REQUIRED if not (root / f).is_file()]
    if missing:
        _fail(f"{root} is incomplete: missing {', '.join(missing)} (re-export it with python -m export)")
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        _fail(f"{root}/manifest.json is not valid JSON: {e}")
    if manifest.get("format") != ARTIFACT_FORMAT:
        _fail(f"{root} was written by an incompatible exporter (format {manifest.get('format')!r}, this runtime "
              f"reads {ARTIFACT_FORMAT!r}): re-export it")
    missing = [f"{g}.onnx" for g in graphs(manifest) if not (root / f"{g}.onnx").is_file()]
    if missing:
        _fail(f"{root} is incomplete: missing {', '.join(missing)} (re-export it with python -m export)")
    return manifest


def _engines(root: Path, manifest: dict) -> dict | None:
    path = root / "engines.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    if info.get("format") != ENGINES_FORMAT:
        _fail(f"{path} has format {info.get('format')!r}, this runtime reads {ENGINES_FORMAT!r}: rebuild with "
              "make engines")
    if info.get("manifest_sha256") != sha256(root / "manifest.json"):
        _fail(f"{root}: the engines were built for another export of this folder (manifest changed): "
              "rebuild with make engines")
    if info.get("artifact_keep") != manifest["keep"] or info.get("precisions") != {
            g: manifest[g]["precision"] for g in ("vision", "llm")}:
        _fail(f"{root}: engines built for K = {info.get('artifact_keep')} {info.get('precisions')}, the artifact "
              f"is K = {manifest['keep']}: rebuild with make engines")
    for graph, entry in info["files"].items():
        f = root / entry["file"]
        if not f.is_file() or sha256(f) != entry["sha256"]:
            _fail(f"{f} is missing or changed since make engines: rebuild it")
    return info


def open_artifact(root: str | Path, backend: str = "auto", threads: int | None = None) -> Artifact:
    """backend: auto (the built engines if any, else the exported ONNX graphs in ONNX Runtime), ort, trt."""
    root = Path(root)
    manifest = check(root)
    info = _engines(root, manifest)
    if backend == "trt" or (backend == "auto" and info is not None and info["backend"] == "tensorrt"):
        if info is None or info["backend"] != "tensorrt":
            _fail(f"{root} has no TensorRT plans: build them with make engines on a machine with TensorRT")
        try:
            import tensorrt as trt
        except ImportError:
            _fail("--backend trt: tensorrt is not importable here (use --backend ort)")
        if trt.__version__ != info["tensorrt"]:
            _fail(f"{root}: plans built by TensorRT {info['tensorrt']}, this is {trt.__version__}: rebuild "
                  "with make engines")
        vision, llm = (TrtBackend(root / info["files"][g]["file"]) for g in ("vision", "llm"))
        prefill = TrtBackend(root / info["files"]["llm_prefill"]["file"]) if "llm_prefill" in graphs(manifest) \
            else None
        chosen, reason = "tensorrt", f"TensorRT {trt.__version__} plans ({info.get('gpu', 'GPU')})"
    else:
        config = manifest["llm"]["session_options"]
        if info is not None and info["backend"] == "onnxruntime":
            files = {g: root / info["files"][g]["file"] for g in graphs(manifest)}
            reason = f"ONNX Runtime CPU models optimised by make engines ({info['graph_optimization_level']})"
        else:
            files = {g: root / f"{g}.onnx" for g in graphs(manifest)}
            reason = "ONNX Runtime on the exported graphs (make engines has not been run)"
        # the vision session runs once per request: its idle threads must not spin while the LLM runs (they
        # compete with the LLM's threads for the cores; on this 2-core CPU that slowed prefill markedly)
        vision = OrtBackend(files["vision"], {"session.intra_op.allow_spinning": "0"}, threads=threads)
        llm = OrtBackend(files["llm"], config, threads=threads)
        prefill = OrtBackend(files["llm_prefill"], config, threads=threads) if "llm_prefill" in files else None
        chosen = "onnxruntime"
    table = np.load(root / "embed_tokens.npy", allow_pickle=False)
    processor_config = json.loads((root / "processor_config.json").read_text())
    return Artifact(root, manifest, vision, llm, table, processor_config, chosen, reason, prefill)
