"""Parity of exported artifacts: torch vs ONNX Runtime (and ONNX Runtime vs TensorRT where it exists).

For each artifact (`engines/NAME/`, built by `python -m export`):
1. Polygraphy compares each graph's outputs, torch vs ONNX Runtime, with stated per-output tolerances
   (`TOLERANCES`) on the calibration pairs; the JSON run results are saved.
2. Kept-index agreement: |kept_onnx ∩ kept_torch| / K per calibration image (torch in float).
3. Greedy answers of the slim runtime (`runtime.infer.run`: numpy preprocessing and tokenization,
   vision.onnx -> numpy splice -> llm.onnx with KV cache, on the engines `make engines` built if any) vs the
   torch pipeline under the same simulated scheme, on DigitsVQA test questions.
The torch reference of a quantized artifact is rebuilt from the manifest: same scheme, same calibration pairs,
same K. `python -m export.compare` writes docs/results/parity.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from export.artifact import llm_feeds, vision_feeds
from qapruner import ptq
from qapruner.quant import sqnr_db
from qapruner.scoring import Scoring

# Per-output elementwise tolerances (atol, rtol) of ONNX Runtime against torch under the same simulated scheme
# (an element fails when it exceeds both, polygraphy's rule), and a floor on the median SQNR of every output.
# Float graphs, W4A16 and INT8 (W8A8, INT8 vision: the torch reference mirrors the graph's own INT8 weights
# and scales, `mirror_int8`) compute the same quantized model: round-off, plus for INT8 the rare activation
# that rounds to the neighbouring integer. W4A8's INT8 activations are MatMulNBits' own per-block dynamic
# quantizer, not the torch simulation's per-token one: loose elementwise bounds (about twice the worst error
# measured on the embedded model), the SQNR floor is the check. Float16 graphs are held against float32 torch.
TOLERANCES = {
    ("vision", "fp32"): {"tokens": (1e-4, 1e-3), "scores": (1e-4, 1e-3), "sqnr_db": 80},
    ("vision", "fp16"): {"scores": (0.005, 0.01), "sqnr_db": 40},
    ("vision", "int8"): {"scores": (0.05, 0.05), "sqnr_db": 40},
    ("llm", "fp32"): {"logits": (1e-3, 1e-3), "present": (1e-4, 1e-3), "sqnr_db": 80},
    ("llm", "fp16"): {"logits": (0.1, 0.02), "present": (1.0, 0.05), "sqnr_db": 35},
    ("llm", "w4a16"): {"logits": (1e-3, 1e-3), "present": (1e-4, 1e-3), "sqnr_db": 80},
    ("llm", "w4a8"): {"logits": (0.25, 0.1), "present": (0.6, 0.25), "sqnr_db": 30},
    ("llm", "w8a8"): {"logits": (0.05, 0.01), "present": (0.25, 0.05), "sqnr_db": 60},
}


def scoring_of(manifest: dict) -> Scoring:
    return Scoring(semantic=manifest["semantic"], alpha=manifest["alpha"], group_size=manifest["group_size"],
                   bits=manifest["bits"], sq_mode=manifest["sq_mode"])


def reference(llava, manifest: dict, pairs, art: Path):
    """The torch model under the artifact's simulated scheme. INT4 weights: the core library's scheme,
    calibrated as the export was (the graph holds those very codes). INT8 graphs: the graph's own INT8
    weights and activation scales mirrored into `ptq.QuantLinear`s (`mirror_int8`), so torch and ONNX Runtime
    run the same quantized model and any difference is an implementation difference."""
    from qapruner.pipeline import calibrator

    llm = manifest["llm"]["precision"]
    if llm in ("fp32", "fp16"):  # float16 graphs are held against float32 torch
        ref = llava
    elif llm in ("w4a16", "w4a8"):
        scheme = ptq.Scheme(w_bits=4, a_bits=8 if llm == "w4a8" else None,
                            w_group_size=manifest["llm"]["block_size"], w_method=manifest["llm"]["w_method"])
        k = manifest["keep"] if manifest["calibration"]["tokens"] == "pruned" else manifest["num_image_tokens"]
        calib = calibrator(pairs, keep=k, scoring=scoring_of(manifest), positions=manifest["positions"]) \
            if scheme.needs_calibration else None
        ref = ptq.apply(llava, scheme, calib)
    elif llm == "w8a8":
        ref = mirror_int8(llava, art / "llm.onnx", ("model.language_model",))
    else:
        raise ValueError(f"no torch reference for LLM precision {llm!r}")
    if manifest["vision"]["precision"] == "int8":
        # the vision graph stops at the feature layer: the tower's layers above it have no MatMuls there
        from qapruner.model import _attention_index, _encoder_layers

        n_layers = len(_encoder_layers(llava.model.model.vision_tower))
        last = _attention_index(llava.model.config.vision_feature_layer, n_layers) % n_layers
        unused = tuple(f"model.vision_tower.encoder.layers.{i}." for i in range(last + 1, n_layers))
        ref = mirror_int8(ref, art / "vision.onnx", ("model.vision_tower", "model.multi_modal_projector"),
                          skip=lambda name: name.startswith(unused))
    return ref


def mirror_int8(llava, graph: Path, prefixes: tuple[str, ...], skip=lambda name: False):
    """A copy of `llava` whose linears under `prefixes` are `ptq.QuantLinear`s carrying exactly the INT8
    weights and static activation scales ONNX Runtime wrote into `graph` — the same quantized model in torch.
    Graph MatMuls are matched to linears by shape and nearest weight (INT8 error is far below the distance
    between two different weight matrices)."""
    import copy

    from export.qdq import int8_parameters

    params = int8_parameters(graph)
    model = copy.deepcopy(llava.model)
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith(prefixes) and not skip(n)}
    used = set()
    for name, lin in linears.items():
        w = lin.weight.detach().numpy().T
        cands = [(float(np.abs(p["weight"] - w).max()), i) for i, p in enumerate(params)
                 if i not in used and p["weight"].shape == w.shape]
        if not cands:
            raise ValueError(f"{graph}: no INT8 MatMul for {name}")
        err, i = min(cands)
        used.add(i)
        q = ptq.QuantLinear(lin)
        q.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(params[i]["weight"].T)))
        if params[i]["bias"] is not None:
            q.bias.data.copy_(torch.from_numpy(params[i]["bias"]))
        q.act_scale = torch.tensor(params[i]["act_scale"], dtype=torch.float32)
        q.a_bits, q.a_mode = 8, "static"
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    if len(used) != len(params):
        raise ValueError(f"{graph}: {len(params) - len(used)} INT8 MatMuls matched no linear under {prefixes}")
    return llava.replace(model=model)


def _tolerance_key(output: str) -> str:
    return "present" if output.startswith("present.") else output


def polygraphy_compare(session_factory, feeds: list[dict], torch_outputs: list[dict], tolerances: dict,
                       save: Path | None = None) -> dict:
    """Run the ONNX Runtime session through polygraphy on `feeds` and compare with the torch outputs."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, CompareFunc, IterationResult, RunResults
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING  # the per-output histograms go to the saved JSON, not stdout
    runner = OnnxrtRunner(session_factory, name="onnxruntime")
    results = Comparator.run([runner], data_loader=feeds)
    ref = RunResults()
    ref.append(("torch", [IterationResult({k: v for k, v in o.items()}, runner_name="torch")
                          for o in torch_outputs]))
    results.extend(ref)
    names = list(torch_outputs[0])
    atol = {n: tolerances[_tolerance_key(n)][0] for n in names}
    rtol = {n: tolerances[_tolerance_key(n)][1] for n in names}
    verdict = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol),
                                          comparisons=[(1, 0)])
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        results.save(str(save))
    got = [dict(r) for r in results[0][1]]
    worst = {n: float(max(np.abs(g[n].astype(np.float64) - o[n]).max() for g, o in zip(got, torch_outputs)))
             for n in names}
    sqnr = {n: float(np.median([sqnr_db(torch.from_numpy(o[n]), torch.from_numpy(g[n]))
                                for g, o in zip(got, torch_outputs)])) for n in names}
    floor = tolerances["sqnr_db"]
    return {"passed": bool(verdict) and min(sqnr.values()) >= floor, "polygraphy_passed": bool(verdict),
            "sqnr_floor_db": floor, "max_abs_error": worst, "median_sqnr_db": sqnr,
            "tolerances": {n: {"atol": atol[n], "rtol": rtol[n]} for n in names}}


def _session(path: Path, config: dict):
    """A polygraphy session loader: the runtime's own ONNX Runtime session, with the artifact's settings."""
    from runtime.backends import OrtBackend

    return lambda: OrtBackend(path, config).session


def tensorrt_compare(art: Path, vfeeds: list[dict]) -> dict:
    """ONNX Runtime vs TensorRT on vision.onnx where tensorrt and a GPU exist; else says why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return {"skipped": "tensorrt is not importable here (it needs an NVIDIA GPU and its wheel): "
                           "ONNX Runtime vs TensorRT not compared"}
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    manifest = json.loads((art / "manifest.json").read_text())
    shape = vfeeds[0]["pixel_values"].shape
    profile = Profile().add("pixel_values", min=(1, *shape[1:]), opt=shape, max=(max(8, shape[0]), *shape[1:]))
    config = CreateConfig(int8=manifest["vision"]["precision"] == "int8", profiles=[profile])
    runners = [OnnxrtRunner(_session(art / "vision.onnx", {}), name="onnxruntime"),
               TrtRunner(EngineFromNetwork(NetworkFromOnnxPath(str(art / "vision.onnx")), config=config))]
    results = Comparator.run(runners, data_loader=vfeeds)
    ok = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol={"": 1e-2}, rtol={"": 1e-2}))
    return {"passed": bool(ok)}


def _recipe(art: Path, manifest: dict):
    """The QUOTA recipe baked into the artifact (its recipe.json, checked against the manifest), or None."""
    from export.calibration import file_sha256
    from qapruner.quota import Recipe

    info = manifest["llm"].get("recipe")
    if not info:
        return None
    path = art / info["file"]
    if file_sha256(path) != info["sha256"]:
        raise ValueError(f"{path} changed since the export (sha256 differs from the manifest): re-export")
    return Recipe.load(path)


def _torch_outputs(module, feeds: list[dict], inputs: list[str], outputs: list[str]) -> list[dict]:
    """`module` run on each feed's `inputs` (in order), as {output name: array}, one dict per feed."""
    with torch.no_grad():
        return [dict(zip(outputs, (t.numpy() for t in module(*(torch.from_numpy(f[n]) for n in inputs)))))
                for f in feeds]


def overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row |a ∩ b| / K of two [B, K] index sets."""
    return np.array([len(set(x.tolist()) & set(y.tolist())) / len(x) for x, y in zip(a, b)])


def compare(art: str | Path, questions: int = 200, reports: Path | None = None, log=print) -> dict:
    """All parity figures of one artifact (see the module docstring)."""
    from export.calibration import load_pairs
    from export.llm import Decoder, weight_codes
    from export.vision import VisionPruner
    from qapruner import data, pipeline, quota
    from qapruner.model import load
    from runtime.backends import OrtBackend

    art = Path(art)
    manifest = json.loads((art / "manifest.json").read_text())
    llava = load(manifest["source"])
    scoring = scoring_of(manifest)
    k = manifest["keep"]
    calib = manifest["calibration"]
    check_pairs = load_pairs(calib["dir"] or "calibration_data")
    pairs = check_pairs[: calib["pairs"]] if calib["pairs"] else []  # the pairs the export calibrated on
    ref = reference(llava, manifest, pairs, art)
    if manifest["llm"]["precision"] in ("w4a16", "w4a8"):  # the graph must hold the reference's INT4 codes
        assert manifest["llm"]["int4_linears"] == len(weight_codes(ref))
    t0 = time.time()
    result = {"artifact": str(art), "keep": k, "num_image_tokens": manifest["num_image_tokens"],
              "vision": manifest["vision"]["precision"], "llm": manifest["llm"]["precision"],
              "semantic": manifest["semantic"]}
    if manifest["llm"].get("recipe"):
        result["recipe"] = {f: manifest["llm"]["recipe"][f] for f in ("layers", "keeps", "v0", "achieved")}
    # 1. vision graph: polygraphy, torch (same simulated scheme) vs ONNX Runtime, on the calibration images
    vfeeds = vision_feeds(llava, check_pairs, manifest["semantic"])

    def run_torch(model):
        module = VisionPruner(model, scoring, k).eval()
        outs = []
        with torch.no_grad():
            for f in vfeeds:
                args = [torch.from_numpy(f["pixel_values"])]
                if "text_embedding" in f:
                    args.append(torch.from_numpy(f["text_embedding"]))
                tokens, indices, scores = module(*args)
                outs.append({"tokens": tokens.numpy(), "indices": indices.numpy(), "scores": scores.numpy()})
        return outs
    vref = run_torch(ref)
    vfloat = vref if manifest["vision"]["precision"] == "fp32" else run_torch(llava)
    vis = OrtBackend(art / "vision.onnx")
    vout = [vis.infer(f) for f in vfeeds]
    ov = np.concatenate([overlap(o["indices"], r["indices"]) for o, r in zip(vout, vref)])
    ovf = np.concatenate([overlap(o["indices"], r["indices"]) for o, r in zip(vout, vfloat)])
    result["index_overlap"] = {"mean": float(ov.mean()), "min": float(ov.min()), "images": int(ov.size),
                               "vs_float_mean": float(ovf.mean()), "vs_float_min": float(ovf.min())}
    tol = TOLERANCES[("vision", manifest["vision"]["precision"])]
    # elementwise on what is defined whatever the selection; INT8 may keep other tokens, so its gathered
    # `tokens` are held by the index overlap above instead
    outs = ("tokens", "scores") if manifest["vision"]["precision"] == "fp32" else ("scores",)
    result["vision_graph"] = polygraphy_compare(
        _session(art / "vision.onnx", {}), vfeeds, [{n: r[n] for n in outs} for r in vref], tol,
        reports / f"{art.name}.vision.json" if reports else None)
    log(f"{art.name}: vision {result['vision_graph']['passed']}, kept-index overlap {ov.mean():.4f} "
        f"(vs float {ovf.mean():.4f})")
    # 2. LLM graph: polygraphy, torch (same simulated scheme) vs ONNX Runtime, on pruned prefills
    recipe = _recipe(art, manifest)
    lfeeds = llm_feeds(llava, check_pairs[:16], k, scoring, manifest["positions"], art / "vision.onnx",
                       recipe=recipe is not None)
    names = manifest["llm"]["outputs"]
    tol = TOLERANCES[("llm", manifest["llm"]["precision"])]
    config = manifest["llm"]["session_options"]
    if recipe is None:
        lref = _torch_outputs(Decoder(ref).eval(), lfeeds, manifest["llm"]["inputs"], names)
    else:
        from export.quota import PREFILL_INPUTS, RecipeDecode, RecipePrefill

        lref = _torch_outputs(RecipePrefill(ref, recipe).eval(), lfeeds, PREFILL_INPUTS, names)
        # the decode graph: one step after each torch prefill, over the per-layer (pruned) caches it left
        table = ref.model.get_input_embeddings().weight.detach().float().numpy()
        dfeeds = [{"inputs_embeds": table[r["logits"][:, -1].argmax(-1)][:, None, :],
                   "attention_mask": np.concatenate([f["attention_mask"], np.ones((1, 1), np.int64)], 1),
                   "position_ids": f["position_ids"][:, -1:] + 1,
                   **{"past_key_values." + n[len("present."):]: r[n] for n in names[1:]}} for f, r in zip(lfeeds, lref)]
        dref = _torch_outputs(RecipeDecode(ref, recipe).eval(), dfeeds, manifest["llm"]["inputs"], names)
        if manifest["llm"]["precision"] in ("w4a8", "fp16"):
            # the graph's arithmetic is not the reference's (MatMulNBits' INT8 activations; float16 against
            # float32 torch): a near-tie among the scores at a recipe layer may then keep another token, and
            # the presents from that layer on hold other tokens. As with the INT8 vision graph's `tokens`,
            # those are held by the logits' SQNR and the answers, not elementwise.
            same = ["logits"] + [f"present.{i}.{t}" for i in range(recipe.layers[0]) for t in ("key", "value")]
            lref = [{n: r[n] for n in same} for r in lref]
        result["llm_decode_graph"] = polygraphy_compare(
            _session(art / "llm.onnx", config), dfeeds, dref, tol,
            reports / f"{art.name}.llm_decode.json" if reports else None)
        log(f"{art.name}: llm decode {result['llm_decode_graph']['passed']} (logits SQNR "
            f"{result['llm_decode_graph']['median_sqnr_db']['logits']:.1f} dB)")
    result["llm_graph"] = polygraphy_compare(
        _session(art / ("llm.onnx" if recipe is None else "llm_prefill.onnx"), config), lfeeds, lref, tol,
        reports / f"{art.name}.llm.json" if reports else None)
    log(f"{art.name}: llm {result['llm_graph']['passed']} (logits SQNR "
        f"{result['llm_graph']['median_sqnr_db']['logits']:.1f} dB)")
    # 3. greedy answers: the slim runtime (runtime.infer.run: numpy preprocessing and tokenization, the
    # artifact's engines in ONNX Runtime) vs the torch pipeline under the same scheme
    from PIL import Image

    from runtime.artifact import open_artifact
    from runtime.infer import run

    deployed = open_artifact(art, "ort")
    same = correct_onnx = correct_torch = 0
    qs = data.questions("test", questions, seed=0)
    for scene, q in qs:
        prompt = data.PROMPT.format(question=q.text)
        got = run(deployed, [Image.fromarray(scene.image)], [prompt])["answers"][0]
        if recipe is None:
            want = pipeline.answer(ref, [scene.image], [prompt], keep=k, scoring=scoring,
                                   positions=manifest["positions"]).texts[0]
        else:
            want = quota.answer(ref, recipe, [scene.image], [prompt], keep=k, scoring=scoring,
                                positions=manifest["positions"])[0]
        same += got == want
        correct_onnx += got == q.answer
        correct_torch += want == q.answer
    n = len(qs)
    result["answers"] = {"questions": n, "agreement": same / n, "accuracy_onnx": correct_onnx / n,
                         "accuracy_torch": correct_torch / n}
    log(f"{art.name}: answers equal on {same}/{n}")
    result["tensorrt"] = tensorrt_compare(art, vfeeds[:4])
    result["seconds"] = round(time.time() - t0, 1)
    return result


def write_report(results: list[dict], out_json: Path, out_md: Path) -> None:
    from export.artifact import versions

    out_json.parent.mkdir(parents=True, exist_ok=True)
    doc = {"results": results, "versions": versions(), "command": "make compare"}
    tmp = out_json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.rename(out_json)
    lines = ["# Parity of the exported graphs (torch vs ONNX Runtime)", "",
             "Written by `make compare` (`python -m export.compare`); the embedded model `models/digits-llava`. "
             "Each graph vs torch under the same *simulated* scheme: float; W4A16 / W4A8 with the core library's "
             "GPTQ codes (calibrated on the same pairs at the same K); INT8 vision and W8A8 with the graph's own "
             "INT8 weights and static scales mirrored into `qapruner.ptq.QuantLinear`s; fp16 vs float32 torch. "
             "Kept-index overlap is also given against float torch (the cost of quantization itself). Answers: "
             "the slim runtime (`runtime.infer.run`, its own numpy preprocessing, the engines `make engines` "
             "built) vs the torch pipeline. Deployable precisions only: W4A4 has no engine.", "",
             "| artifact | K/N | vision | LLM | kept-index overlap, mean / min (vs float torch) | vision graph "
             "(polygraphy) | LLM graph (polygraphy) | logits SQNR | answers equal | acc. ONNX / torch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        a = r["answers"]
        q = r.get("recipe")
        llm = r["llm"] + (f" + QUOTA (layers {q['layers']} keep {q['keeps']})" if q else "")
        lines.append(f"| {Path(r['artifact']).name} | {r['keep']}/{r['num_image_tokens']} | {r['vision']} | {llm} "
                     f"| {100 * r['index_overlap']['mean']:.2f}% / {100 * r['index_overlap']['min']:.1f}% "
                     f"({100 * r['index_overlap']['vs_float_mean']:.2f}% / {100 * r['index_overlap']['vs_float_min']:.1f}%) "
                     f"| {'pass' if r['vision_graph']['passed'] else 'FAIL'} "
                     f"| {'pass' if r['llm_graph']['passed'] else 'FAIL'}"
                     f"{'' if 'llm_decode_graph' not in r else ' (prefill), ' + ('pass' if r['llm_decode_graph']['passed'] else 'FAIL') + ' (decode)'} "
                     f"| {r['llm_graph']['median_sqnr_db']['logits']:.1f} dB "
                     f"| {100 * a['agreement']:.1f}% of {a['questions']} | {100 * a['accuracy_onnx']:.1f}% / "
                     f"{100 * a['accuracy_torch']:.1f}% |")
    lines += ["", "Tolerances (atol, rtol) per output, from `export/compare.py`:", ""]
    for (graph, prec), t in TOLERANCES.items():
        lines.append(f"- {graph} {prec}: " + ", ".join(f"{k} ({v[0]:g}, {v[1]:g})" for k, v in t.items()
                                                      if k != "sqnr_db") + f"; median SQNR ≥ {t['sqnr_db']} dB")
    trt = {json.dumps(r["tensorrt"]) for r in results}
    lines += ["", "ONNX Runtime vs TensorRT: " + "; ".join(sorted(trt)), "",
              "Polygraphy run results (JSON) are saved under `build/compare/`."]
    tmp = out_md.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(out_md)


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.compare", description="torch vs ONNX Runtime parity")
    p.add_argument("artifacts", nargs="+", help="engines/NAME folders built by python -m export")
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--reports", default="build/compare", help="folder for polygraphy's JSON run results")
    p.add_argument("--out", default="docs/results/parity.json")
    args = p.parse_args(argv)
    try:
        results = [compare(a, args.questions, Path(args.reports), log=lambda m: print(m, file=sys.stderr))
                   for a in args.artifacts]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    write_report(results, out, out.with_suffix(".md"))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if all(r["vision_graph"]["passed"] and r["llm_graph"]["passed"]
                    and r.get("llm_decode_graph", {"passed": True})["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(_main())
