"""Image and prompt preprocessing in numpy / Pillow / tokenizers: what the model's HF processor does, without it.

- `load_image`: a file -> an RGB `PIL.Image`, with one-line errors and a size limit.
- `pixel_values`: the CLIP image processor (transformers' `CLIPImageProcessorPil`, the PIL backend that
  `AutoProcessor` loads for these models) as configured in the artifact's `processor_config.json`:
  convert to RGB -> resize the shortest edge -> center crop -> rescale -> normalize, bit for bit.
- `load_tokenizer`, `encode_prompts`, `decode`: the `LlavaProcessor` text path (the `<image>` placeholder
  expanded to `num_image_tokens` image tokens, special tokens as the tokenizer's post-processor adds them,
  left padding) and `batch_decode(..., skip_special_tokens=True)`.

Imports only numpy, Pillow, tokenizers and the standard library.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Largest image `load_image` decodes, in pixels (width * height): 50 MP, a 8660 x 5773 photo, ~150 MB as RGB.
# Pillow's own decompression-bomb check still applies above it (Image.MAX_IMAGE_PIXELS, 89.5 MP by default).
MAX_PIXELS = 50_000_000

# The image processors whose arithmetic `pixel_values` reproduces (saved configs name the class without "Pil").
SUPPORTED_PROCESSORS = ("CLIPImageProcessor", "CLIPImageProcessorPil")
# Pillow's filters, as transformers' PILImageResampling numbers them; resizing goes through Pillow itself.
_RESAMPLE = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
# processor_config keys that carry no arithmetic (bookkeeping, or output formats we produce anyway).
_IGNORED_KEYS = {"image_processor_type", "processor_class", "_processor_class", "default_to_square",
                 "return_tensors", "device", "disable_grouping", "do_pad", "pad_size", "data_format",
                 "input_data_format"}
_STEPS = {"do_convert_rgb", "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
          "rescale_factor", "do_normalize", "image_mean", "image_std"}


# ----------------------------------------------------------------------------------------------- images

def load_image(path: str | os.PathLike, *, max_pixels: int | None = None,
               exif_transpose: bool = False) -> Image.Image:
    """Open an image file and return it decoded, as RGB.

    Any mode is converted the way the HF image processor converts (`transformers.image_transforms.
    convert_to_rgb`): images with an alpha band or a transparency key (RGBA, LA, PA, P/L with
    `transparency`) are composited onto white, everything else goes through `Image.convert("RGB")`
    (L, P, CMYK, YCbCr, I;16, ...). `exif_transpose=True` also applies the EXIF orientation as
    `transformers.image_utils.load_image` does; by default the stored pixels are used as they are, as
    `PIL.Image.open` gives them to the reference pipeline.

    Images over `max_pixels` (default `MAX_PIXELS`) are refused from the header, before decoding.
    Every failure is a one-line ValueError naming the file.
    """
    path = Path(path)
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    if not path.exists():
        raise ValueError(f"image not found: {path}")
    if not path.is_file():
        raise ValueError(f"not an image file: {path} is a directory or special file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # lazy: reads the header only
                w, h = im.size
                if w * h > limit:
                    raise ValueError(f"image too large: {path} is {w}x{h} = {w * h / 1e6:.1f} MP, "
                                     f"the limit is {limit / 1e6:.1f} MP")
                if w < 1 or h < 1:
                    raise ValueError(f"empty image: {path} is {w}x{h}")
                im.load()
                if exif_transpose:
                    im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except ValueError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"image too large: {path}: {_one_line(e)}") from None
    except UnidentifiedImageError:
        raise ValueError(f"not a readable image: {path} (Pillow does not recognise its format)") from None
    except (OSError, SyntaxError, EOFError) as e:  # truncated or corrupt data, unsupported codec
        raise ValueError(f"cannot read image {path}: {_one_line(e)}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb` for a PIL image: transparency composited onto white, else convert."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def pixel_values(images: list[Image.Image], processor_config: dict) -> np.ndarray:
    """images (any size and mode) -> pixel_values [B, 3, H, W] float32, H x W the configured crop.

    `processor_config` is the artifact's processor_config.json (or its "image_processor" part). Follows
    `CLIPImageProcessorPil` step by step, so the result equals it exactly (not just to rounding):
    1. do_convert_rgb: `to_rgb`.
    2. do_resize, size {"shortest_edge": s}: the short side becomes s and the long side
       int(s * long / short) (truncated, not rounded); {"height", "width"}: that size. Pillow's
       `Image.resize` with `resample` on the uint8 image.
    3. do_center_crop to crop_size: offsets (H - h) // 2, (W - w) // 2; an image smaller than the crop is
       zero-padded around it first (ceil of half the shortfall on top / left), as transformers does.
    4. do_rescale: float64(x) * rescale_factor, then cast to float32.
    5. do_normalize: (x - mean) / std in float32.
    A setting this does not implement (do_pad, longest_edge or max_height sizes, unknown keys, other
    processors) is a one-line ValueError rather than a silent approximation.
    """
    cfg = _image_config(processor_config)
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("pixel_values needs a non-empty list of PIL images")
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"image {i} is a {type(image).__name__}, not a PIL.Image")
        out.append(_process(image, cfg, i))
    shapes = {x.shape for x in out}
    if len(shapes) > 1:  # only without a center crop: the resize keeps the aspect ratio
        raise ValueError(f"the images processed to different shapes {sorted(shapes)}; a batch needs one")
    return np.stack(out)


def _process(image: Image.Image, cfg: dict, i: int) -> np.ndarray:
    if cfg["do_convert_rgb"]:
        image = to_rgb(image)
    elif image.mode != "RGB":
        raise ValueError(f"image {i} has mode {image.mode} and do_convert_rgb is off: pass RGB images")
    if cfg["do_resize"]:
        size = cfg["size"]
        w, h = image.size
        if "shortest_edge" in size:
            s = size["shortest_edge"]
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(s * long / short)  # transformers' get_resize_output_image_size: int(), not round()
            oh, ow = (new_long, s) if w <= h else (s, new_long)
        else:
            oh, ow = size["height"], size["width"]
        image = image.resize((ow, oh), resample=cfg["resample"], reducing_gap=None)
    x = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # [3, H, W]
    if cfg["do_center_crop"]:
        x = _center_crop(x, cfg["crop_size"]["height"], cfg["crop_size"]["width"])
    if cfg["do_rescale"]:
        x = (x.astype(np.float64) * cfg["rescale_factor"]).astype(np.float32)
    else:
        x = x.astype(np.float32)
    if cfg["do_normalize"]:
        mean = np.asarray(cfg["image_mean"], np.float32)[:, None, None]
        std = np.asarray(cfg["image_std"], np.float32)[:, None, None]
        x = (x - mean) / std
    return np.ascontiguousarray(x, dtype=np.float32)


def _center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """[C, H, W] -> [C, ch, cw]: transformers.image_transforms.center_crop, zero padding included."""
    _, h, w = x.shape
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
        return x[:, top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    pad = np.zeros((x.shape[0], nh, nw), x.dtype)
    tp, lp = -(-(nh - h) // 2), -(-(nw - w) // 2)  # ceil
    pad[:, tp:tp + h, lp:lp + w] = x
    top, left = top + tp, left + lp
    return pad[:, max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def _image_config(processor_config: dict) -> dict:
    """Validate the image processor settings; every step flag and its parameters must be present."""
    if not isinstance(processor_config, dict):
        raise ValueError(f"processor_config must be a dict, got {type(processor_config).__name__}")
    cfg = processor_config.get("image_processor", processor_config)
    kind = cfg.get("image_processor_type")
    if kind not in SUPPORTED_PROCESSORS:
        raise ValueError(f"unsupported image processor {kind!r}: only {', '.join(SUPPORTED_PROCESSORS)}")
    unknown = sorted(set(cfg) - _STEPS - _IGNORED_KEYS)
    if unknown:
        raise ValueError(f"unsupported image processor settings {unknown}")
    if cfg.get("do_pad"):
        raise ValueError("unsupported image processor setting do_pad=true")
    for flag in ("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if not isinstance(cfg.get(flag), bool):
            raise ValueError(f"processor_config needs {flag} as true/false, got {cfg.get(flag)!r}")
    need = {"do_resize": ("size", "resample"), "do_center_crop": ("crop_size",),
            "do_rescale": ("rescale_factor",), "do_normalize": ("image_mean", "image_std")}
    for flag, keys in need.items():
        for k in keys:
            if cfg[flag] and cfg.get(k) is None:
                raise ValueError(f"processor_config has {flag}=true but no {k}")
    if cfg["do_resize"]:
        size = cfg["size"]
        ok = isinstance(size, dict) and (
            (set(k for k, v in size.items() if v is not None) == {"shortest_edge"})
            or (set(k for k, v in size.items() if v is not None) == {"height", "width"}))
        if not ok or not all(isinstance(v, int) and v > 0 for v in size.values() if v is not None):
            raise ValueError(f"unsupported resize size {size!r}: only {{'shortest_edge': n}} or "
                             "{'height': h, 'width': w}")
        if cfg["resample"] not in _RESAMPLE:
            raise ValueError(f"unsupported resample {cfg['resample']!r}: only Pillow's filters "
                             f"{', '.join(f'{k}={v}' for k, v in _RESAMPLE.items())}")
    if cfg["do_center_crop"]:
        cs = cfg["crop_size"]
        if not (isinstance(cs, dict) and set(cs) == {"height", "width"}
                and all(isinstance(v, int) and v > 0 for v in cs.values())):
            raise ValueError(f"unsupported crop_size {cs!r}: only {{'height': h, 'width': w}}")
    if cfg["do_normalize"]:
        for k in ("image_mean", "image_std"):
            if not (isinstance(cfg[k], (list, tuple)) and len(cfg[k]) == 3):
                raise ValueError(f"processor_config {k} must be 3 numbers, got {cfg[k]!r}")
    return cfg


# ----------------------------------------------------------------------------------------------- text

def load_tokenizer(artifact_dir: str | os.PathLike):
    """tokenizers.Tokenizer from `artifact_dir/tokenizer.json`, with any padding / truncation it was saved
    with turned off (`encode_prompts` pads itself; the HF processor does not truncate)."""
    from tokenizers import Tokenizer

    path = Path(artifact_dir) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"no tokenizer.json in {artifact_dir}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception on malformed files
        raise ValueError(f"cannot read {path}: {_one_line(e)}") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def encode_prompts(tokenizer, prompts: list[str], manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    """prompts (one image placeholder each) -> input_ids, attention_mask [B, T] int64, left padded.

    As `LlavaProcessor(images=..., text=prompts, padding=True, padding_side="left")`: the placeholder
    string (manifest tokens.image_token) is replaced by num_image_tokens copies of itself, the text is
    encoded with the tokenizer's special tokens (its post-processor: BOS etc. where it has them), rows are
    left padded with tokens.pad_token_id and the mask is 0 on the padding.
    """
    tokens = manifest["tokens"]
    placeholder, image_id = tokens["image_token"], tokens["image_token_id"]
    pad_id, n = tokens["pad_token_id"], int(manifest["num_image_tokens"])
    if pad_id is None:
        raise ValueError("the manifest has no pad_token_id: cannot pad a batch")
    if isinstance(prompts, str) or not prompts:
        raise ValueError("encode_prompts needs a non-empty list of prompt strings")
    rows = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i} is empty")
        count = p.count(placeholder)
        if count != 1:
            raise ValueError(f"prompt {i} must hold exactly one {placeholder} placeholder, found {count}: {p!r}")
        ids = tokenizer.encode(p.replace(placeholder, placeholder * n), add_special_tokens=True).ids
        got = sum(t == image_id for t in ids)
        if got != n:
            raise ValueError(f"prompt {i} encoded to {got} image tokens (id {image_id}), expected {n}: "
                             f"does the tokenizer know {placeholder} as a special token?")
        rows.append(ids)
    T = max(len(r) for r in rows)
    input_ids = np.full((len(rows), T), pad_id, np.int64)
    attention_mask = np.zeros((len(rows), T), np.int64)
    for b, r in enumerate(rows):
        input_ids[b, T - len(r):] = r
        attention_mask[b, T - len(r):] = 1
    return input_ids, attention_mask


def decode(tokenizer, ids, special_ids) -> str:
    """One sequence of token ids [T] -> text without special tokens (pad, BOS/EOS, image...), stripped.

    Equals HF `batch_decode(..., skip_special_tokens=True)` (with clean_up_tokenization_spaces off, as
    these tokenizers are saved) followed by `.strip()`; ids in `special_ids` (the manifest's
    tokens.special_ids) are dropped as well as those the tokenizer marks special."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"decode takes one sequence of ids [T], got shape {arr.shape}")
    special = {int(s) for s in special_ids}
    keep = [int(t) for t in arr.tolist() if int(t) not in special]
    return tokenizer.decode(keep, skip_special_tokens=True).strip()


def decode_batch(tokenizer, ids, special_ids) -> list[str]:
    """[B, T] token ids -> B texts, each as `decode`."""
    return [decode(tokenizer, row, special_ids) for row in ids]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
