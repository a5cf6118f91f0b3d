"""Export at real LLaVA-1.5 shapes (no download): CLIP ViT-L/14 at 336 px (576 tokens, hidden 1024, 24 layers)
and a Llama decoder of hidden 4096 with 2 layers, projector 1024 -> 4096. K = 64."""
import numpy as np
import onnx
import pytest
import torch

from export.llm import export_llm, io_names
from export.vision import export_vision
from qapruner.model import tiny
from qapruner.scoring import Scoring
from runtime.backends import OrtBackend


@pytest.fixture(scope="module")
def llava15():
    m = tiny(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
             text_hidden=4096, text_layers=2, text_heads=32, kv_heads=32, intermediate=11008)
    assert m.num_image_tokens == 576
    return m


def test_llava15_shaped_vision_graph(llava15, tmp_path):
    path = export_vision(llava15, Scoring(semantic="cls", group_size=128), 64, tmp_path / "vision.onnx")
    onnx.checker.check_model(str(path))
    pixels = np.random.default_rng(0).standard_normal((1, 3, 336, 336)).astype(np.float32)
    out = OrtBackend(path).infer({"pixel_values": pixels})
    assert out["tokens"].shape == (1, 64, 4096) and out["scores"].shape == (1, 576)
    assert out["indices"].shape == (1, 64) and len(set(out["indices"][0].tolist())) == 64
    assert np.all(np.diff(out["indices"][0]) > 0)


def test_llava15_shaped_llm_graph(llava15, tmp_path):
    path = export_llm(llava15, tmp_path / "llm.onnx")
    onnx.checker.check_model(str(path))
    inputs = io_names(2)[0]
    t = 64 + 12
    feed = {"inputs_embeds": np.random.default_rng(0).standard_normal((1, t, 4096)).astype(np.float32) * 0.02,
            "attention_mask": np.ones((1, t), np.int64), "position_ids": np.arange(t, dtype=np.int64)[None]}
    for name in inputs[3:]:
        feed[name] = np.zeros((1, 32, 0, 128), np.float32)
    out = OrtBackend(path).infer(feed)
    assert out["logits"].shape == (1, 1, llava15.model.config.text_config.vocab_size)
    assert out["present.1.value"].shape == (1, 32, t, 128)
    with torch.no_grad():
        want = llava15.model(inputs_embeds=torch.from_numpy(feed["inputs_embeds"])).logits[:, -1:]
    np.testing.assert_allclose(out["logits"], want.numpy(), atol=1e-3, rtol=1e-3)
