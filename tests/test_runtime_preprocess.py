"""runtime.preprocess: numpy/PIL/tokenizers preprocessing equals the HF LlavaProcessor's, with one-line errors."""
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime import preprocess as pp

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits-llava"
SIZES = [(224, 224), (300, 200), (120, 130), (37, 500)]  # (width, height)
MODES = ["RGB", "L", "RGBA", "P", "LA", "P+transparency", "CMYK", "I;16"]


@pytest.fixture(scope="module", params=["digits", "tiny"])
def model(request):
    """(directory, HF processor, processor_config.json, manifest-like dict) of the 224-px digits model and
    the tiny 112-px one; the manifest fields are read off the HF processor, as export writes them."""
    from transformers import AutoProcessor

    d = DIGITS if request.param == "digits" else request.getfixturevalue("tiny_dir")
    proc = AutoProcessor.from_pretrained(d)
    tok = proc.tokenizer
    n = int((proc(images=[_image(32, 32)], text=[f"x {proc.image_token}"], return_tensors="np")["input_ids"]
             == proc.image_token_id).sum())
    manifest = {"num_image_tokens": n,
                "tokens": {"image_token_id": proc.image_token_id, "image_token": proc.image_token,
                           "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                           "special_ids": sorted(set(tok.all_special_ids) | {proc.image_token_id})}}
    return Path(d), proc, json.loads((Path(d) / "processor_config.json").read_text()), manifest


def _image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[: h // 3, :, 3] = 0  # a fully transparent band: compositing onto white must show
    if mode == "RGB":
        return Image.fromarray(rgba[..., :3].copy())
    if mode == "RGBA":
        return Image.fromarray(rgba)
    if mode == "L":
        return Image.fromarray(rgba[..., 0].copy())
    if mode == "LA":
        return Image.fromarray(rgba).convert("LA")
    if mode.startswith("P"):
        im = Image.fromarray(rgba[..., :3].copy()).quantize(32)
        if mode == "P+transparency":
            im.info["transparency"] = 0
        return im
    return Image.fromarray(rgba[..., :3].copy()).convert(mode)


def test_processor_is_the_pil_backend(model):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    assert isinstance(model[1].image_processor, CLIPImageProcessorPil)


def test_pixel_values_equal_hf(model):
    _, proc, cfg, _ = model
    images = [_image(w, h, mode, seed=i) for i, ((w, h), mode) in
              enumerate((s, m) for s in SIZES for m in MODES)]
    want = proc.image_processor(images=images, return_tensors="np")["pixel_values"]
    got = pp.pixel_values(images, cfg)
    crop = cfg["image_processor"]["crop_size"]
    assert got.shape == want.shape == (len(images), 3, crop["height"], crop["width"])
    assert got.dtype == np.float32
    err = np.abs(got - want).reshape(len(images), -1).max(1)  # measured: exactly 0 (same float ops as HF)
    bad = [(images[i].size, images[i].mode, float(e)) for i, e in enumerate(err) if e > 1e-5]
    assert not bad, bad


def test_pixel_values_small_crop_pads_like_hf(model):
    """shortest_edge below the crop: transformers zero-pads around the image before cropping."""
    _, proc, cfg, _ = model
    ip = dict(cfg["image_processor"], size={"shortest_edge": 50})
    images = [_image(70, 50), _image(51, 90, "L")]
    want = proc.image_processor(images=images, size={"shortest_edge": 50}, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(pp.pixel_values(images, ip), want, atol=1e-5, rtol=0)


def test_load_image_equals_hf_on_the_file(model, tmp_path):
    """load_image(file) then pixel_values == the HF processor on the file as PIL opens it."""
    _, proc, cfg, _ = model
    paths = []
    for i, mode in enumerate(["RGBA", "P+transparency", "LA", "L", "RGB"]):
        paths.append(tmp_path / f"{i}.png")
        _image(97, 61, mode, seed=i).save(paths[-1])
    got = pp.pixel_values([pp.load_image(p) for p in paths], cfg)
    loaded = [pp.load_image(p) for p in paths]
    assert all(im.mode == "RGB" for im in loaded)
    want = proc.image_processor(images=[Image.open(p) for p in paths], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


PROMPTS = ["USER: <image> what digit ? ASSISTANT:",
           "USER: <image> how many digits are there in the top left ? ASSISTANT:",
           "<image> is there a red digit ?",
           "USER: what is the largest digit on left ? <image> ASSISTANT: zebra"]  # zebra: <unk>


def test_encode_prompts_equals_hf(model):
    d, proc, _, manifest = model
    tok = pp.load_tokenizer(d)
    want = proc(images=[_image(40, 40)] * len(PROMPTS), text=PROMPTS, return_tensors="np", padding=True,
                padding_side="left")
    ids, mask = pp.encode_prompts(tok, PROMPTS, manifest)
    assert ids.dtype == mask.dtype == np.int64
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    assert (mask.sum(1) < mask.shape[1]).any(), "the prompts should differ in length"
    assert ((ids == manifest["tokens"]["image_token_id"]).sum(1) == manifest["num_image_tokens"]).all()


def test_decode_equals_hf_batch_decode(model):
    d, proc, _, manifest = model
    tok, hf = pp.load_tokenizer(d), proc.tokenizer
    ids, _ = pp.encode_prompts(tok, PROMPTS, manifest)
    t = manifest["tokens"]
    eos = hf.eos_token_id
    gen = np.array([[hf.convert_tokens_to_ids("what"), eos, t["pad_token_id"], t["pad_token_id"]],
                    [t["bos_token_id"], hf.convert_tokens_to_ids("?"), hf.unk_token_id, eos]])
    for batch in (ids, gen):
        want = [s.strip() for s in hf.batch_decode(batch, skip_special_tokens=True)]
        assert pp.decode_batch(tok, batch, t["special_ids"]) == want
        assert [pp.decode(tok, row, t["special_ids"]) for row in batch] == want


# ----------------------------------------------------------------------------------------------- errors

def _one_line_error(fn, *args, match=None, **kw):
    with pytest.raises(ValueError, match=match) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_load_image_errors(tmp_path):
    assert "not found" in _one_line_error(pp.load_image, tmp_path / "missing.png")
    fake = tmp_path / "notes.png"
    fake.write_text("not an image\n")
    assert "notes.png" in _one_line_error(pp.load_image, fake, match="not a readable image")
    _one_line_error(pp.load_image, tmp_path, match="not an image file")
    good = tmp_path / "good.png"
    _image(64, 64).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    assert "truncated.png" in _one_line_error(pp.load_image, truncated)
    assert pp.load_image(good).size == (64, 64)
    assert "too large" in _one_line_error(pp.load_image, good, max_pixels=64 * 64 - 1)


def _png_header(w, h):
    """A PNG that claims w x h pixels but holds almost no data: only the header is ever read."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("w,h", [(10_000, 6_000),      # 60 MP: over MAX_PIXELS, under Pillow's own limit
                                 (12_000, 9_000),      # 108 MP: Pillow's DecompressionBombWarning
                                 (100_000, 100_000)])  # 10 GP: Pillow's DecompressionBombError
def test_load_image_refuses_huge_images_from_the_header(tmp_path, w, h):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header(w, h))
    assert "huge.png" in _one_line_error(pp.load_image, path, match="too large")


def test_encode_prompts_errors(model):
    d, _, _, manifest = model
    tok = pp.load_tokenizer(d)
    _one_line_error(pp.encode_prompts, tok, ["USER: <image> what ?", ""], manifest, match="prompt 1 is empty")
    _one_line_error(pp.encode_prompts, tok, ["   "], manifest, match="empty")
    _one_line_error(pp.encode_prompts, tok, ["USER: what digit ?"], manifest, match="exactly one.*found 0")
    _one_line_error(pp.encode_prompts, tok, ["<image> <image> what"], manifest, match="exactly one.*found 2")
    _one_line_error(pp.encode_prompts, tok, [], manifest)
    _one_line_error(pp.load_tokenizer, d.parent / "no-such-artifact", match="no tokenizer.json")


@pytest.mark.parametrize("change,match", [
    ({"do_pad": True}, "do_pad"),
    ({"resample": 7}, "resample"),
    ({"size": {"shortest_edge": 224, "longest_edge": 400}}, "resize size"),
    ({"crop_size": {"shortest_edge": 224}}, "crop_size"),
    ({"image_processor_type": "SiglipImageProcessor"}, "unsupported image processor"),
    ({"do_flip_channel_order": True}, "settings"),
])
def test_pixel_values_refuses_unsupported_configs(change, match):
    cfg = json.loads((DIGITS / "processor_config.json").read_text())
    cfg["image_processor"].update(change)
    _one_line_error(pp.pixel_values, [_image(30, 30)], cfg, match=match)


def test_import_needs_neither_torch_nor_transformers():
    code = ("import sys; import runtime.preprocess; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
            "[m for m in sys.modules if m.startswith(('torch', 'transformers'))]")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
