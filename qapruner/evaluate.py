"""`python -m qapruner.evaluate`: DigitsVQA accuracy of pruning × (simulated) quantization methods.

A method is "<scheme>-<variant>": scheme ∈ ptq.PRESETS (fp, w4a4, w4a8, w8a8, w4a16, w8a16), variant ∈
  dense     all visual tokens (evaluated once, recorded at retention 1.0)
  semantic  semantic pruning only (α = 1): the naive integration
  qapruner  the hybrid score (α from --alpha)
  error     hybrid with the quantization-error term alone; range: the range term alone
  quota     QUOTA (qapruner.quota): a layer-wise schedule calibrated under the scheme, the retention being the
            average fraction of visual tokens per decoder layer; QAPruner cuts before the LLM only as far as
            the decoder's depth requires (quota.pre_retention_for); KV cache in float
"fp" is fp-dense. W4A4 is simulated (no engine runs INT4 activations); the table says so.

Cells (method, retention, semantic, act, calib_seed) are cached in --out as they finish, so an interrupted
run resumes; results are written to a temporary file and renamed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path


from qapruner import data, ptq
from qapruner.model import Llava, load
from qapruner.pipeline import answer, calibrator
from qapruner.pruning import resolve_k
from qapruner.scoring import Scoring

VARIANTS = ("dense", "semantic", "qapruner", "error", "range", "quota")
DEFAULT_METHODS = ("fp", "fp-semantic", "w4a4-dense", "w4a4-semantic", "w4a4-qapruner", "w4a4-error",
                   "w4a4-range")
DEFAULT_RETENTIONS = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125)
CALIB_PAIRS = 16


def parse_method(name: str) -> tuple[str, str]:
    """'w4a4-qapruner' -> ('w4a4', 'qapruner'); 'fp' -> ('fp', 'dense')."""
    scheme, _, variant = name.partition("-")
    variant = variant or "dense"
    if scheme not in ptq.PRESETS or variant not in VARIANTS:
        raise ValueError(f"unknown method {name!r}: use <scheme>-<variant> with scheme in "
                         f"{', '.join(ptq.PRESETS)} and variant in {', '.join(VARIANTS)} (e.g. w4a4-qapruner)")
    return scheme, variant


def scoring_for(variant: str, semantic: str, alpha: float, group_size: int) -> Scoring:
    return {"dense": Scoring(semantic, alpha, group_size),
            "semantic": Scoring(semantic, 1.0, group_size),
            "qapruner": Scoring(semantic, alpha, group_size),
            "error": Scoring(semantic, alpha, group_size, sq_mode="error"),
            "range": Scoring(semantic, alpha, group_size, sq_mode="range"),
            "quota": Scoring(semantic, alpha, group_size)}[variant]


def scheme_for(name: str, act: str, weights: str, rotate: bool) -> ptq.Scheme:
    base = ptq.PRESETS[name]
    if name == "fp":
        return base
    return replace(base, a_mode=act if base.a_bits is not None else "dynamic", w_method=weights, rotate=rotate)


def calibration_pairs(seed: int, n: int = CALIB_PAIRS) -> list[tuple]:
    """n (image, prompt) pairs from the train split, disjoint across seeds."""
    from PIL import Image

    pairs = []
    for i in range(n):
        s = data.make_scene("train", 10_000_000 + 1000 * seed + i, seed)
        q = s.questions[i % len(s.questions)]
        pairs.append((Image.fromarray(s.image), data.PROMPT.format(question=q.text)))
    return pairs


def accuracy(llava: Llava, items, *, retention: float, scoring: Scoring, batch: int = 25) -> float:
    """Exact match of the first answer word over (scene, question) items."""
    from PIL import Image

    hits = 0
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        res = answer(llava, [Image.fromarray(s.image) for s, _ in chunk],
                     [data.PROMPT.format(question=q.text) for _, q in chunk],
                     retention=retention, scoring=scoring, max_new_tokens=2)
        hits += sum((t.split() or [""])[0] == q.answer for t, (_, q) in zip(res.texts, chunk))
    return hits / len(items)


def cells(methods, retentions, semantic, act, seeds, alpha=0.7):
    """Every cell a grid needs. Float methods have no act / calibration seed; weight-only schemes have no act."""
    out = []
    for m in methods:
        scheme, variant = parse_method(m)
        rets = [1.0] if variant == "dense" else [r for r in retentions]
        quantized = scheme != "fp"
        for r in rets:
            for s in (seeds if quantized else [None]):
                a = act if quantized and ptq.PRESETS[scheme].a_bits is not None else None
                out.append({"method": m, "retention": r, "semantic": semantic, "act": a, "calib_seed": s,
                            "alpha": alpha})
    return out


def _key(c: dict) -> tuple:
    return (c["method"], float(c["retention"]), c["semantic"], c["act"], c["calib_seed"], float(c["alpha"]))


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run(llava: Llava, grid: list[dict], *, split: str, questions: int, seed: int, weights: str, rotate: bool,
        out: Path, progress: bool = True) -> list[dict]:
    """Evaluate the cells of `grid` not already in `out`; returns all records."""
    from tqdm import tqdm

    records = json.loads(out.read_text()) if out.exists() else []
    done = {_key(r) for r in records}
    todo = [c for c in grid if _key(c) not in done]
    items = data.questions(split, questions, seed)
    n = llava.num_image_tokens
    group = min(128, llava.model.config.text_config.hidden_size)
    quantized: dict = {}
    for c in tqdm(todo, desc="cells", disable=not progress, file=sys.stderr):
        scheme_name, variant = parse_method(c["method"])
        scoring = scoring_for(variant, c["semantic"], c["alpha"], group)
        scheme = scheme_for(scheme_name, c["act"] or "dynamic", weights, rotate)
        if variant == "quota":
            quantized.clear()
            acc, extra = _quota_cell(llava, scheme, c, items, scoring)
            records.append({**c, **extra, "accuracy": acc, "n": len(items), "scheme": scheme.describe(),
                            "split": split, "seed": seed})
            _write_atomic(out, json.dumps(records, indent=1))
            continue
        # calibration runs on the pruned token set of the cell's K, with the cell's scoring
        calib_key = (scheme, c["calib_seed"], c["retention"] if scheme.needs_calibration else None,
                     scoring if scheme.needs_calibration else None)
        if calib_key not in quantized:
            quantized.clear()  # one quantized copy alive at a time
            calibrate = calibrator(calibration_pairs(c["calib_seed"] or 0), retention=c["retention"],
                                   scoring=scoring) if scheme.needs_calibration else None
            quantized[calib_key] = llava if scheme_name == "fp" else ptq.apply(llava, scheme, calibrate)
        acc = accuracy(quantized[calib_key], items, retention=c["retention"], scoring=scoring)
        records.append({**c, "keep": resolve_k(n, retention=c["retention"]), "accuracy": acc, "n": len(items),
                        "scheme": scheme.describe(), "split": split, "seed": seed})
        _write_atomic(out, json.dumps(records, indent=1))
    return records


def _quota_cell(llava: Llava, scheme: ptq.Scheme, c: dict, items, scoring: Scoring) -> tuple[float, dict]:
    """One QUOTA cell: the cell's retention is the average budget per decoder layer."""
    from qapruner import quota

    layers = llava.model.config.text_config.num_hidden_layers
    pre = quota.pre_retention_for(c["retention"], layers)
    res = quota.evaluate(llava, scheme, budget=c["retention"], pre_retention=pre, items=items,
                         calib_pairs=calibration_pairs(c["calib_seed"] or 0), methods=("quota",), scoring=scoring)
    r = res["quota"]
    return r["accuracy"], {"keep": resolve_k(llava.num_image_tokens, retention=pre), "pre_retention": pre,
                           "processed": r["processed"], "layers": r["layers"], "keeps": r["keeps"]}


def table(records: list[dict]) -> str:
    """Markdown: one block per (semantic, act); rows = methods; columns = retention; mean ± std over seeds."""
    groups: dict = {}
    for r in records:
        groups.setdefault((r["semantic"], r["act"] or "-"), []).append(r)
    lines = []
    rets = sorted({r["retention"] for r in records}, reverse=True)
    for (sem, act), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        lines += [f"\n**semantic = {sem}, activations = {act}**" + (" (W4A4 is simulated: fake quantization)"
                                                                     if any("w4a4" in r["method"] for r in rs) else ""),
                  "", "| method | " + " | ".join(f"{r:g}" for r in rets) + " |",
                  "|---|" + "---|" * len(rets)]
        several_alphas = len({r["alpha"] for r in rs}) > 1
        for m, alpha in dict.fromkeys((r["method"], r["alpha"]) for r in rs):
            row = []
            for ret in rets:
                accs = [r["accuracy"] for r in rs if r["method"] == m and r["alpha"] == alpha and r["retention"] == ret]
                if not accs:
                    row.append("")
                elif len(accs) == 1:
                    row.append(f"{100 * accs[0]:.1f}")
                else:
                    row.append(f"{100 * statistics.mean(accs):.1f} ± {100 * statistics.stdev(accs):.1f}")
            label = f"{m} (α = {alpha:g})" if several_alphas else m
            lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"


def plot(records: list[dict], path: Path) -> None:
    """Accuracy vs retention, one panel per (semantic, act)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["semantic"], r["act"]) for r in records if r["act"] is not None} or
                    {(r["semantic"], None) for r in records}, key=str)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (sem, act) in zip(axes[0], groups):
        rs = [r for r in records if r["semantic"] == sem and r["act"] in (act, None)]
        for m in dict.fromkeys(r["method"] for r in rs):
            pts: dict = {}
            for r in rs:
                if r["method"] == m:
                    pts.setdefault(r["retention"], []).append(r["accuracy"])
            xs = sorted(pts)
            ys = [100 * statistics.mean(pts[x]) for x in xs]
            if len(xs) == 1:
                ax.axhline(ys[0], ls="--", lw=1, label=m)
            else:
                ax.plot(xs, ys, marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("retention (fraction of visual tokens kept)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"semantic={sem}, act={act}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qapruner.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/digits-llava")
    ap.add_argument("--split", default="test", choices=list(data.SPLITS))
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="which questions")
    ap.add_argument("--retention", type=float, nargs="+", default=list(DEFAULT_RETENTIONS))
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    ap.add_argument("--semantic", nargs="+", choices=["cls", "text"], default=["cls"])
    ap.add_argument("--act", nargs="+", choices=["static", "dynamic"], default=["dynamic"])
    ap.add_argument("--calib-seeds", type=int, default=3)
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.7], help="one or more (a sweep)")
    ap.add_argument("--weights", choices=["rtn", "gptq"], default="gptq")
    ap.add_argument("--rotate", action="store_true")
    ap.add_argument("--out", default="build/results.json")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        for m in args.methods:
            parse_method(m)
        for r in args.retention:
            if not 0 < r <= 1:
                raise ValueError(f"retention must be in (0, 1], got {r}")
        if args.questions < 1 or args.calib_seeds < 1:
            raise ValueError("--questions and --calib-seeds must be ≥ 1")
        if not all(0 <= a <= 1 for a in args.alpha):
            raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
        llava = load(args.model)
        grid = [c for sem in args.semantic for act in args.act for alpha in args.alpha
                for c in cells(args.methods, args.retention, sem, act, list(range(args.calib_seeds)), alpha)]
        grid = list({_key(c): c for c in grid}.values())  # float cells are shared by both act modes
        out = Path(args.out)
        records = run(llava, grid, split=args.split, questions=args.questions, seed=args.seed,
                      weights=args.weights, rotate=args.rotate, out=out, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wanted = {_key(c) for c in grid}
    mine = [r for r in records if _key(r) in wanted]
    command = "python -m qapruner.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"# DigitsVQA accuracy: token pruning × simulated quantization\n\n"
              f"Written by `{command}`.\n\n"
              f"Model `{args.model}`; {args.questions} `{args.split}` questions (seed {args.seed}, the five question "
              f"types in turn); weights {args.weights.upper()}{', QuaRot rotation' if args.rotate else ''}; "
              f"calibration: {CALIB_PAIRS} train-split pairs per calibration seed, pruned to each cell's K with "
              f"the cell's score. W4A4 is a simulation (fake quantization): no engine runs INT4 activations. "
              f"Accuracy in %, mean ± std over calibration seeds where a method calibrates; `dense` and `fp` "
              f"use all tokens.\n\n")
    _write_atomic(out.with_suffix(".md"), header + table(mine) + f"\n![accuracy vs retention]({out.with_suffix('.png').name})\n")
    plot(mine, out.with_suffix(".png"))
    print(table(mine))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
