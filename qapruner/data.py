"""DigitsVQA: visual questions about scenes of real handwritten digits (scikit-learn's `load_digits`).

A 224×224 scene is a 16×16 grid of 14-px cells (the vision tower's patch grid). 3-8 digits with distinct
values, each an 8×8 sklearn digit upscaled to 12×12 and tinted with a named colour, sit centred in their own
cells; 1-3 grey distractor shapes sit in others; the rest (most of the image, as in real VQA) is a dimmed
random crop of a real photo bundled with scikit-learn, or plain noise. One digit per patch cell makes a digit
recognisable from one patch (see shared/notes/training-the-embedded-model.md: 28-56 px digits were never
learned from scratch).

Splits are by digit sample: the 1,797 sklearn digits are permuted once with a fixed seed and cut 70/15/15,
so no test digit image is ever seen in training. Everything is a pure function of (split, seed, index).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

IMAGE_SIZE = 224
CELL = 14
GRID = IMAGE_SIZE // CELL          # 16 cells per side = the 16×16 patch grid
DIGIT_PX = 12
COLOURS = {"red": (255, 60, 60), "green": (60, 230, 60), "blue": (80, 120, 255), "yellow": (250, 230, 40),
           "white": (245, 245, 245), "purple": (200, 80, 255)}
COLOUR_NAMES = tuple(COLOURS)
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
QUESTION_TYPES = ("quadrant", "count", "largest", "exists", "colour")
SPLITS = {"train": 0, "val": 1, "test": 2}
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
BACKGROUND = 10                    # patch label of a cell without a digit
DIGIT_WORDS = tuple(str(d) for d in range(10))
PROMPT = "USER: <image> {question} ASSISTANT:"


@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str
    cells: tuple = ()              # patch indices (row·16 + col) of the digits the answer rests on


@dataclass(frozen=True)
class Scene:
    image: np.ndarray              # [224, 224, 3] uint8
    digits: tuple                  # ((value, colour name, row, col, sklearn index), ...)
    patch_digit: np.ndarray        # [16, 16] int64: digit value, or 10 for background / distractor
    patch_colour: np.ndarray       # [16, 16] int64: colour index, or len(COLOURS) where no digit
    questions: tuple = field(default=())

    def prompts(self) -> list[str]:
        return [PROMPT.format(question=q.text) for q in self.questions]


@lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(20260101).permutation(len(d.target))
    n_train = int(SPLIT_FRACTIONS[0] * len(order))
    n_val = int(SPLIT_FRACTIONS[1] * len(order))
    pools = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64), pools


@lru_cache(maxsize=1)
def _photos():
    from sklearn.datasets import load_sample_images

    return [np.asarray(im, dtype=np.float32) for im in load_sample_images().images]


def split_pool(split: str) -> np.ndarray:
    """sklearn digit indices that belong to `split`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return _digits()[2][split]


@lru_cache(maxsize=None)
def _by_value(split: str) -> dict[int, np.ndarray]:
    _, targets, _ = _digits()
    pool = split_pool(split)
    return {v: pool[targets[pool] == v] for v in range(10)}


@lru_cache(maxsize=None)
def _upscaled(sample: int) -> np.ndarray:
    return _upscale(_digits()[0][sample])


def _background(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.2:
        return rng.normal(40, 15, (IMAGE_SIZE, IMAGE_SIZE, 3)).clip(0, 255)
    photo = _photos()[rng.integers(len(_photos()))]
    scale = rng.uniform(1.0, 1.9)   # crop a window of 224·scale px and shrink it to 224
    size = int(IMAGE_SIZE * scale)
    y = rng.integers(0, photo.shape[0] - size + 1)
    x = rng.integers(0, photo.shape[1] - size + 1)
    idx = (np.arange(IMAGE_SIZE) * scale).astype(int)
    crop = photo[y:y + size, x:x + size][idx][:, idx]
    return crop * rng.uniform(0.2, 0.4)


def _whole_photo(which: int) -> np.ndarray:
    photos = _photos()
    if which not in range(len(photos)):
        raise ValueError(f"photo must be one of {list(range(len(photos)))}, got {which!r}")
    p = photos[which]
    side = min(p.shape[:2])
    y, x = (p.shape[0] - side) // 2, (p.shape[1] - side) // 2
    idx = (np.arange(IMAGE_SIZE) * side / IMAGE_SIZE).astype(int)
    return p[y:y + side, x:x + side][idx][:, idx].copy()


def _upscale(d8: np.ndarray) -> np.ndarray:
    # 8×8 -> 12×12, bilinear on the pixel centres
    src = (np.arange(DIGIT_PX) + 0.5) * 8 / DIGIT_PX - 0.5
    i0 = np.clip(np.floor(src).astype(int), 0, 7)
    i1 = np.clip(i0 + 1, 0, 7)
    w = np.clip(src - i0, 0, 1)
    rows = d8[i0] * (1 - w)[:, None] + d8[i1] * w[:, None]
    return rows[:, i0] * (1 - w)[None, :] + rows[:, i1] * w[None, :]


def _distractor(rng: np.random.Generator) -> np.ndarray:
    m = np.zeros((DIGIT_PX, DIGIT_PX), np.float32)
    kind = rng.integers(3)
    if kind == 0:
        m[2:10, 2:10] = 1
        m[4:8, 4:8] = 0                            # hollow square
    elif kind == 1:
        yy, xx = np.mgrid[:DIGIT_PX, :DIGIT_PX]
        m[(yy - 5.5) ** 2 + (xx - 5.5) ** 2 <= 20] = 1  # disc
    else:
        m[np.arange(DIGIT_PX), np.arange(DIGIT_PX)] = 1
        m[np.arange(DIGIT_PX), DIGIT_PX - 1 - np.arange(DIGIT_PX)] = 1  # cross
    return m


def _quadrant(row: int, col: int) -> str:
    return QUADRANTS[(row >= GRID // 2) * 2 + (col >= GRID // 2)]


def make_scene(split: str, index: int, seed: int = 0, photo: int | None = None) -> Scene:
    """Scene `index` of `split` for `seed`, with one question of each type (answers balanced by design).
    `photo` (0 or 1): paste the digits on that whole bundled photo at full brightness instead (the demo's
    "real photo" case, harder than the dimmed training backgrounds)."""
    by_value = _by_value(split)
    rng = np.random.default_rng([seed, SPLITS[split], index])
    n = int(rng.integers(3, 9))                    # 3..8 digits: count answers uniform
    largest = int(rng.integers(n - 1, 10))         # distinct values up to and including `largest`
    values = [largest, *rng.choice(largest, n - 1, replace=False).tolist()]
    while True:                                    # a placement with at least one single-digit quadrant
        cells = rng.choice(GRID * GRID, n + int(rng.integers(1, 4)), replace=False)
        quads = [_quadrant(c // GRID, c % GRID) for c in cells[:n]]
        if any(quads.count(q) == 1 for q in QUADRANTS):
            break
    img = _background(rng) if photo is None else _whole_photo(photo)
    patch_digit = np.full((GRID, GRID), BACKGROUND, np.int64)
    patch_colour = np.full((GRID, GRID), len(COLOURS), np.int64)
    digits = []
    off = (CELL - DIGIT_PX) // 2
    for k, cell in enumerate(cells):
        r, c = divmod(int(cell), GRID)
        y, x = r * CELL + off, c * CELL + off
        if k < n:
            v = values[k]
            sample = int(rng.choice(by_value[v]))
            colour = COLOUR_NAMES[rng.integers(len(COLOURS))]
            mask = _upscaled(sample)
            rgb = np.array(COLOURS[colour], np.float32) * rng.uniform(0.85, 1.0)
            patch_digit[r, c], patch_colour[r, c] = v, COLOUR_NAMES.index(colour)
            digits.append((v, colour, r, c, sample))
        else:
            mask = _distractor(rng)
            rgb = np.full(3, rng.uniform(110, 200), np.float32)
        region = img[y:y + DIGIT_PX, x:x + DIGIT_PX]
        img[y:y + DIGIT_PX, x:x + DIGIT_PX] = region * (1 - mask[..., None]) + rgb * mask[..., None]
    image = img.clip(0, 255).astype(np.uint8)

    singles = [q for q in QUADRANTS if [_quadrant(d[2], d[3]) for d in digits].count(q) == 1]
    quad = singles[rng.integers(len(singles))]
    quad_digit = next(d[0] for d in digits if _quadrant(d[2], d[3]) == quad)
    present = rng.random() < 0.5
    probe = int(rng.choice(values)) if present else int(rng.choice(sorted(set(range(10)) - set(values))))
    target = digits[rng.integers(n)]
    cell = {d[0]: d[2] * GRID + d[3] for d in digits}
    every = tuple(sorted(cell.values()))
    questions = (
        Question("quadrant", f"what digit is in the {quad} ?", str(quad_digit), (cell[quad_digit],)),
        Question("count", "how many digits are there ?", str(n), every),
        Question("largest", "what is the largest digit ?", str(largest), (cell[largest],)),
        Question("exists", f"is there a {probe} ?", "yes" if present else "no",
                 (cell[probe],) if present else every),
        Question("colour", f"what color is the {target[0]} ?", target[1], (cell[target[0]],)),
    )
    return Scene(image, tuple(digits), patch_digit, patch_colour, questions)


def vocabulary() -> list[str]:
    """Every word a DigitsVQA prompt or answer can contain (the embedded model's word-level vocabulary)."""
    words = PROMPT.replace("<image>", "").replace("{question}", "").split()
    words += "what digit is in the how many digits are there ? largest a color".split()
    words += [w for q in QUADRANTS for w in q.split()] + list(DIGIT_WORDS) + ["yes", "no"] + list(COLOUR_NAMES)
    return list(dict.fromkeys(words))


def questions(split: str, n: int, seed: int = 0) -> list[tuple[Scene, Question]]:
    """`n` (scene, question) pairs cycling through the question types: scene i asks type i mod 5."""
    return [(s, s.questions[i % len(QUESTION_TYPES)]) for i in range(n)
            for s in [make_scene(split, i, seed)]]


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qapruner.data", description="Write DigitsVQA scenes as PNGs.")
    ap.add_argument("--split", default="test", choices=list(SPLITS))
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="build/digitsvqa")
    args = ap.parse_args(argv)
    from pathlib import Path

    from PIL import Image

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.n):
        s = make_scene(args.split, i, args.seed)
        Image.fromarray(s.image).save(out / f"{args.split}-{i}.png")
        for q in s.questions:
            print(f"{args.split}-{i}.png\t{q.kind}\t{q.text}\t{q.answer}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
