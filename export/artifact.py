"""One deployable artifact: `engines/NAME/` = vision.onnx + llm.onnx + embed_tokens.npy + tokenizer and
processor files + manifest.json, written to a temporary sibling and renamed into place.

The artifact describes itself: manifest.json (settings, versions, calibration set, sha256 of the source model
and of every file written) and the same key facts in each ONNX file's metadata_props. Nothing is parsed from
file names.
"""
from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from export.calibration import file_sha256 as sha256_file
from qapruner.model import model_sha256  # noqa: F401  (re-exported: the manifest's source hash)
from qapruner.pruning import resolve_k
from qapruner.scoring import Scoring

FORMAT = "qapruner-artifact/1"
MIN_OPSET, INT4_OPSET = 18, 21
# INT8 Q/DQ graphs are written at opset 20: at opset 21 ONNX Runtime (1.30 and 1.32 measured) fails to create a
# session for the QDQ models its own quantizer writes — QDQ propagation inserts Q nodes with output_dtype INT8
# and the S8->U8 transformer then gives them UINT8 zero points (onnxruntime issue #25526). TensorRT reads both.
INT8_OPSET = 20  # = export.qdq.MAX_OPSET


def graph_opsets(options: "Options") -> dict[str, int]:
    """The opset each graph is written at."""
    return {"vision": min(options.opset, INT8_OPSET) if options.vision.int8 else options.opset,
            "llm": min(options.opset, INT8_OPSET) if options.llm.weight_bits == 8 else options.opset}


@dataclass(frozen=True)
class VisionPrecision:
    """How vision.onnx runs: float32, INT8 Q/DQ on the tower's and projector's weight layers, or float16 tower
    and projector (the score, TopK and gather stay float32)."""
    int8: bool = False
    fp16: bool = False

    def __post_init__(self):
        if self.int8 and self.fp16:
            raise ValueError("choose one of int8 and fp16 for the vision graph")

    @property
    def name(self) -> str:
        return "int8" if self.int8 else "fp16" if self.fp16 else "fp32"


@dataclass(frozen=True)
class LlmPrecision:
    """How llm.onnx runs. weight_bits: None (float), 4 (block DQ of the core library's GPTQ/RTN codes) or
    8 (ORT Q/DQ, with static INT8 activations). int8_activations with 4-bit weights means ONNX Runtime's
    MatMulNBits with INT8 activations (session.qdq_matmulnbits_accuracy_level 4): same graph as W4A16."""
    weight_bits: int | None = None
    int8_activations: bool = False
    block_size: int = 128
    w_method: str = "gptq"
    fp16: bool = False  # float16 weights and arithmetic, float32 inputs and outputs

    def __post_init__(self):
        if self.fp16 and self.weight_bits is not None:
            raise ValueError("fp16 applies to the float LLM only (weight_bits None)")
        if self.weight_bits not in (None, 4, 8):
            raise ValueError(f"weight_bits must be None, 4 or 8, got {self.weight_bits!r}")
        if self.weight_bits is None and self.int8_activations:
            raise ValueError("INT8 activations need quantized weights (w8a8 or w4a8)")
        if self.weight_bits == 8 and not self.int8_activations:
            raise ValueError("8-bit weights are exported as W8A8 only")
        if self.block_size not in (32, 64, 128):
            raise ValueError(f"INT4 block size must be 32, 64 or 128, got {self.block_size!r}")
        if self.w_method not in ("gptq", "rtn"):
            raise ValueError(f"w_method must be 'gptq' or 'rtn', got {self.w_method!r}")

    @property
    def name(self) -> str:
        if self.weight_bits is None:
            return "fp16" if self.fp16 else "fp32"
        return f"w{self.weight_bits}a{8 if self.int8_activations else 16}"

    def session_options(self) -> dict[str, str]:
        """ONNX Runtime session config entries this precision needs."""
        if self.weight_bits == 4:
            return {"session.qdq_matmulnbits_accuracy_level": "4" if self.int8_activations else "0"}
        return {}


@dataclass(frozen=True)
class Options:
    """Everything an artifact is built from (recorded in its manifest)."""
    keep: int | None = None
    retention: float | None = None
    scoring: Scoring = Scoring()
    vision: VisionPrecision = VisionPrecision()
    llm: LlmPrecision = LlmPrecision()
    opset: int = 21
    calibration: str | None = None         # folder for export.calibration.load_pairs
    calibration_limit: int | None = None   # use the first N pairs
    calibrate_pruned: bool = True          # LLM statistics on the artifact's K kept tokens (False: all N)
    positions: str = "original"
    recipe: str | None = None              # a QUOTA recipe (qapruner.quota) baked into the LLM graphs

    def __post_init__(self):
        if self.opset < MIN_OPSET:
            raise ValueError(f"opset {self.opset} is too low: the exporter needs opset ≥ {MIN_OPSET}")
        if self.llm.weight_bits == 4 and self.opset < INT4_OPSET:
            raise ValueError(f"opset {self.opset} is too low for INT4 weights: block-wise DequantizeLinear "
                             f"needs opset ≥ {INT4_OPSET}")
        if (self.keep is None) == (self.retention is None):
            raise ValueError("give exactly one of keep (a token count) or retention (a fraction)")
        if self.recipe is not None and self.llm.weight_bits == 8:
            raise ValueError("a QUOTA recipe is exported with fp32, fp16, w4a16 or w4a8 LLMs (W8A8's ONNX Runtime "
                             "calibration of the pruning graphs is not supported)")

    @property
    def needs_calibration(self) -> bool:
        return self.vision.int8 or self.llm.int8_activations or (self.llm.weight_bits == 4
                                                                 and self.llm.w_method == "gptq")


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def set_metadata(path: Path, props: dict) -> None:
    """Write `props` into the ONNX file's metadata_props (values JSON-encoded unless strings)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()})
    onnx.save(model, str(path))


def read_metadata(path: str | Path) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def _vision_feed(llava, batch: dict, semantic: str | None) -> dict[str, np.ndarray]:
    from qapruner.pipeline import text_embedding

    feed = {"pixel_values": batch["pixel_values"].float().numpy()}
    if semantic == "text":
        feed["text_embedding"] = text_embedding(llava, batch["input_ids"], batch["attention_mask"]).float().numpy()
    return feed


def vision_feeds(llava, pairs, semantic: str | None) -> list[dict[str, np.ndarray]]:
    """Calibration / comparison feeds for vision.onnx, one pair per feed."""
    from qapruner.pipeline import encode_inputs

    with torch.no_grad():
        return [_vision_feed(llava, encode_inputs(llava, [image], [prompt]), semantic) for image, prompt in pairs]


def llm_feeds(llava, pairs, keep: int, scoring: Scoring, positions: str,
              vision_graph: str | Path | None = None, recipe: bool = False) -> list[dict[str, np.ndarray]]:
    """Prefill feeds for llm.onnx (empty past), one pair each. With `vision_graph`, the kept tokens come from
    that exported vision.onnx run in ONNX Runtime (the deployed operators: an INT8 vision graph calibrates
    the LLM on the tokens it really produces); otherwise from the float torch reference at `keep`. With
    `recipe`, feeds for a QUOTA artifact's llm_prefill.onnx: visual_mask instead of the past."""
    from export.llm import io_names, kv_shape
    from qapruner.pipeline import encode_inputs, prefill_inputs
    from runtime.backends import OrtBackend
    from runtime.generate import splice, visual_mask

    n = llava.model.config.text_config.num_hidden_layers
    hkv, dh = kv_shape(llava)
    names = io_names(n)[0]
    session = OrtBackend(vision_graph) if vision_graph is not None else None
    table = llava.model.get_input_embeddings().weight.detach().float().numpy()
    feeds = []
    with torch.no_grad():
        for image, prompt in pairs:
            b = encode_inputs(llava, [image], [prompt])
            if session is not None:
                v = session.infer(_vision_feed(llava, b, scoring.semantic))
                e, m, p = splice(b["input_ids"].numpy(), b["attention_mask"].numpy(), v["tokens"], v["indices"],
                                 table, llava.image_token_id, positions)
                feed = {"inputs_embeds": e, "attention_mask": m, "position_ids": p}
                indices = v["indices"]
            else:
                p = prefill_inputs(llava, [image], [prompt], keep=keep, scoring=scoring, positions=positions)
                feed = {"inputs_embeds": p.inputs_embeds.float().numpy(), "attention_mask": p.attention_mask.numpy(),
                        "position_ids": p.position_ids.numpy()}
                indices = p.indices.numpy()
            if recipe:
                feed["visual_mask"] = visual_mask(b["input_ids"].numpy(), indices, llava.image_token_id)
            else:
                for name in names[3:]:
                    feed[name] = np.zeros((1, hkv, 0, dh), np.float32)
            feeds.append(feed)
    return feeds


def build(model_dir: str | Path, out: str | Path, options: Options, *, force: bool = False,
          log=print) -> dict:
    """Export one artifact into `out` (atomically). Returns the manifest."""
    from export import llm as llm_graph
    from export import fp16, qdq, vision as vision_graph
    from qapruner import ptq
    from qapruner.model import load
    from qapruner.pipeline import calibrator

    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists: pass --force to replace it")
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    llava = load(model_dir)
    n = llava.num_image_tokens
    recipe = None
    if options.recipe is not None:
        from qapruner.quota import Recipe

        recipe = Recipe.load(options.recipe, llava)
    if options.keep is not None and options.keep > vision_graph.TRT_MAX_TOPK:
        raise ValueError(f"K = {options.keep} exceeds TensorRT's TopK limit of {vision_graph.TRT_MAX_TOPK}")
    k = resolve_k(n, options.keep, options.retention)
    if k > vision_graph.TRT_MAX_TOPK:
        raise ValueError(f"K = {k} exceeds TensorRT's TopK limit of {vision_graph.TRT_MAX_TOPK}")
    dim = llava.model.config.text_config.hidden_size
    if recipe is not None and recipe.v0 != k:
        raise ValueError(f"the recipe schedules V0 = {recipe.v0} visual tokens entering the LLM (pre-LLM retention "
                         f"{recipe.pre_retention:g}), the vision graph would keep K = {k}: export with --keep "
                         f"{recipe.v0} (or omit --keep / --retention)")
    if dim % options.scoring.group_size:
        raise ValueError(f"group size {options.scoring.group_size} does not divide the projected dimension {dim}")
    pairs, calib_sha = [], None
    if options.needs_calibration:
        from export.calibration import dataset_sha256, load_pairs

        if options.calibration is None:
            raise ValueError("this precision needs calibration data: pass --calibration DIR")
        pairs = load_pairs(options.calibration)[: options.calibration_limit]
        calib_sha = dataset_sha256(options.calibration)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is for everyone on the board
    t0 = time.time()
    try:
        # vision.onnx: float export, then INT8 Q/DQ of the tower and projector when asked
        vpath = tmp / "vision.onnx"
        opsets = graph_opsets(options)
        vision_graph.export_vision(llava, options.scoring, k, vpath, opset=opsets["vision"])
        vision_nodes = []
        if options.vision.int8:
            feeds = vision_feeds(llava, pairs, options.scoring.semantic)
            fp = tmp / "vision.fp32.onnx"
            vpath.rename(fp)
            vision_nodes = qdq.quantize_int8(fp, vpath, feeds)
            fp.unlink()
        elif options.vision.fp16:
            fp16.vision_fp16(vpath)
        log(f"vision.onnx: K = {k} of N = {n}, {options.vision.name}")
        # llm.onnx (+ llm_prefill.onnx with a recipe)
        lpath = tmp / "llm.onnx"
        llm_paths = [lpath] if recipe is None else [tmp / "llm_prefill.onnx", lpath]
        llm_info: dict = {}

        def export_llm(model):
            if recipe is None:
                llm_graph.export_llm(model, lpath, opset=opsets["llm"])
            else:
                from export.quota import export_recipe_llm

                export_recipe_llm(model, recipe, tmp, opset=opsets["llm"])
        if options.llm.weight_bits == 4:
            scheme = ptq.Scheme(w_bits=4, w_group_size=options.llm.block_size, w_method=options.llm.w_method)
            calib = None
            if scheme.needs_calibration:
                calib = calibrator(pairs, **({"keep": k} if options.calibrate_pruned else {"retention": 1.0}),
                                   scoring=options.scoring, positions=options.positions)
            quantized = ptq.apply(llava, scheme, calib)
            codes = llm_graph.weight_codes(quantized)
            export_llm(quantized)
            import onnx

            for path in llm_paths:
                model, done = llm_graph.int4_weights(onnx.load(str(path)), codes)
                onnx.save(model, str(path))
            llm_info = {"int4_linears": len(done), "scheme": scheme.describe()}
        else:
            export_llm(llava)
            if options.llm.weight_bits == 8:
                # pruned: the K tokens the exported vision graph keeps; full: all N from the float reference
                feeds = llm_feeds(llava, pairs, k if options.calibrate_pruned else n, options.scoring,
                                  options.positions, vpath if options.calibrate_pruned else None)
                fp = tmp / "llm.fp32.onnx"
                lpath.rename(fp)
                head = llava.model.lm_head.weight.detach().float().numpy().T  # the LM head stays float
                llm_info = {"int8_nodes": len(qdq.quantize_int8(fp, lpath, feeds, exclude=[head]))}
                fp.unlink()
            elif options.llm.fp16:
                for path in llm_paths:
                    fp16.llm_fp16(path)
        if recipe is not None:
            recipe.save(tmp / "recipe.json")
            llm_info["recipe"] = _recipe_summary(recipe, tmp / "recipe.json")
        log(f"llm.onnx: {options.llm.name}")
        np.save(tmp / "embed_tokens.npy", llm_graph.embedding_table(llava), allow_pickle=False)
        llava.processor.save_pretrained(tmp)
        manifest = _manifest(llava, model_dir, options, k, calib_sha, len(pairs), vision_nodes, llm_info)
        key = {f: manifest[f] for f in ("format", "num_image_tokens", "keep", "alpha", "group_size", "bits",
                                        "semantic", "source_sha256")}
        set_metadata(vpath, {**key, "graph": "vision", "precision": options.vision.name, "opset": opsets["vision"]})
        for path in llm_paths:
            set_metadata(path, {**key, "graph": path.stem, "precision": options.llm.name, "opset": opsets["llm"],
                                "session_options": options.llm.session_options(),
                                **({"recipe": llm_info["recipe"]} if recipe is not None else {})})
        manifest["build_seconds"] = round(time.time() - t0, 1)
        manifest["files"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                             for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _recipe_summary(recipe, path: Path) -> dict:
    """What the manifest says of a baked QUOTA recipe (the whole recipe is the artifact's recipe.json)."""
    from export.quota import PREFILL_INPUTS

    return {"file": path.name, "sha256": sha256_file(path), "format": recipe.format, "v0": recipe.v0,
            "layers": list(recipe.layers), "keeps": list(recipe.keeps), "budget": recipe.budget,
            "achieved": recipe.achieved, "calibrated_scheme": recipe.scheme.get("name"), "kv_bits": recipe.kv_bits,
            "weights": recipe.weights, "prefill_graph": "llm_prefill.onnx", "prefill_inputs": PREFILL_INPUTS}


def _manifest(llava, model_dir, options: Options, k: int, calib_sha, n_pairs, vision_nodes, llm_info) -> dict:
    from export.llm import io_names, kv_shape

    cfg = llava.model.config
    tok = llava.processor.tokenizer
    eos = llava.model.generation_config.eos_token_id
    hkv, dh = kv_shape(llava)
    ip = llava.processor.image_processor
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": str(model_dir), "source_sha256": model_sha256(model_dir),
        "num_image_tokens": llava.num_image_tokens, "keep": k,
        "retention": options.retention, "semantic": options.scoring.semantic, "alpha": options.scoring.alpha,
        "group_size": options.scoring.group_size, "bits": options.scoring.bits, "sq_mode": options.scoring.sq_mode,
        "positions": options.positions,
        "vision": {"precision": options.vision.name, "int8_nodes": len(vision_nodes),
                   "inputs": ["pixel_values"] + (["text_embedding"] if options.scoring.semantic == "text" else []),
                   "outputs": ["tokens", "indices", "scores"]},
        "llm": {"precision": options.llm.name, "session_options": options.llm.session_options(),
                "block_size": options.llm.block_size if options.llm.weight_bits == 4 else None,
                "w_method": options.llm.w_method if options.llm.weight_bits == 4 else None,
                "num_layers": cfg.text_config.num_hidden_layers, "kv_heads": hkv, "head_dim": dh,
                "hidden_size": cfg.text_config.hidden_size, "vocab_size": cfg.text_config.vocab_size,
                "inputs": io_names(cfg.text_config.num_hidden_layers)[0],
                "outputs": io_names(cfg.text_config.num_hidden_layers)[1], **llm_info},
        "tokens": {"image_token_id": llava.image_token_id, "image_token": llava.processor.image_token,
                   "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                   "eos_token_ids": sorted(set(eos) if isinstance(eos, (list, tuple)) else {eos}),
                   "special_ids": sorted(set(tok.all_special_ids))},
        "image": {"size": cfg.vision_config.image_size, "mean": list(ip.image_mean), "std": list(ip.image_std)},
        "calibration": {"dir": options.calibration, "sha256": calib_sha, "pairs": n_pairs,
                        "tokens": ("pruned" if options.calibrate_pruned else "full") if n_pairs else None},
        "opset": graph_opsets(options),
        "exporter": "torch.onnx.export(dynamo=True)",
        "versions": versions(),
    }
