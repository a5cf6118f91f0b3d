"""`make engines`: turn every exported artifact `engines/NAME/` into runnable engines for this machine.

Where `tensorrt` imports and a CUDA GPU answers: TensorRT plans for vision.onnx and llm.onnx, built through
polygraphy's TensorRT loaders (fixed-K optimisation profiles, FP16 / INT8 / strongly-typed INT4-weight networks
from the manifest, a timing cache, a workspace limit that fits an 8 GB Orin). Everywhere else: ONNX Runtime
models optimised offline for the CPU (graph optimisation level and session settings saved). `engines.json`
records which backend was built, why, with what versions, and the sha256 of the manifest it was built from;
`runtime` refuses engines built for another artifact, precision or TensorRT version.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from runtime.artifact import ENGINES_FORMAT as FORMAT
from runtime.artifact import graphs, sha256

ORIN_WORKSPACE = 2 << 30  # bytes of TensorRT workspace: leaves most of an 8 GB Orin to weights and KV cache
ORT_LEVEL = "ORT_ENABLE_EXTENDED"  # portable across CPUs (ENABLE_ALL adds layout transforms for this one)


def tensorrt_status() -> tuple[bool, str]:
    """(usable, why): tensorrt importable and a CUDA device that TensorRT can build for."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "tensorrt is not importable (it needs an NVIDIA GPU and its wheel)"
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        if builder is None:
            raise RuntimeError("no builder")
    except Exception as e:  # no CUDA driver or device
        return False, f"tensorrt {trt.__version__} is installed but no CUDA GPU is usable ({e})"
    return True, f"tensorrt {trt.__version__} with a CUDA GPU"


def _gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def read_manifest(art: Path) -> dict:
    path = Path(art) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{art} has no manifest.json: export it with python -m export first")
    manifest = json.loads(path.read_text())
    if not str(manifest.get("format", "")).startswith("qapruner-artifact/"):
        raise ValueError(f"{path} is not a qapruner artifact manifest (format {manifest.get('format')!r})")
    return manifest


def build_ort(art: Path, manifest: dict, threads: int | None = None) -> dict:
    """ONNX Runtime CPU models: each graph optimised offline at ORT_ENABLE_EXTENDED (with the artifact's
    session config entries, so W4A16 / W4A8 fuse into MatMulNBits at the right accuracy level)."""
    import onnxruntime as ort

    files = {}
    for graph in graphs(manifest):
        config = manifest["llm"]["session_options"] if graph.startswith("llm") else {}
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVEL)
        for k, v in config.items():
            opts.add_session_config_entry(k, str(v))
        target = art / f"{graph}.ort.onnx"
        tmp = art / f".{graph}.ort.onnx.tmp"
        opts.optimized_model_filepath = str(tmp)
        ort.InferenceSession(str(art / f"{graph}.onnx"), opts, providers=["CPUExecutionProvider"])
        os.replace(tmp, target)
        files[graph] = {"file": target.name, "sha256": sha256(target), "session_options": config}
    return {"backend": "onnxruntime", "onnxruntime": ort.__version__, "graph_optimization_level": ORT_LEVEL,
            "intra_op_num_threads": threads, "files": files}


def _trt_profiles(graph: str, manifest: dict, max_batch: int, max_tokens: int):
    """Fixed-K optimisation profiles: the vision graph varies only in batch; the LLM in batch, sequence and
    past length (prefill: K + prompt tokens with an empty past; decode: one token with a growing past)."""
    from polygraphy.backend.trt import Profile

    size = manifest["image"]["size"]
    if graph == "vision":
        p = Profile().add("pixel_values", (1, 3, size, size), (1, 3, size, size), (max_batch, 3, size, size))
        if manifest["semantic"] == "text":
            d = manifest["llm"]["hidden_size"]
            p.add("text_embedding", (1, d), (1, d), (max_batch, d))
        return [p]
    cfg, k = manifest["llm"], manifest["keep"]
    d, h, dh = cfg["hidden_size"], cfg["kv_heads"], cfg["head_dim"]
    if graph == "llm_prefill":  # a QUOTA prefill: no past; at least the V0 visual tokens and one text token
        p = Profile()
        for name in cfg["recipe"]["prefill_inputs"]:
            last = (d,) if name == "inputs_embeds" else ()
            p.add(name, (1, k + 1, *last), (1, k + 32, *last), (max_batch, max_tokens, *last))
        return [p]
    prefill, decode = Profile(), Profile()
    for p, seq, past in ((prefill, (1, k + 32, max_tokens), (0, 0, 0)), (decode, (1, 1, 1), (0, k + 48, max_tokens))):
        p.add("inputs_embeds", (1, seq[0], d), (1, seq[1], d), (max_batch, seq[2], d))
        total = (seq[0] + past[0], seq[1] + past[1], seq[2] + past[2])
        p.add("attention_mask", (1, total[0]), (1, total[1]), (max_batch, total[2]))
        p.add("position_ids", (1, seq[0]), (1, seq[1]), (max_batch, seq[2]))
        for name in cfg["inputs"][3:]:
            p.add(name, (1, h, past[0], dh), (1, h, past[1], dh), (max_batch, h, past[2], dh))
    # a QUOTA decode graph never sees an empty past (its prefill graph is separate): the decode profile only
    return [decode] if cfg.get("recipe") else [prefill, decode]


def build_trt(art: Path, manifest: dict, max_batch: int = 4, max_tokens: int = 2048) -> dict:
    """TensorRT plans through polygraphy: precision flags from the manifest, a shared timing cache, the
    workspace limit of an 8 GB Orin. INT4-weight graphs are parsed strongly typed (their DQ nodes set the
    weight types)."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath

    cache = art / "timing.cache"
    files = {}
    for graph in graphs(manifest):
        precision = manifest["llm" if graph.startswith("llm") else graph]["precision"]
        int4 = graph.startswith("llm") and precision in ("w4a16", "w4a8")
        network = NetworkFromOnnxPath(str(art / f"{graph}.onnx"), strongly_typed=int4 or None)
        config = CreateConfig(fp16=(precision == "fp16" and not int4) or None,
                              int8=precision in ("int8", "w8a8") or None,
                              profiles=_trt_profiles(graph, manifest, max_batch, max_tokens),
                              memory_pool_limits={trt.MemoryPoolType.WORKSPACE: ORIN_WORKSPACE},
                              load_timing_cache=str(cache) if cache.exists() else None)
        plan = EngineBytesFromNetwork(network, config, save_timing_cache=str(cache))()
        target = art / f"{graph}.plan"
        tmp = art / f".{graph}.plan.tmp"
        tmp.write_bytes(bytes(plan))
        os.replace(tmp, target)
        files[graph] = {"file": target.name, "sha256": sha256(target), "precision": precision}
    return {"backend": "tensorrt", "tensorrt": trt.__version__, "gpu": _gpu_name(),
            "workspace_bytes": ORIN_WORKSPACE, "max_batch": max_batch, "max_tokens": max_tokens, "files": files}


def build(art: str | Path, backend: str = "auto", log=print) -> dict:
    """Build the engines of one artifact folder and write its engines.json. backend: auto | ort | trt."""
    art = Path(art)
    manifest = read_manifest(art)
    usable, why = tensorrt_status()
    if backend == "trt" and not usable:
        raise RuntimeError(f"--backend trt: {why}")
    use_trt = backend == "trt" or (backend == "auto" and usable)
    t0 = time.time()
    info = build_trt(art, manifest) if use_trt else build_ort(art, manifest)
    reason = why if use_trt else (f"{why}: built ONNX Runtime CPU models" if backend == "auto"
                                  else "ONNX Runtime asked for (--backend ort)")
    doc = {"format": FORMAT, **info, "reason": reason, "artifact_keep": manifest["keep"],
           "precisions": {g: manifest[g]["precision"] for g in ("vision", "llm")},
           "manifest_sha256": sha256(art / "manifest.json"), "build_seconds": round(time.time() - t0, 1),
           "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_json(art / "engines.json", doc)
    log(f"{art}: {info['backend']} engines ({reason})")
    return doc


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engines.build", description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="*", help="artifact folders (default: every engines/*/ with a manifest)")
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "trt"])
    args = p.parse_args(argv)
    root = Path(__file__).parent
    arts = [Path(a) for a in args.artifacts] or sorted(d for d in root.iterdir() if (d / "manifest.json").is_file())
    if not arts:
        print("error: no exported artifacts under engines/: run make export (python -m export) first", file=sys.stderr)
        return 2
    try:
        for art in arts:
            build(art, args.backend)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
