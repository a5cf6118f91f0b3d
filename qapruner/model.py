"""Load a local llava-hf checkpoint, or build a tiny random LLaVA from configs; run the vision side once.

`Llava` bundles a `LlavaForConditionalGeneration` (eager attention, so attention maps exist) with its
processor. transformers 5.x places the parts under model.model.{vision_tower, multi_modal_projector,
language_model}; the LM head is model.lm_head.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_WORDS = (
    "USER: ASSISTANT: what which how many is are the a an of in on at this that image picture digit digits "
    "number color colour colors largest smallest top bottom left right center yes no there any show shows "
    "red green blue yellow white black purple orange cyan magenta gray photo ? . , "
    "0 1 2 3 4 5 6 7 8 9 zero one two three four five six seven eight nine ten"
).split()
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")


@dataclass(frozen=True)
class Llava:
    """A LLaVA model with its processor. `scheme` and `rotation` are set by `qapruner.ptq.apply`:
    the simulated quantization scheme, and the orthogonal [D, D] matrix that rotates the LLM's inputs
    (QuaRot) when the residual stream was rotated."""
    model: Any
    processor: Any
    source: str
    scheme: Any = None
    rotation: torch.Tensor | None = None

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image (N) as the processor expands the image placeholder."""
        vc = self.model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n + (1 if self.model.config.vision_feature_select_strategy == "full" else 0)

    def replace(self, **changes) -> "Llava":
        return dataclasses.replace(self, **changes)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Llava:
    """Load a local llava-hf directory (config.json, safetensors weights, processor files), offline,
    with eager attention. Real llava-1.5 directories load unchanged."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model directory not found: {p}")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {p}: not a Hugging Face model directory")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    if model_type != "llava":
        raise ValueError(f"{p} holds a {model_type!r} model, not a LLaVA (config.json model_type must be 'llava')")
    if not any(p.glob("*.safetensors")):
        hint = " (pickle .bin weights are never loaded: convert them to safetensors)" if any(p.glob("*.bin")) else ""
        raise FileNotFoundError(f"no *.safetensors weights in {p}{hint}")
    if not (p / "processor_config.json").is_file() and not (p / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"no processor files (processor_config.json or preprocessor_config.json) in {p}")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    _quiet_transformers()
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            p, attn_implementation="eager", dtype=dtype, local_files_only=True, trust_remote_code=False)
        processor = AutoProcessor.from_pretrained(p, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # missing shards or tokenizer files, corrupt safetensors: transformers says which
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load {p}: {first}") from e
    return Llava(model.eval(), processor, str(p))


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_sha256(model_dir: str | Path) -> str:
    """sha256 over the source model's config and weight files (sorted names + bytes)."""
    import hashlib

    h = hashlib.sha256()
    root = Path(model_dir)
    for p in sorted([*root.glob("*.safetensors"), root / "config.json"]):
        h.update(p.name.encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


def save(llava: Llava, out: str | os.PathLike) -> Path:
    """save_pretrained model + processor into `out`, written to a temporary sibling and renamed."""
    if llava.scheme is not None:
        raise ValueError("refusing to save a fake-quantized model: save the float model and its scheme instead")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        llava.model.save_pretrained(tmp)
        llava.processor.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def word_tokenizer(words=DEFAULT_WORDS, specials=SPECIAL_TOKENS):
    """A whitespace word-level tokenizer (tokenizers.WordLevel) wrapped for transformers, left padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials, *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left")


def tiny(*, image_size: int = 112, patch_size: int = 14, vision_hidden: int = 64, vision_layers: int = 3,
         vision_heads: int = 4, text_hidden: int = 128, text_layers: int = 2, text_heads: int = 4,
         kv_heads: int = 2, intermediate: int = 256, words=DEFAULT_WORDS, seed: int = 0) -> Llava:
    """A small randomly initialised LLaVA (CLIP vision tower, 2-layer GELU projector, Llama decoder) built
    from configs with no download, and a matching processor. Deterministic for `seed`."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    _quiet_transformers()
    tokenizer = word_tokenizer(words)
    vocab = tokenizer.get_vocab()
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                              image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=text_hidden, intermediate_size=intermediate,
                       num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=1024, pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"],
                       eos_token_id=vocab["</s>"], tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"],
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return Llava(model.eval(), processor, f"tiny(seed={seed})")


def _attention_index(layer: int, num_layers: int) -> int:
    # hidden_states[f] is the output of encoder layer f-1 (f ≥ 1) or of layer num_layers+f (f < 0)
    if layer == 0 or not -num_layers <= layer <= num_layers:
        raise ValueError(f"vision_feature_layer {layer} has no attention map (the tower has {num_layers} layers)")
    return layer - 1 if layer > 0 else layer


def _encoder_layers(tower) -> torch.nn.ModuleList:
    # transformers 5.x CLIPVisionModel: tower.encoder.layers; older layouts: tower.vision_model.encoder.layers
    for owner in (tower, getattr(tower, "vision_model", None)):
        layers = getattr(getattr(owner, "encoder", None), "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the encoder layers of vision tower {type(tower).__name__} for CLS attention")


@torch.no_grad()
def encode_images(model, pixel_values: torch.Tensor, with_cls_attention: bool = False) -> dict[str, torch.Tensor]:
    """One vision pass: projected visual tokens `features` [B, N, D] (exactly what LLaVA's
    get_image_features returns) and, if asked, the feature layer's `attentions` [B, H, 1+P, 1+P].

    The attention map is caught with a forward hook on that one layer's attention module, so the maps of the
    other layers are never kept (CLIP-L at 336 px: ~0.5 GB per image for all 24 of them)."""
    cfg = model.config
    strategy = cfg.vision_feature_select_strategy
    tower = model.model.vision_tower
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be [B, 3, H, W], got {tuple(pixel_values.shape)}")
    chosen = [cfg.vision_feature_layer] if isinstance(cfg.vision_feature_layer, int) else list(cfg.vision_feature_layer)
    caught: list[torch.Tensor] = []
    hook = None
    if with_cls_attention:
        if tower.config._attn_implementation != "eager":
            raise ValueError("CLS attention needs eager attention: load the model with qapruner.model.load")
        blocks = _encoder_layers(tower)
        # for a multi-layer feature stack the last listed layer's attention is the semantic score
        attn = blocks[_attention_index(chosen[-1], len(blocks))].self_attn
        hook = attn.register_forward_hook(lambda mod, args, out: caught.append(out[1]))
    try:
        out = tower(pixel_values.to(model.dtype), output_hidden_states=True, return_dict=True)
    finally:
        if hook is not None:
            hook.remove()
    hidden = [out.hidden_states[i] for i in chosen]
    if strategy == "default":
        hidden = [h[:, 1:] for h in hidden]
    result = {"features": model.model.multi_modal_projector(torch.cat(hidden, dim=-1))}
    if with_cls_attention:
        if len(caught) != 1 or caught[0] is None:
            raise ValueError("the vision tower's attention layer returned no attention weights")
        result["attentions"] = caught[0]
    return result


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qapruner.model", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny", help="write a tiny random LLaVA directory (for smoke tests and the demo)")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    i = sub.add_parser("info", help="load a model directory and print its shape facts")
    i.add_argument("model")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "tiny":
            print(f"wrote {save(tiny(seed=args.seed), args.out)}")
        else:
            llava = load(args.model)
            cfg = llava.model.config
            print(json.dumps({"source": llava.source, "visual_tokens": llava.num_image_tokens,
                              "llm_hidden": cfg.text_config.hidden_size,
                              "llm_layers": cfg.text_config.num_hidden_layers,
                              "vision_feature_layer": cfg.vision_feature_layer,
                              "parameters": sum(p.numel() for p in llava.model.parameters())}, indent=1))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
