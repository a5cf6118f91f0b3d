"""Answer prompts about images with an exported artifact: numpy preprocessing -> vision engine (score, prune)
-> kept tokens spliced into the embedded prompt -> LLM prefill -> greedy decoding with a KV cache.

    python runtime/infer.py --engines engines/NAME --image IMG [--image IMG ...] --prompt TEXT [--prompt ...]
                            [--max-new-tokens N] [--backend auto|ort|trt] [--threads N] [--json]

numpy + onnxruntime (or tensorrt) + tokenizers + pillow only: never torch, transformers or qapruner. Several
images run as one batch; one prompt applies to every image, or give one per image. A prompt without the image
placeholder is wrapped in LLaVA's template ("USER: <image> {prompt} ASSISTANT:").
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from runtime import preprocess  # noqa: E402
from runtime.artifact import Artifact, open_artifact  # noqa: E402
from runtime.generate import greedy, splice, text_embedding, visual_mask  # noqa: E402

TEMPLATE = "USER: {image} {prompt} ASSISTANT:"


def with_template(prompt: str, image_token: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: give a question about the image")
    return prompt if image_token in prompt else TEMPLATE.format(image=image_token, prompt=prompt.strip())


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: VmHWM (ru_maxrss survives exec on Linux, so a process
    started by a big parent would report the parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(art: Artifact, images: list, prompts: list[str], max_new_tokens: int = 16, on_text=None) -> dict:
    """One batch through the pipeline. images: PIL images; prompts: one per image. Returns answers, token
    ids, kept indices and per-stage timings (seconds). `on_text(i, text_so_far)` streams row i's answer."""
    m = art.manifest
    toks = m["tokens"]
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts: give one prompt, or one per image")
    tokenizer = preprocess.load_tokenizer(art.root)
    prompts = [with_template(p, toks["image_token"]) for p in prompts]
    t0 = time.perf_counter()
    pixels = preprocess.pixel_values(images, art.processor_config)
    input_ids, mask = preprocess.encode_prompts(tokenizer, prompts, m)
    t1 = time.perf_counter()
    feed = {"pixel_values": pixels}
    if m["semantic"] == "text":
        feed["text_embedding"] = text_embedding(input_ids, mask, art.table, [*toks["special_ids"], toks["image_token_id"]])
    v = art.vision.infer(feed)
    t2 = time.perf_counter()
    embeds, attn, pos = splice(input_ids, mask, v["tokens"], v["indices"], art.table, toks["image_token_id"],
                               m["positions"])
    special = toks["special_ids"]
    if art.llm_prefill is not None:  # a QUOTA artifact drops visual tokens inside the LLM: tell it where they are
        where = {"visual_mask": visual_mask(input_ids, v["indices"], toks["image_token_id"])}

        def prefill(feeds):
            return art.llm_prefill.infer({**feeds, **where})
    else:
        prefill = None
    steps: list[float] = []
    generated: list[np.ndarray] = []

    def on_step(nxt):
        steps.append(time.perf_counter())
        generated.append(nxt)
        if on_text is not None:
            ids = np.stack(generated, 1)
            for i in range(ids.shape[0]):
                on_text(i, preprocess.decode(tokenizer, ids[i].tolist(), special))
    cfg = m["llm"]
    ids = greedy(art.llm.infer, embeds, attn, pos, art.table, num_layers=cfg["num_layers"], kv_heads=cfg["kv_heads"],
                 head_dim=cfg["head_dim"], eos_ids=toks["eos_token_ids"], pad_id=toks["pad_token_id"],
                 max_new_tokens=max_new_tokens, on_step=on_step, prefill=prefill)
    t3 = time.perf_counter()
    decode_s = steps[-1] - steps[0] if len(steps) > 1 else 0.0
    return {
        "answers": [preprocess.decode(tokenizer, row.tolist(), special) for row in ids],
        "token_ids": ids.tolist(), "kept_indices": v["indices"].tolist(),
        "timings": {"preprocess_s": t1 - t0, "vision_prune_s": t2 - t1, "prefill_s": steps[0] - t2,
                    "decode_s": decode_s, "decode_tokens_per_s": (len(steps) - 1) * len(images) / decode_s
                    if decode_s > 0 else None, "total_s": t3 - t0},
        "prefill_tokens": int(embeds.shape[1]), "new_tokens": len(steps),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python runtime/infer.py", description=__doc__.splitlines()[0])
    p.add_argument("--engines", required=True, help="artifact folder written by python -m export (engines/NAME)")
    p.add_argument("--image", action="append", required=True, help="image file (repeat for a batch)")
    p.add_argument("--prompt", action="append", required=True, help="question (one for all images, or one each)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "trt"])
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}")
        prompts = args.prompt * len(args.image) if len(args.prompt) == 1 else args.prompt
        images = [preprocess.load_image(p) for p in args.image]
        t0 = time.perf_counter()
        art = open_artifact(args.engines, args.backend, args.threads)
        load_s = time.perf_counter() - t0
        printed = [""] * len(images)

        def stream(i, text):  # a single image streams its answer as it grows
            if len(images) == 1 and not args.json and text.startswith(printed[i]):
                sys.stdout.write(text[len(printed[i]):])
                sys.stdout.flush()
                printed[i] = text
        result = run(art, images, prompts, args.max_new_tokens, stream)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["timings"]["load_s"] = load_s
    if args.json:
        result.update({"backend": art.backend, "backend_reason": art.reason, "keep": art.manifest["keep"],
                       "num_image_tokens": art.manifest["num_image_tokens"], "peak_rss_mb": peak_rss_mb(),
                       "images": args.image, "prompts": prompts})
        print(json.dumps(result))
    elif len(images) == 1:
        answer = result["answers"][0]
        sys.stdout.write((answer[len(printed[0]):] if answer.startswith(printed[0]) else "\n" + answer) + "\n")
    else:
        for path, answer in zip(args.image, result["answers"]):
            print(f"{path}: {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
