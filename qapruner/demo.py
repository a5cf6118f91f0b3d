"""`make demo`: the embedded DigitsVQA LLaVA answers questions about test scenes and a real photo with digits
pasted on it, at a few retentions, in float and under simulated W4A4; kept tokens are drawn over each image.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qapruner import data, ptq
from qapruner.evaluate import calibration_pairs
from qapruner.model import load
from qapruner.pipeline import answer, calibrator
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


def run(model_dir: Path, retentions, out_dir: Path) -> None:
    from PIL import Image

    llava = load(model_dir)
    n = llava.num_image_tokens
    grid = int(round(n ** 0.5))
    scenes = [("test-0", data.make_scene("test", 0)), ("test-1", data.make_scene("test", 1)),
              ("test-2", data.make_scene("test", 2)), ("photo", data.make_scene("test", 3, photo=0))]
    scoring = Scoring(semantic="cls", alpha=0.7)
    w4a4 = ptq.apply(llava, ptq.replace(ptq.PRESETS["w4a4"], w_method="gptq"),
                     calibrator(calibration_pairs(0), retention=min(retentions), scoring=scoring))
    models = {"fp": llava, "w4a4 (simulated, GPTQ)": w4a4}
    print(f"model {model_dir}: {n} visual tokens per image; QAPruner score with CLS attention, alpha 0.7\n")
    hits: dict = {}
    for name, scene in scenes:
        image = Image.fromarray(scene.image)
        prompts = scene.prompts()
        print(f"== {name}: digits {sorted((d[0], d[1]) for d in scene.digits)}")
        header = "".join(f" | {label[:4]}@{r:<6g}" for label in models for r in retentions)
        print(f"{'question':34} | truth {header}")
        answers = {}
        for label, model in models.items():
            for r in retentions:
                t = time.perf_counter()
                res = answer(model, [image] * len(prompts), prompts, retention=r, scoring=scoring, max_new_tokens=2)
                answers[(label, r)] = [(x.split() or [""])[0] for x in res.texts]
                hits.setdefault((label, r), []).extend(a == q.answer for a, q in zip(answers[(label, r)],
                                                                                      scene.questions))
                if label == "fp" and r == min(retentions):
                    kept_overlay(scene.image, res.indices[0], grid, out_dir / f"{name}-kept-{r:g}.png")
                answers[(label, r, "ms")] = (time.perf_counter() - t) * 1e3
        for i, q in enumerate(scene.questions):
            row = "".join(f" | {answers[(label, r)][i]:>10}" for label in models for r in retentions)
            print(f"{q.text:34} | {q.answer:>5} {row}")
        print()
    print("accuracy over these questions, kept tokens per image:")
    for (label, r), h in hits.items():
        k = answer(llava, [Image.fromarray(scenes[0][1].image)], [scenes[0][1].prompts()[0]], retention=r,
                   scoring=scoring, max_new_tokens=1).indices.shape[1]
        print(f"  {label:24} retention {r:<6g} ({k:>3}/{n} tokens): {sum(h)}/{len(h)}")
    print(f"\nkept-token pictures (fp, retention {min(retentions):g}) in {out_dir}/")


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qapruner.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--retention", type=float, nargs="+", default=[1.0, 0.25, 0.125])
    ap.add_argument("--out", type=Path, default=Path("build/demo"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    try:
        run(args.model, args.retention, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
