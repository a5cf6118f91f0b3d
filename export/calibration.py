"""Calibration (image, prompt) pairs for `python -m export`: static INT8 activation scales and GPTQ Hessians.

A calibration folder is read in exactly one of two forms:

1. `pairs.jsonl` (the shipped `calibration_data/` uses this): one JSON object per non-blank line,
   `{"image": "<path relative to the folder>", "prompt": "...", "source": "..."}`; "source" is optional and any
   other keys are ignored. Images may sit in subfolders but must stay inside the folder. When `pairs.jsonl`
   exists, nothing else in the folder is read.
2. Otherwise, the user's own folder: every image file directly in the folder (.png .jpg .jpeg .bmp .webp, any
   case, not in subfolders, names starting with "." skipped), taken in sorted name order. Its prompt is the
   whole text of the same-stem `.txt` file (`cat.jpg` -> `cat.txt`), else the whole text of `prompts.txt`
   (one prompt for every image without its own `.txt`). Prompt files are UTF-8, stripped of surrounding
   whitespace. A `.txt` file other than `prompts.txt` without a same-stem image is an error.

Every prompt must contain the placeholder "<image>" exactly once (nothing is inserted for you), e.g.
"USER: <image> how many digits are there ? ASSISTANT:". Images are returned as RGB.

`dataset_sha256` identifies a set of pairs independently of where the folder lives and of which form it is
written in; `build` writes the shipped folder; `verify` checks a folder against its `manifest.json`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from qapruner.model import file_sha256

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
PLACEHOLDER = "<image>"
PAIRS_FILE = "pairs.jsonl"
MANIFEST_FILE = "manifest.json"
PROMPTS_FILE = "prompts.txt"
FORMAT = "qapruner-calibration/1"
GRACE_HOPPER = "grace_hopper.jpg"     # in matplotlib's mpl-data/sample_data


class PairSpec(NamedTuple):
    """One calibration pair before its image is decoded."""
    image: str      # path relative to the folder, POSIX separators
    prompt: str
    source: str


# ---------------------------------------------------------------------------------------------- reading


def _check_prompt(prompt, where: str) -> str:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt for {where} is {type(prompt).__name__}, not a string; write it as a JSON string")
    if not prompt.strip():
        raise ValueError(f"empty prompt for {where}: write a prompt containing {PLACEHOLDER!r} once")
    n = prompt.count(PLACEHOLDER)
    if n != 1:
        raise ValueError(f"prompt for {where} contains {PLACEHOLDER!r} {n} times, needs exactly 1 "
                         f"(e.g. 'USER: {PLACEHOLDER} <question> ASSISTANT:'): {prompt!r}")
    return prompt


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


def _folder(directory) -> Path:
    d = Path(directory)
    if not d.exists():
        raise ValueError(f"calibration folder {d} does not exist; pass a folder of images and prompts "
                         f"(see `python -m export.calibration --help`)")
    if not d.is_dir():
        raise ValueError(f"{d} is not a folder; pass the folder that holds the images and prompts")
    return d


def _from_jsonl(d: Path) -> list[PairSpec]:
    root = d.resolve()
    specs = []
    lines = (d / PAIRS_FILE).read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{d / PAIRS_FILE} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON ({e.msg}); write one object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or "prompt" not in obj:
            raise ValueError(f'{where} needs an object with "image" (relative path) and "prompt" strings')
        rel = obj["image"]
        path = d / rel
        if Path(rel).is_absolute() or not path.resolve().is_relative_to(root):
            raise ValueError(f"{where}: image path {rel!r} leaves the folder; use a path relative to {d} "
                             f"that stays inside it")
        if not path.is_file():
            raise ValueError(f"{where}: image {path} not found; fix the path or add the file")
        _check_prompt(obj["prompt"], f"{rel} ({where})")
        specs.append(PairSpec(path.resolve().relative_to(root).as_posix(), obj["prompt"],
                              str(obj.get("source", ""))))
    return specs


def _from_files(d: Path) -> list[PairSpec]:
    files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    texts = {p.stem: p for p in files if p.suffix.lower() == ".txt" and p.name != PROMPTS_FILE}
    stems = Counter(p.stem for p in images)
    if dup := sorted(s for s, c in stems.items() if c > 1 and s in texts):
        raise ValueError(f"{texts[dup[0]]} matches several images with stem {dup[0]!r}; rename them so each "
                         f".txt has one image")
    if stray := sorted(set(texts) - set(stems)):
        raise ValueError(f"{texts[stray[0]]} has no image with the same stem (accepted: "
                         f"{' '.join(IMAGE_EXTENSIONS)}); add the image or remove the .txt")
    shared = d / PROMPTS_FILE
    default = _read_text(shared) if shared.is_file() else None
    specs = []
    for img in images:
        if img.stem in texts:
            prompt, where, source = _read_text(texts[img.stem]), f"{img.name} ({texts[img.stem]})", "image+txt"
        elif default is not None:
            prompt, where, source = default, f"{img.name} ({shared})", PROMPTS_FILE
        else:
            raise ValueError(f"image {img} has no prompt: add {img.stem}.txt or a {PROMPTS_FILE} for all images")
        specs.append(PairSpec(img.name, _check_prompt(prompt, where), source))
    return specs


def pair_specs(directory) -> list[PairSpec]:
    """The pairs of a calibration folder (either form, see the module docstring), validated, images not
    decoded."""
    d = _folder(directory)
    specs = _from_jsonl(d) if (d / PAIRS_FILE).is_file() else _from_files(d)
    if not specs:
        raise ValueError(f"no calibration pairs in {d}: add a {PAIRS_FILE}, or images "
                         f"({' '.join(IMAGE_EXTENSIONS)}) with same-stem .txt prompts or a {PROMPTS_FILE}")
    return specs


def _open_rgb(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... on bad files
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot read image {path} ({msg}); replace it with a valid image file") from None


def load_pairs(directory) -> list[tuple]:
    """The (PIL RGB image, prompt) pairs of a calibration folder, in file order: what
    `qapruner.pipeline.calibrator` and `python -m export` take."""
    d = Path(directory)
    return [(_open_rgb(d / s.image), s.prompt) for s in pair_specs(d)]


def dataset_sha256(directory) -> str:
    """sha256 over the pairs: for each (relative image path, sha256 of its bytes, prompt), sorted, one JSON
    line. Sources and the folder's location do not enter; the same pairs in either form hash the same."""
    d = Path(directory)
    rows = sorted((s.image, file_sha256(d / s.image), s.prompt) for s in pair_specs(d))
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def verify(directory) -> dict:
    """Check every file listed in `manifest.json` and the dataset sha256; returns the manifest or raises a
    one-line ValueError."""
    d = _folder(directory)
    fix = f"restore the folder or rebuild it with `python -m export.calibration build {d} --force`"
    try:
        manifest = json.loads((d / MANIFEST_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{d / MANIFEST_FILE} not found; only a built folder has one ({fix})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / MANIFEST_FILE} is not valid JSON ({e.msg}); {fix}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{d / MANIFEST_FILE} has format {manifest.get('format')!r}, expected {FORMAT!r}; {fix}")
    for rel, want in sorted(manifest.get("files", {}).items()):
        path = d / rel
        if not path.is_file():
            raise ValueError(f"{path} is listed in {MANIFEST_FILE} but missing; {fix}")
        if (got := file_sha256(path)) != want:
            raise ValueError(f"{path}: sha256 {got[:12]}… does not match {MANIFEST_FILE} ({want[:12]}…); {fix}")
    if (got := dataset_sha256(d)) != manifest.get("dataset_sha256"):
        raise ValueError(f"dataset sha256 of {d} is {got[:12]}…, {MANIFEST_FILE} says "
                         f"{str(manifest.get('dataset_sha256'))[:12]}…; {fix}")
    return manifest


# ---------------------------------------------------------------------------------------------- building


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": ".".join(map(str, sys.version_info[:3]))}
    for dist in ("numpy", "scikit-learn", "pillow", "matplotlib"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _grace_hopper() -> Path:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / GRACE_HOPPER
    if not path.is_file():
        raise ValueError(f"{path} not found: matplotlib's sample data is missing; reinstall matplotlib or "
                         f"pass include_matplotlib=False (--no-matplotlib)")
    return path


def _command(out_dir: Path, n_scenes: int, photo_scenes: int, seed: int, include_matplotlib: bool) -> str:
    cmd = f"python -m export.calibration build {out_dir.as_posix()} --force"
    if n_scenes != 64:
        cmd += f" --n-scenes {n_scenes}"
    if photo_scenes != 4:
        cmd += f" --photo-scenes {photo_scenes}"
    if seed != 0:
        cmd += f" --seed {seed}"
    if not include_matplotlib:
        cmd += " --no-matplotlib"
    return cmd


def _write(tmp: Path, out_dir: Path, n_scenes: int, photo_scenes: int, seed: int,
           include_matplotlib: bool) -> None:
    from PIL import Image

    from qapruner import data

    photo_names = ("china.jpg", "flower.jpg")   # sklearn.datasets.load_sample_images order
    (tmp / "images").mkdir()
    rows = []
    # DigitsVQA train scenes 0..n-1 on dimmed photo crops / noise, then scenes on whole bundled photos at the
    # following indices (distinct indices, so their digits differ from the plain scenes'); question type
    # cycles with the scene index (index mod 5), as in qapruner.data.questions.
    jobs = [(i, None) for i in range(n_scenes)]
    jobs += [(n_scenes + p * photo_scenes + k, p) for p in range(len(photo_names)) for k in range(photo_scenes)]
    for index, photo in jobs:
        scene = data.make_scene("train", index, seed, photo=photo)
        q = scene.questions[index % len(data.QUESTION_TYPES)]
        suffix = "" if photo is None else "-" + Path(photo_names[photo]).stem
        rel = f"images/train-{index:04d}{suffix}.png"
        Image.fromarray(scene.image).save(tmp / rel, format="PNG", compress_level=9)
        source = "digitsvqa-train" + ("" if photo is None else f"+sklearn-{photo_names[photo]}")
        rows.append({"image": rel, "prompt": data.PROMPT.format(question=q.text), "source": source,
                     "split": "train", "seed": seed, "index": index, "question_type": q.kind, "answer": q.answer})
    if include_matplotlib:
        rel = f"images/{GRACE_HOPPER}"
        shutil.copyfile(_grace_hopper(), tmp / rel)   # byte-for-byte copy of matplotlib's file
        rows.append({"image": rel, "prompt": data.PROMPT.format(question="how many digits are there ?"),
                     "source": f"matplotlib-{GRACE_HOPPER}", "question_type": "count"})
    with open(tmp / PAIRS_FILE, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    files = {r["image"]: file_sha256(tmp / r["image"]) for r in rows}
    files[PAIRS_FILE] = file_sha256(tmp / PAIRS_FILE)
    manifest = {
        "format": FORMAT,
        "generator": _command(out_dir, n_scenes, photo_scenes, seed, include_matplotlib),
        "build": {
            "split": "train", "seed": seed, "question_type": "scene index mod 5 (quadrant, count, largest, "
                                                              "exists, colour)",
            "digitsvqa_scene_indices": [0, n_scenes - 1] if n_scenes else [],
            "photo_scene_indices": {name: [n_scenes + p * photo_scenes, n_scenes + (p + 1) * photo_scenes - 1]
                                    for p, name in enumerate(photo_names) if photo_scenes},
            "matplotlib_sample": GRACE_HOPPER if include_matplotlib else None,
        },
        "counts": {"pairs": len(rows), "by_source": dict(sorted(Counter(r["source"] for r in rows).items()))},
        "dataset_sha256": dataset_sha256(tmp),
        "files": dict(sorted(files.items())),
        "versions": _versions(),
    }
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build(out_dir, n_scenes: int = 64, photo_scenes: int = 4, seed: int = 0, *, include_matplotlib: bool = True,
          force: bool = False) -> dict:
    """Write the shipped calibration folder: `n_scenes` DigitsVQA train scenes (indices 0..n_scenes-1),
    `photo_scenes` scenes on each of sklearn's two bundled photos (the next indices), and, with
    `include_matplotlib`, matplotlib's grace_hopper.jpg; one prompt per image. Built in a temporary folder
    beside `out_dir` and renamed into place; an existing `out_dir` is replaced only with `force` (its README.md
    is kept). Returns the manifest."""
    if n_scenes < 0 or photo_scenes < 0:
        raise ValueError(f"n_scenes and photo_scenes must be ≥ 0, got {n_scenes} and {photo_scenes}")
    out = Path(out_dir)
    if out.exists() and not force:
        raise ValueError(f"{out} already exists; pass --force (force=True) to rebuild it (its README.md is kept)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; remove it or choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        _write(tmp, out, n_scenes, photo_scenes, seed, include_matplotlib)
        if (out / "README.md").is_file():
            shutil.copyfile(out / "README.md", tmp / "README.md")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            old.rmdir()
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        if old is not None and old.exists() and not out.exists():
            old.rename(out)                      # put the previous folder back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- CLI


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.calibration", description=__doc__.splitlines()[0],
                                 epilog=__doc__.split("\n\n", 1)[1].split("\n\n`dataset_sha256`")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the shipped calibration folder (DigitsVQA + bundled photos)")
    b.add_argument("out_dir")
    b.add_argument("--force", action="store_true", help="replace an existing folder (its README.md is kept)")
    b.add_argument("--n-scenes", type=int, default=64)
    b.add_argument("--photo-scenes", type=int, default=4, help="scenes per bundled sklearn photo")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-matplotlib", action="store_true", help="leave out matplotlib's grace_hopper.jpg")
    for name, text in (("info", "print the number of pairs, their sources and the dataset sha256"),
                       ("verify", "check the files against manifest.json (exit 1 on a mismatch)")):
        sub.add_parser(name, help=text).add_argument("directory")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            m = build(args.out_dir, args.n_scenes, args.photo_scenes, args.seed,
                      include_matplotlib=not args.no_matplotlib, force=args.force)
            print(f"wrote {args.out_dir}: {m['counts']['pairs']} pairs, dataset sha256 {m['dataset_sha256']}")
        elif args.cmd == "info":
            specs = pair_specs(args.directory)
            print(f"{args.directory}: {len(specs)} pairs")
            for source, n in sorted(Counter(s.source or "(none)" for s in specs).items()):
                print(f"  {n:4d}  {source}")
            print(f"dataset sha256 {dataset_sha256(args.directory)}")
        else:
            m = verify(args.directory)
            print(f"{args.directory}: OK, {len(m['files'])} files match {MANIFEST_FILE}, "
                  f"dataset sha256 {m['dataset_sha256']}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
