import json
import subprocess
import sys

import pytest
import torch

from qapruner.model import encode_images, load, save, tiny
from qapruner.pipeline import encode_inputs


def test_tiny_is_a_llava_with_expected_shapes(llava):
    from transformers import LlavaForConditionalGeneration

    assert isinstance(llava.model, LlavaForConditionalGeneration)
    assert llava.num_image_tokens == 64  # 112 px / 14 px patches, CLS dropped
    assert llava.model.config.text_config.hidden_size == 128
    assert llava.model.model.vision_tower.config._attn_implementation == "eager"


def test_tiny_is_deterministic_for_its_seed():
    a, b, c = tiny(seed=3), tiny(seed=3), tiny(seed=4)
    wa, wb, wc = (m.model.lm_head.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_save_then_load_round_trip(tmp_path, llava, images, prompts):
    out = save(llava, tmp_path / "tiny-llava")
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob(".tiny-llava.*"))
    back = load(out)
    assert back.model.config._attn_implementation == "eager"
    batch = encode_inputs(llava, images[:1], prompts[:1])
    assert torch.equal(encode_inputs(back, images[:1], prompts[:1])["input_ids"], batch["input_ids"])
    with torch.no_grad():
        ref = llava.model(**batch).logits
        got = back.model(**batch).logits
    assert torch.equal(ref, got)


def test_features_equal_llava_get_image_features(llava, images):
    px = encode_inputs(llava, images[:2], ["USER: <image> a"] * 2)["pixel_values"]
    enc = encode_images(llava.model, px, with_cls_attention=True)
    with torch.no_grad():
        ref = llava.model.model.get_image_features(pixel_values=px, vision_feature_layer=-2,
                                                   vision_feature_select_strategy="default").pooler_output
    assert torch.equal(enc["features"], torch.stack(ref))
    att = enc["attentions"]
    assert att.shape == (2, 4, 65, 65)
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 4, 65))


def test_load_errors(tmp_path, llava):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(empty)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a LLaVA"):
        load(llama)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    llava.model.config.to_json_file(noweights / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load(noweights)
    (noweights / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pickle"):
        load(noweights)
    noproc = save(llava, tmp_path / "noproc")
    (noproc / "processor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no processor files"):
        load(noproc)
    notok = save(llava, tmp_path / "notok")
    (notok / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"^cannot load .*notok: [^\n]*$"):
        load(notok)
    corrupt = save(llava, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot load"):
        load(corrupt)


def test_cli_tiny_and_info(tmp_path):
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-m", "qapruner.model", "tiny", "--out", str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "qapruner.model", "info", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["visual_tokens"] == 64
    r = subprocess.run([sys.executable, "-m", "qapruner.model", "info", str(tmp_path / "x")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not found" in r.stderr


def test_llava15_shaped_directory_loads_and_prunes(tmp_path):
    """CLIP ViT-L/14 at 336 px (576 tokens, hidden 1024, 2 of its 24 layers) saved in the llava-hf layout."""
    from PIL import Image

    from qapruner.pipeline import answer

    shaped = tiny(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=2, vision_heads=16,
                  text_hidden=256, intermediate=512)
    back = load(save(shaped, tmp_path / "llava-1.5-shaped"))
    assert back.num_image_tokens == 576
    img = Image.new("RGB", (500, 375), (120, 30, 200))
    res = answer(back, [img], ["USER: <image>\nwhat is this ? ASSISTANT:"], retention=0.125, max_new_tokens=1)
    assert res.indices.shape == (1, 72)


def test_cls_attention_is_the_feature_layers_softmax(llava, images):
    """Independent of encode_images: recompute layer L−2's attention (whose output is hidden_states[−2]) from
    its input with the layer's own norm and projections."""
    px = encode_inputs(llava, images[:2], ["USER: <image> a"] * 2)["pixel_values"]
    got = encode_images(llava.model, px, with_cls_attention=True)["attentions"]
    tower = llava.model.model.vision_tower
    with torch.no_grad():
        out = tower(px, output_hidden_states=True)
        idx = len(tower.encoder.layers) - 2
        layer = tower.encoder.layers[idx]
        x = layer.layer_norm1(out.hidden_states[idx])
        B, T, C = x.shape
        h = layer.self_attn.num_heads
        q = layer.self_attn.q_proj(x).view(B, T, h, C // h).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(B, T, h, C // h).transpose(1, 2)
        ref = torch.softmax(q @ k.transpose(-1, -2) * (C // h) ** -0.5, dim=-1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
