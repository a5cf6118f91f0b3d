"""`make demo`: the torch reference path end to end on one model — score, prune, (fake-)quantize, answer.

Without --model it builds a tiny *random* LLaVA (no download), so its answers are noise: the demo then shows
the mechanics (kept-token counts, which tokens each score keeps, how far W4A4 moves the logits), not accuracy.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from qapruner import ptq
from qapruner.model import load, save, tiny
from qapruner.pipeline import answer, logits
from qapruner.quant import sqnr_db
from qapruner.scoring import Scoring

DEFAULT_MODEL = Path("build/tiny-llava")


def scene(seed: int = 0, size: int = 224):
    """A synthetic picture: a dim noisy background with a few coloured digits drawn on it."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((size, size, 3)) * 60).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y = rng.integers(10, size - 30, 2)
        colour = tuple(int(c) for c in rng.integers(120, 256, 3))
        draw.text((int(x), int(y)), str(int(rng.integers(0, 10))), fill=colour, font_size=24)
    return img


def run(model_dir: Path, retentions, max_new_tokens: int) -> None:
    if model_dir.exists():
        llava = load(model_dir)
    else:
        print(f"{model_dir} does not exist: building a tiny random LLaVA there (answers will be noise)")
        llava = load(save(tiny(seed=0), model_dir))
    n = llava.num_image_tokens
    images = [scene(0), scene(1)]
    prompts = ["USER: <image> what is the largest digit ? ASSISTANT:",
               "USER: <image> how many digits are there ? ASSISTANT:"]
    group = min(128, llava.model.config.text_config.hidden_size)
    print(f"model {llava.source}: {n} visual tokens per image\n")
    schemes = {"fp": None, "w4a4 (simulated)": ptq.PRESETS["w4a4"],
               "w4a4+rotation (simulated)": replace(ptq.PRESETS["w4a4"], rotate=True)}
    for label, scheme in schemes.items():
        q = llava if scheme is None else ptq.apply(llava, scheme)
        for r in retentions:
            for name, scoring in (("semantic", Scoring(alpha=1.0, group_size=group)),
                                  ("qapruner", Scoring(alpha=0.7, group_size=group))):
                t = time.perf_counter()
                res = answer(q, images, prompts, retention=r, scoring=scoring, max_new_tokens=max_new_tokens)
                ms = (time.perf_counter() - t) * 1e3
                print(f"{label:>26} | retention {r:<6} | {name:8} | kept {res.indices.shape[1]:>3}/{n} | "
                      f"{ms:7.1f} ms | answers {res.texts}")
        if scheme is not None:
            db = sqnr_db(logits(llava, images, prompts, retention=1.0), logits(q, images, prompts, retention=1.0))
            print(f"{label:>26} | logits SQNR vs float, all tokens: {db:.1f} dB")
        print()
    sem = answer(llava, images, prompts, retention=min(retentions), scoring=Scoring(alpha=1.0, group_size=group),
                 max_new_tokens=1).indices
    hyb = answer(llava, images, prompts, retention=min(retentions), scoring=Scoring(alpha=0.7, group_size=group),
                 max_new_tokens=1).indices
    for i in range(len(images)):
        overlap = len(set(sem[i].tolist()) & set(hyb[i].tolist()))
        print(f"image {i}: at retention {min(retentions)} QAPruner keeps {overlap}/{sem.shape[1]} of the tokens "
              "semantic-only pruning keeps; the others are its quantization-sensitive picks")


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qapruner.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--retention", type=float, nargs="+", default=[1.0, 0.25, 0.125])
    ap.add_argument("--max-new-tokens", type=int, default=4)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    try:
        run(args.model, args.retention, args.max_new_tokens)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
