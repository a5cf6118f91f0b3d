"""python -m export --model DIR --keep K | --retention R --semantic cls|text|none --alpha A
                   --vision fp32|fp16|int8 --llm fp32|fp16|w4a16|w8a8|w4a8 [--recipe recipe.json]
                   --out engines/NAME [--force]

Precision names exist here only; the builder takes frozen dataclasses."""
from __future__ import annotations

import argparse
import sys

from export.artifact import LlmPrecision, Options, VisionPrecision, build
from qapruner.scoring import Scoring

VISION = {"fp32": VisionPrecision(), "fp16": VisionPrecision(fp16=True), "int8": VisionPrecision(int8=True)}
LLM = {"fp32": LlmPrecision(), "fp16": LlmPrecision(fp16=True), "w4a16": LlmPrecision(weight_bits=4),
       "w4a8": LlmPrecision(weight_bits=4, int8_activations=True),
       "w8a8": LlmPrecision(weight_bits=8, int8_activations=True)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local llava-hf directory (e.g. models/digits-llava)")
    k = p.add_mutually_exclusive_group()
    k.add_argument("--keep", type=int, help="kept visual tokens K (fixed in the graph)")
    k.add_argument("--retention", type=float, help="kept fraction of the N visual tokens (K = ceil(r·N))")
    p.add_argument("--semantic", default="cls", choices=["cls", "text", "none"])
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--group-size", type=int, default=None, help="INT4 score group size (default: 128, or D if smaller)")
    p.add_argument("--vision", default="fp32", help="fp32 | fp16 | int8")
    p.add_argument("--llm", default="fp32", help="fp32 | fp16 | w4a16 | w4a8 | w8a8")
    p.add_argument("--int4-block", type=int, default=128, choices=[32, 64, 128])
    p.add_argument("--weights", default="gptq", choices=["gptq", "rtn"], help="INT4 weight method (core library)")
    p.add_argument("--calibration", default="calibration_data", help="calibration folder (export.calibration)")
    p.add_argument("--calib-limit", type=int, default=None, help="use only the first N calibration pairs")
    p.add_argument("--calib-tokens", default="pruned", choices=["pruned", "full"],
                   help="LLM statistics on the artifact's K kept tokens (default) or on all N, for comparison")
    p.add_argument("--recipe", default=None, help="QUOTA recipe (python -m qapruner.quota calibrate) to bake into "
                   "the LLM: K defaults to the recipe's V0")
    p.add_argument("--opset", type=int, default=21)
    p.add_argument("--out", required=True, help="artifact folder, e.g. engines/digits-k32")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    return p


def options_from_args(args, dim: int | None = None) -> Options:
    for what, table in (("vision", VISION), ("llm", LLM)):
        name = getattr(args, what)
        if name not in table:
            raise ValueError(f"unsupported --{what} precision {name!r}; choose one of {', '.join(table)}")
    llm = LLM[args.llm]
    if llm.weight_bits == 4:
        llm = LlmPrecision(4, llm.int8_activations, args.int4_block, args.weights)
    group = args.group_size or (min(128, dim) if dim else 128)
    semantic = None if args.semantic == "none" else args.semantic
    keep = args.keep
    if args.recipe is not None and keep is None and args.retention is None:
        from qapruner.quota import Recipe

        keep = Recipe.load(args.recipe).v0
    if keep is None and args.retention is None:
        raise ValueError("give --keep K or --retention R (or a --recipe, whose V0 sets K)")
    return Options(keep=keep, retention=args.retention, recipe=args.recipe,
                   scoring=Scoring(semantic=semantic, alpha=args.alpha, group_size=group),
                   vision=VISION[args.vision], llm=llm, opset=args.opset, calibration=args.calibration,
                   calibration_limit=args.calib_limit, calibrate_pruned=args.calib_tokens == "pruned")


def _model_dim(model_dir: str) -> int | None:
    import json
    from pathlib import Path

    try:
        return int(json.loads((Path(model_dir) / "config.json").read_text())["text_config"]["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # load() reports what is wrong with the directory


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        options = options_from_args(args, _model_dim(args.model))
        build(args.model, args.out, options, force=args.force, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (manifest.json lists every file with its sha256)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
