"""`make demo`: the deployment path on the embedded DigitsVQA LLaVA. Export it at 12.5% and 100% retention,
build engines, and answer questions about three test scenes and a real photo with digits pasted on it through
`runtime/infer.py` (numpy + onnxruntime, never torch); print answers with per-stage timings and draw the kept
tokens over each image.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qapruner import data
from qapruner.scoring import Scoring

DEFAULT_MODEL = Path("models/digits-llava")


def kept_overlay(image: np.ndarray, indices, grid: int, path: Path) -> None:
    """Save `image` with unkept patches darkened and kept ones outlined."""
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    cell_h, cell_w = h / grid, w / grid
    kept = set(int(i) for i in indices)
    out = image.astype(np.float32) * 0.3
    for i in kept:
        r, c = divmod(i, grid)
        ys, xs = slice(int(r * cell_h), int((r + 1) * cell_h)), slice(int(c * cell_w), int((c + 1) * cell_w))
        out[ys, xs] = image[ys, xs]
    pic = Image.fromarray(out.astype(np.uint8)).resize((w * 2, h * 2), Image.NEAREST)
    draw = ImageDraw.Draw(pic)
    for i in kept:
        r, c = divmod(i, grid)
        draw.rectangle([c * cell_w * 2, r * cell_h * 2, (c + 1) * cell_w * 2 - 1, (r + 1) * cell_h * 2 - 1],
                       outline=(255, 220, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    pic.save(path)


def _artifact(model_dir: Path, retention: float, out: Path) -> tuple[str, bool]:
    """Export (unless an export of the same model and K is already there) and build engines."""
    import json

    from engines.build import build as build_engines
    from export.artifact import Options, build, model_sha256

    manifest = out / "manifest.json"
    fresh = manifest.is_file() and (lambda m: m.get("source_sha256") == model_sha256(model_dir)
                                    and m.get("retention") == retention)(json.loads(manifest.read_text()))
    if not fresh:
        build(model_dir, out, Options(retention=retention, scoring=Scoring(semantic="cls", alpha=0.7)),
              force=True, log=lambda m: None)
    if not fresh or not (out / "engines.json").is_file():
        return build_engines(out, log=lambda m: None)["reason"], False
    return json.loads((out / "engines.json").read_text())["reason"], True


def _infer(art: Path, images: list[Path], prompts: list[str]) -> dict:
    """runtime/infer.py in its own process (the runtime never imports torch): one batch, JSON back."""
    import json
    import subprocess

    cmd = [sys.executable, "runtime/infer.py", "--engines", str(art), "--json", "--max-new-tokens", "2"]
    for image, prompt in zip(images, prompts):
        cmd += ["--image", str(image), "--prompt", prompt]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"runtime/infer.py failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout)


def run(model_dir: Path, retentions, out_dir: Path, engines_dir: Path) -> None:
    """The deployment path: export at each retention, build engines, answer with runtime/infer.py."""
    from PIL import Image

    scenes = [("test-0", data.make_scene("test", 0)), ("test-1", data.make_scene("test", 1)),
              ("test-2", data.make_scene("test", 2)), ("photo", data.make_scene("test", 3, photo=0))]
    out_dir.mkdir(parents=True, exist_ok=True)
    arts = {}
    for r in retentions:
        t = time.perf_counter()
        arts[r] = engines_dir / f"demo-digits-r{r:g}"
        reason, reused = _artifact(model_dir, r, arts[r])
        what = "up to date (same model and K), reused" if reused else \
            f"exported and built in {time.perf_counter() - t:.1f} s"
        print(f"{arts[r]}: {what} — {reason}")
    print(f"\nmodel {model_dir}; QAPruner score with CLS attention, alpha 0.7; answers from runtime/infer.py "
          "(numpy + onnxruntime, no torch)\n")
    hits: dict = {r: [] for r in retentions}
    timing: dict = {r: [] for r in retentions}
    for name, scene in scenes:
        path = out_dir / f"{name}.png"
        Image.fromarray(scene.image).save(path)
        prompts = scene.prompts()
        results = {r: _infer(arts[r], [path] * len(prompts), prompts) for r in retentions}
        print(f"== {name}: digits {sorted((d[0], d[1]) for d in scene.digits)}")
        print(f"{'question':35} | truth  " + "".join(f"| K={results[r]['keep']:<4} " for r in retentions))
        for i, q in enumerate(scene.questions):
            row = ""
            for r in retentions:
                a = (results[r]["answers"][i].split() or [""])[0]
                hits[r].append(a == q.answer)
                row += f"| {a:>6} "
            print(f"{q.text:35} | {q.answer:>6} {row}")
        for r in retentions:
            t = results[r]["timings"]
            timing[r].append(t)
            n = results[r]["num_image_tokens"]
            print(f"   K={results[r]['keep']:<4} batch of {len(prompts)}: preprocess {1e3 * t['preprocess_s']:.1f} ms, "
                  f"vision+prune {1e3 * t['vision_prune_s']:.1f} ms, prefill {1e3 * t['prefill_s']:.1f} ms "
                  f"({results[r]['prefill_tokens']} tokens), peak RSS {results[r]['peak_rss_mb']:.0f} MB")
        low = min(retentions)
        kept_overlay(scene.image, results[low]["kept_indices"][0], int(round(n ** 0.5)),
                     out_dir / f"{name}-kept-{low:g}.png")
        print()
    print("accuracy over these questions:")
    for r in retentions:
        prefill = np.median([t["prefill_s"] for t in timing[r]]) * 1e3
        print(f"  retention {r:<6g}: {sum(hits[r])}/{len(hits[r])} correct, median prefill {prefill:.1f} ms")
    print(f"\nscenes and kept-token pictures (retention {min(retentions):g}) in {out_dir}/")


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qapruner.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--retention", type=float, nargs="+", default=[1.0, 0.125])
    ap.add_argument("--out", type=Path, default=Path("build/demo"))
    ap.add_argument("--engines", type=Path, default=Path("engines"), help="where the demo artifacts go")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    try:
        run(args.model, args.retention, args.out, args.engines)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
