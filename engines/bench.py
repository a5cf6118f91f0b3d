"""`make bench`: speed and memory of the deployment path, measured in one run on this machine, written to
docs/results/speed.{md,json} with the machine's description. Every time is a median over repeats.

1. LLM prefill at retention {1, 0.5, 0.25, 0.125} as ratios to retention 1 — the embedded model and a
   LLaVA-1.5-shaped random model (576 visual tokens, LLM hidden 4096, 2 layers) — beside the FLOP-floor
   ratio and this machine's measured MatMul GFLOP/s.
2. Scoring and pruning as a fraction of the vision encoder (vision.onnx vs the same graph stopped at the
   projected features).
3. End to end: `runtime/infer.py` (numpy + ONNX Runtime) vs Hugging Face transformers `generate` in torch on
   the same model, image and prompt: latency per request and peak RSS, each in its own process.
4. Decode tokens/s: fp32 vs INT4 weights (W4A16, W4A8) in ONNX Runtime.
5. QUOTA: LLM prefill at an average budget of 30% of the visual tokens per layer — all tokens, QAPruner's cut
   before the LLM, and a calibrated recipe exported into llm_prefill.onnx (`--only-quota` reruns this alone).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RETENTIONS = (1.0, 0.5, 0.25, 0.125)
TEXT_TOKENS = 12  # a short VQA prompt around the visual tokens


def machine() -> dict:
    import onnxruntime as ort

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines()
                   if x.startswith("MemTotal")) / 2**20
    except (OSError, StopIteration):
        mem = float("nan")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "numpy": np.__version__, "platform": platform.platform()}


def median_time(fn, repeats: int = 5, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_gflops(m: int = 512, k: int = 4096, n: int = 4096) -> float:
    """This machine's float32 MatMul throughput in ONNX Runtime (weights as an initializer, as in the LLM)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from runtime.backends import OrtBackend

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [w])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mm.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), path)
        session = OrtBackend(path)
        x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
        t = median_time(lambda: session.infer({"x": x}), repeats=7, warmup=2)
    return 2 * m * k * n / t / 1e9


def llm_flops(cfg: dict, t: int) -> float:
    """FLOPs of one prefill of t tokens with an empty past: per layer the q/k/v/o and MLP MatMuls
    (2·t·in·out each) and the attention products (2·2·t²·d, dense as the graph computes them); the LM head on
    the last position only."""
    d, i, h, hkv, dh, layers, v = (cfg[x] for x in ("hidden_size", "intermediate_size", "heads", "kv_heads",
                                                     "head_dim", "num_layers", "vocab_size"))
    proj = 2 * t * d * (h * dh + 2 * hkv * dh) + 2 * t * h * dh * d
    mlp = 2 * t * 3 * d * i
    attn = 2 * 2 * t * t * h * dh
    return layers * (proj + mlp + attn) + 2 * d * v


def _llm_feed(cfg: dict, batch: int, seq: int, past: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feed = {"inputs_embeds": (rng.standard_normal((batch, seq, cfg["hidden_size"])) * 0.02).astype(np.float32),
            "attention_mask": np.ones((batch, past + seq), np.int64),
            "position_ids": np.arange(past, past + seq, dtype=np.int64)[None].repeat(batch, 0)}
    for name in cfg["inputs"][3:]:
        feed[name] = (rng.standard_normal((batch, cfg["kv_heads"], past, cfg["head_dim"])) * 0.1).astype(np.float32)
    return feed


def prefill_rows(llm_path: Path, cfg: dict, n_visual: int, repeats: int, gflops: float) -> list[dict]:
    from runtime.backends import OrtBackend

    session = OrtBackend(llm_path)
    rows = []
    for r in RETENTIONS:
        k = max(1, int(np.ceil(r * n_visual - 1e-9)))
        t = k + TEXT_TOKENS
        feed = _llm_feed(cfg, 1, t, 0)
        rows.append({"retention": r, "visual_tokens": k, "tokens": t,
                     "seconds": median_time(lambda: session.infer(feed), repeats), "flops": llm_flops(cfg, t)})
    base = rows[0]
    for row in rows:
        row["speedup"] = base["seconds"] / row["seconds"]
        row["flop_floor_speedup"] = base["flops"] / row["flops"]
        row["achieved_gflops"] = row["flops"] / row["seconds"] / 1e9
        row["fraction_of_matmul_peak"] = row["achieved_gflops"] / gflops
    return rows


def layer_flops(cfg: dict, tokens: list[int]) -> float:
    """FLOPs of a prefill whose layer l sees tokens[l] tokens (QUOTA shrinks the sequence inside the LLM)."""
    one = dict(cfg, num_layers=1)
    head = 2 * cfg["hidden_size"] * cfg["vocab_size"]
    return sum(llm_flops(one, t) - head for t in tokens) + head


def quota_rows(paths: dict, cfg: dict, recipe, budget: float, repeats: int) -> list[dict]:
    """LLM prefill at one average budget of visual tokens per layer: all N tokens; QAPruner's cut to
    ceil(budget·N) before the LLM (llm.onnx); the QUOTA recipe (llm_prefill.onnx: V0 in, K_l from its layers
    on). FLOPs counted per layer with each layer's own token count."""
    from qapruner.quota import processed_fraction
    from runtime.backends import OrtBackend

    n, v0, L = recipe.n, recipe.v0, cfg["num_layers"]
    plain, pre = OrtBackend(paths["llm"]), OrtBackend(paths["llm_prefill"])
    rows = []
    for name, k in (("all tokens", n), (f"QAPruner before the LLM ({budget:g})", int(np.ceil(budget * n - 1e-9)))):
        feed = _llm_feed(cfg, 1, k + TEXT_TOKENS, 0)
        rows.append({"method": name, "visual_tokens_per_layer": [k] * L, "processed": k / n,
                     "seconds": median_time(lambda: plain.infer(feed), repeats),
                     "flops": layer_flops(cfg, [k + TEXT_TOKENS] * L)})
    feed = {k: v for k, v in _llm_feed(cfg, 1, v0 + TEXT_TOKENS, 0).items() if not k.startswith("past_")}
    feed["visual_mask"] = np.zeros((1, v0 + TEXT_TOKENS), np.int64)
    feed["visual_mask"][0, 4:4 + v0] = 1  # "USER: <image>" then the question, as in the LLaVA template
    per_layer, current = [], v0
    for i in range(L):
        current = recipe.keep_at(i) or current
        per_layer.append(current)
    rows.append({"method": f"QUOTA (V0 = {v0}, layers {list(recipe.layers)} keep {list(recipe.keeps)})",
                 "visual_tokens_per_layer": per_layer,
                 "processed": processed_fraction(recipe.keeps, recipe.layers, L, v0, n),
                 "seconds": median_time(lambda: pre.infer(feed), repeats),
                 "flops": layer_flops(cfg, [t + TEXT_TOKENS for t in per_layer])})
    for row in rows:
        row["speedup"] = rows[0]["seconds"] / row["seconds"]
        row["flop_floor_speedup"] = rows[0]["flops"] / row["flops"]
    return rows


def quota_section(work: Path, repeats: int, budget: float = 0.30, deep: bool = True, log=print) -> dict:
    """QUOTA prefill at `budget` on the embedded model (its 3-layer decoder prunes at layer 2 only, after
    QAPruner's cut to 40%) and, with `deep`, on a random model with LLaVA-1.5's 576 visual tokens and an
    8-layer decoder (hidden 2048), where the recipe alone meets the budget. Recipes calibrated under
    simulated W4A4 with a 4-bit KV cache on DigitsVQA train pairs; graphs in float32."""
    import torch

    from export.llm import export_llm
    from export.quota import export_recipe_llm
    from qapruner import ptq, quota
    from qapruner.evaluate import calibration_pairs
    from qapruner.model import load, tiny

    scheme = ptq.scheme_from_name("w4a4", kv_bits=4)
    models = {"digits-llava (embedded)": (lambda: load(ROOT / "models" / "digits-llava"), 0.4, 8)}
    if deep:
        def deep_model():
            torch.manual_seed(0)
            return tiny(image_size=336, patch_size=14, vision_hidden=64, vision_layers=2, vision_heads=4,
                        text_hidden=2048, text_layers=8, text_heads=16, kv_heads=16, intermediate=5504)
        models["576 tokens, 8-layer decoder (random)"] = (deep_model, 1.0, 2)
    out = {}
    for name, (make, pre, n_pairs) in models.items():
        llava = make()
        recipe = quota.calibrate(llava, scheme, calibration_pairs(0, n_pairs), budget=budget, pre_retention=pre)
        d = work / ("quota-" + name.split()[0].replace(",", ""))
        d.mkdir(parents=True, exist_ok=True)
        paths = {"llm": export_llm(llava, d / "llm-plain.onnx")}
        export_recipe_llm(llava, recipe, d)
        paths["llm_prefill"] = d / "llm_prefill.onnx"
        cfg = _cfg(llava)
        rows = quota_rows(paths, cfg, recipe, budget, repeats)
        out[name] = {"visual_tokens": recipe.n, "llm": {x: cfg[x] for x in cfg if x != "inputs"}, "budget": budget,
                     "pre_retention": pre, "recipe": {"layers": list(recipe.layers), "keeps": list(recipe.keeps),
                                                      "v0": recipe.v0, "achieved": recipe.achieved}, "rows": rows}
        log(f"QUOTA prefill, {name}: " + "; ".join(f"{r['method']} {1e3 * r['seconds']:.2f} ms" for r in rows))
        del llava
    return out


def decode_rate(llm_path: Path, cfg: dict, config: dict, prompt: int, steps: int = 32) -> float:
    """Greedy-decode steps per second after a prefill of `prompt` tokens (batch 1)."""
    from runtime.backends import OrtBackend
    from runtime.generate import greedy

    session = OrtBackend(llm_path, config)
    feed = _llm_feed(cfg, 1, prompt, 0)
    table = (np.random.default_rng(2).standard_normal((cfg["vocab_size"], cfg["hidden_size"])) * 0.02).astype(np.float32)
    kw = dict(num_layers=cfg["num_layers"], kv_heads=cfg["kv_heads"], head_dim=cfg["head_dim"], eos_ids=[-1],
              pad_id=0)
    stamps = []
    greedy(session.infer, feed["inputs_embeds"], feed["attention_mask"], feed["position_ids"], table,
           max_new_tokens=4, **kw)  # warm-up
    greedy(session.infer, feed["inputs_embeds"], feed["attention_mask"], feed["position_ids"], table,
           max_new_tokens=steps + 1, on_step=lambda nxt: stamps.append(time.perf_counter()), **kw)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def vision_fraction(paths: dict, size: int, repeats: int) -> dict:
    """Time of the scoring-and-pruning tail (its own graph, fed the encoder's real outputs) over the time of
    the vision encoder (vision.onnx stopped at the projected features); the whole vision.onnx beside them."""
    from runtime.backends import OrtBackend

    pixels = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    enc, whole, tail = (OrtBackend(paths[g]) for g in ("encoder", "vision", "score_select"))
    features, rows = (enc.infer({"pixel_values": pixels})[n] for n in ("features", "cls_attention"))
    t_enc = median_time(lambda: enc.infer({"pixel_values": pixels}), repeats)
    t_tail = median_time(lambda: tail.infer({"features": features, "cls_rows": rows}), max(repeats, 20))
    t_full = median_time(lambda: whole.infer({"pixel_values": pixels}), repeats)
    return {"encoder_s": t_enc, "score_prune_s": t_tail, "vision_onnx_s": t_full, "fraction": t_tail / t_enc}


def _export_score_select(scoring, k: int, features: np.ndarray, rows: np.ndarray, path: Path) -> Path:
    import torch

    from export.vision import ScoreSelect

    args = (torch.from_numpy(features), torch.from_numpy(rows))
    with torch.no_grad():
        program = torch.onnx.export(ScoreSelect(scoring, k).eval(), args, dynamo=True, opset_version=21,
                                    input_names=["features", "cls_rows"], output_names=["tokens", "indices", "scores"],
                                    external_data=False, verbose=False)
    program.save(str(path))
    return path


def _cfg(llava) -> dict:
    from export.llm import io_names, kv_shape

    c = llava.model.config.text_config
    hkv, dh = kv_shape(llava)
    return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "heads": c.num_attention_heads,
            "kv_heads": hkv, "head_dim": dh, "num_layers": c.num_hidden_layers, "vocab_size": c.vocab_size,
            "inputs": io_names(c.num_hidden_layers)[0]}


def _graphs(llava, out: Path, k: int, w4: bool) -> dict:
    """fp32 vision (K) + encoder-only vision + fp32 LLM (+ INT4-weight LLM, RTN) for one model."""
    import onnx

    from export.llm import export_llm, int4_weights, weight_codes
    from export.vision import export_vision
    from qapruner import ptq
    from qapruner.scoring import Scoring

    out.mkdir(parents=True, exist_ok=True)
    d = llava.model.config.text_config.hidden_size
    scoring = Scoring(semantic="cls", alpha=0.7, group_size=min(128, d))
    paths = {"vision": export_vision(llava, scoring, k, out / "vision.onnx"),
             "encoder": export_vision(llava, scoring, k, out / "encoder.onnx", encoder_only=True),
             "llm": export_llm(llava, out / "llm.onnx")}
    from runtime.backends import OrtBackend

    size = llava.model.config.vision_config.image_size
    enc = OrtBackend(paths["encoder"]).infer({"pixel_values": np.zeros((1, 3, size, size), np.float32)})
    paths["score_select"] = _export_score_select(scoring, k, enc["features"], enc["cls_attention"],
                                                 out / "score_select.onnx")
    if w4:
        q = ptq.apply(llava, ptq.Scheme(w_bits=4, w_group_size=128))
        path = export_llm(q, out / "llm-w4.onnx")
        model, _ = int4_weights(onnx.load(str(path)), weight_codes(q))
        onnx.save(model, str(path))
        paths["llm_w4"] = path
        del q
    return paths


_RUNTIME_CHILD = """
import json, resource, statistics, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
from runtime import preprocess
from runtime.artifact import open_artifact
from runtime.infer import run
art = open_artifact({art!r})
image = preprocess.load_image({image!r})
first = time.perf_counter()
times = []
for i in range({repeats} + 1):
    t = time.perf_counter(); res = run(art, [image], [{prompt!r}], {tokens}); times.append(time.perf_counter() - t)
    if i == 0: first = time.perf_counter() - t0
from runtime.infer import peak_rss_mb
print(json.dumps({{"latency_s": statistics.median(times[1:]), "first_answer_s": first, "answer": res["answers"][0],
                  "new_tokens": res["new_tokens"], "peak_rss_mb": peak_rss_mb()}}))
"""

_TORCH_CHILD = """
import json, resource, statistics, sys, time
t0 = time.perf_counter()
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
torch.set_num_threads({threads})
model = LlavaForConditionalGeneration.from_pretrained({model!r}, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained({model!r})
image = Image.open({image!r}).convert("RGB")
times = []
with torch.inference_mode():
    for i in range({repeats} + 3):  # three warm-up requests
        t = time.perf_counter()
        inputs = processor(images=[image], text=[{prompt!r}], return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens={tokens}, do_sample=False)
        times.append(time.perf_counter() - t)
        if i == 0: first = time.perf_counter() - t0
answer = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")]
print(json.dumps({{"latency_s": statistics.median(times[3:]), "first_answer_s": first, "answer": answer,
                  "new_tokens": int(ids.shape[1] - inputs["input_ids"].shape[1]),
                  "peak_rss_mb": int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def _child(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def end_to_end(model_dir: Path, arts: dict, image: Path, prompt: str, tokens: int, repeats: int) -> dict:
    """runtime/infer.py's pipeline vs transformers generate, each in a fresh process (same image and prompt;
    transformers sees all tokens: it has no pruning)."""
    result = {"torch_transformers": _child(_TORCH_CHILD.format(model=str(model_dir), image=str(image), prompt=prompt,
                                                               tokens=tokens, repeats=repeats,
                                                               threads=os.cpu_count()))}
    for name, art in arts.items():
        result[name] = _child(_RUNTIME_CHILD.format(root=str(ROOT), art=str(art), image=str(image), prompt=prompt,
                                                    tokens=tokens, repeats=repeats))
    return result


def run(out: Path, repeats: int = 5, big: bool = True, log=print, only_quota: bool = False) -> dict:
    """Every section, or with `only_quota` the QUOTA section alone, merged into the existing `out`."""
    import torch

    from engines.build import build as build_engines
    from export.artifact import Options, build
    from qapruner import data
    from qapruner.model import load, tiny
    from qapruner.scoring import Scoring

    t_start = time.time()
    work = ROOT / "build" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    if only_quota:
        if not out.is_file():
            raise FileNotFoundError(f"{out} does not exist: run make bench (all sections) first")
        doc = json.loads(out.read_text())
        doc["quota"] = quota_section(work, repeats, deep=big, log=log)
        doc["quota_seconds"] = round(time.time() - t_start, 1)
        doc["quota_machine"] = machine()
        write(doc, out)
        return doc
    doc: dict = {"machine": machine(), "repeats": repeats, "text_tokens": TEXT_TOKENS}
    doc["matmul_gflops"] = matmul_gflops()
    log(f"MatMul: {doc['matmul_gflops']:.1f} GFLOP/s")
    models = {"digits-llava (embedded)": load(ROOT / "models" / "digits-llava")}
    if big:
        torch.manual_seed(0)
        models["LLaVA-1.5-shaped (random)"] = tiny(image_size=336, patch_size=14, vision_hidden=1024,
                                                    vision_layers=24, vision_heads=16, text_hidden=4096,
                                                    text_layers=2, text_heads=32, kv_heads=32, intermediate=11008)
    doc["models"] = {}
    e2e_dirs = {"digits-llava (embedded)": ROOT / "models" / "digits-llava"}
    for name, llava in models.items():
        n = llava.num_image_tokens
        k = int(np.ceil(0.125 * n))
        paths = _graphs(llava, work / name.split()[0], k, w4=True)
        cfg = _cfg(llava)
        entry = {"visual_tokens": n, "llm": {x: cfg[x] for x in cfg if x != "inputs"}}
        entry["prefill"] = prefill_rows(paths["llm"], cfg, n, repeats, doc["matmul_gflops"])
        log(f"{name}: prefill speedup at 12.5% {entry['prefill'][-1]['speedup']:.2f}x "
            f"(FLOP floor {entry['prefill'][-1]['flop_floor_speedup']:.2f}x)")
        entry["vision"] = vision_fraction(paths, llava.model.config.vision_config.image_size, repeats)
        log(f"{name}: score+prune = {100 * entry['vision']['fraction']:.2f}% of the vision encoder")
        prompt = k + TEXT_TOKENS
        entry["decode_tokens_per_s"] = {
            "fp32": decode_rate(paths["llm"], cfg, {}, prompt),
            "w4a16 (MatMulNBits, float activations)": decode_rate(paths["llm_w4"], cfg,
                                                                  {"session.qdq_matmulnbits_accuracy_level": "0"}, prompt),
            "w4a8 (MatMulNBits, INT8 activations)": decode_rate(paths["llm_w4"], cfg,
                                                                {"session.qdq_matmulnbits_accuracy_level": "4"}, prompt)}
        log(f"{name}: decode tokens/s {entry['decode_tokens_per_s']}")
        doc["models"][name] = entry
        if "random" in name:  # saved so that transformers and the exporter load it like any llava-hf dir
            from qapruner.model import save

            e2e_dirs[name] = save(llava, work / "llava15-shaped-model")
        del llava
    models.clear()
    # end to end: runtime at 12.5% and 100% retention vs transformers, on both models (saved as llava-hf dirs)
    from PIL import Image

    scene = data.make_scene("test", 0)
    image = work / "scene.png"
    Image.fromarray(scene.image).save(image)
    prompt = data.PROMPT.format(question=scene.questions[1].text)
    doc["end_to_end"] = {}
    for name, model_dir in e2e_dirs.items():
        arts = {}
        for r in (0.125, 1.0):
            art = work / f"{model_dir.name}-r{r:g}"
            build(model_dir, art, Options(retention=r, scoring=Scoring(group_size=128)), force=True,
                  log=lambda m: None)
            build_engines(art, log=lambda m: None)
            arts[f"runtime (ONNX Runtime, retention {r:g})"] = art
        reps = repeats if "embedded" in name else max(2, repeats // 2)
        doc["end_to_end"][name] = {"model": str(model_dir.relative_to(ROOT)), "prompt": prompt, "new_tokens": 8,
                                   "repeats": reps, **end_to_end(model_dir, arts, image, prompt, 8, reps)}
        log(f"end to end, {name}: {json.dumps(doc['end_to_end'][name])}")
    t_quota = time.time()
    doc["quota"] = quota_section(work, repeats, deep=big, log=log)
    doc["quota_seconds"] = round(time.time() - t_quota, 1)
    doc["seconds"] = round(time.time() - t_start, 1)
    write(doc, out)
    return doc


def write(doc: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out)
    m = doc["machine"]
    lines = ["# Speed and memory of the deployment path", "",
             f"Written by `make bench` (`python -m engines.bench`) in one run of {doc['seconds']:.0f} s on "
             f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, ONNX Runtime {m['onnxruntime']} on the CPU "
             f"(no GPU here: no TensorRT figures). Each time is the median of {doc['repeats']} runs after a warm-up. "
             f"Prefill = one LLM pass over the kept visual tokens plus {doc['text_tokens']} text tokens with an empty "
             f"KV cache (logits of the last position only). This machine's float32 MatMul in ONNX Runtime: "
             f"**{doc['matmul_gflops']:.1f} GFLOP/s** (512×4096 by 4096×4096).", ""]
    for name, e in doc["models"].items():
        llm = e["llm"]
        lines += [f"## {name}: {e['visual_tokens']} visual tokens, LLM hidden {llm['hidden_size']}, "
                  f"{llm['num_layers']} layers, MLP {llm['intermediate_size']}", "",
                  "| retention | visual tokens | prefill (ms) | speed-up vs 100% | FLOP-floor speed-up | achieved GFLOP/s "
                  "| of MatMul peak |", "|---|---|---|---|---|---|---|"]
        for r in e["prefill"]:
            lines.append(f"| {r['retention']:g} | {r['visual_tokens']} | {1e3 * r['seconds']:.2f} | {r['speedup']:.2f}× "
                         f"| {r['flop_floor_speedup']:.2f}× | {r['achieved_gflops']:.1f} | "
                         f"{100 * r['fraction_of_matmul_peak']:.0f}% |")
        v = e["vision"]
        lines += ["", f"Scoring and pruning (E, R, CLS attention, normalisation, fusion, TopK, sort, gather — as a graph of "
                  f"its own on the encoder's outputs): {1e3 * v['score_prune_s']:.3f} ms against the encoder's "
                  f"{1e3 * v['encoder_s']:.1f} ms = **{100 * v['fraction']:.2f}%** of the vision encoder (target ≤ 3%); "
                  f"the whole vision.onnx: {1e3 * v['vision_onnx_s']:.1f} ms.",
                  "", "Decode (batch 1, after a prefill at 12.5%), tokens/s: " +
                  ", ".join(f"{k} **{t:.1f}**" for k, t in e["decode_tokens_per_s"].items()) + ".", ""]
    for name, e2e in doc["end_to_end"].items():
        torch_row = e2e["torch_transformers"]
        lines += [f"## End to end, {name}: `runtime/infer.py` vs transformers `generate`", "",
                  f"Model `{e2e['model']}`, one DigitsVQA test image, prompt `{e2e['prompt']}`, greedy, at most "
                  f"{e2e['new_tokens']} new tokens (both stop at end of sequence). Each path in a fresh process; "
                  f"latency per request (preprocessing to last token): median of {e2e['repeats']} after three "
                  "warm-up requests; peak RSS of the whole process (VmHWM). transformers runs all visual tokens (it "
                  "has no pruning).", "",
                  "| path | latency per request (ms) | speed-up vs transformers | new tokens | first answer incl. "
                  "imports and load (s) | peak RSS (MB) | RSS vs transformers |", "|---|---|---|---|---|---|---|"]
        for key in ["torch_transformers"] + [k for k in e2e if k.startswith("runtime")]:
            r = e2e[key]
            lines.append(f"| {key.replace('_', ' ')} | {1e3 * r['latency_s']:.1f} | "
                         f"{torch_row['latency_s'] / r['latency_s']:.2f}× | {r['new_tokens']} | "
                         f"{r['first_answer_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                         f"{100 * r['peak_rss_mb'] / torch_row['peak_rss_mb']:.0f}% |")
        lines.append("")
    if "quota" in doc:
        lines += [f"## QUOTA: LLM prefill at an average budget of {next(iter(doc['quota'].values()))['budget']:g} "
                  "of the visual tokens per layer", "",
                  f"`python -m engines.bench --only-quota` (in {doc.get('quota_seconds', 0):.0f} s; also part of "
                  "`make bench`). Float32 graphs in ONNX Runtime, batch 1, "
                  f"{doc['text_tokens']} text tokens; recipes calibrated (`qapruner.quota.calibrate`) under simulated "
                  "W4A4 with a 4-bit KV cache on DigitsVQA train pairs. QUOTA runs the exported `llm_prefill.onnx` "
                  "(scoring, TopK and Gather inside the graph); the other rows run the plain `llm.onnx`. "
                  "Processed = mean over decoder layers of the fraction of the N visual tokens a layer sees.", ""]
        for name, q in doc["quota"].items():
            llm = q["llm"]
            lines += [f"### {name}: {q['visual_tokens']} visual tokens, LLM hidden {llm['hidden_size']}, "
                      f"{llm['num_layers']} layers", "",
                      "| method | visual tokens per layer | processed | prefill (ms) | speed-up vs all tokens | "
                      "FLOP-floor speed-up |", "|---|---|---|---|---|---|"]
            for r in q["rows"]:
                lines.append(f"| {r['method']} | {', '.join(map(str, r['visual_tokens_per_layer']))} | "
                             f"{r['processed']:.3f} | {1e3 * r['seconds']:.2f} | {r['speedup']:.2f}× | "
                             f"{r['flop_floor_speedup']:.2f}× |")
            lines.append("")
    lines += ["", "Targets (issue): prefill at 12.5% ≥ 5× faster than at 100% on the LLaVA-1.5-shaped model; "
              "score+prune ≤ 3% of the vision encoder; runtime end to end ≥ 3× faster than transformers; runtime "
              "peak RSS ≤ 40% of the torch path.", ""]
    md = out.with_suffix(".md")
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, md)


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engines.bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "speed.json")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-big", action="store_true", help="skip the LLaVA-1.5-shaped and the 8-layer models")
    p.add_argument("--only-quota", action="store_true",
                   help="rerun the QUOTA prefill section only, merged into the existing --out")
    args = p.parse_args(argv)
    try:
        run(args.out, args.repeats, not args.no_big, log=lambda m: print(m, file=sys.stderr),
            only_quota=args.only_quota)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
