"""export.vision: the traced scoring-and-pruning graph equals the torch reference, in torch and in ONNX Runtime."""
import numpy as np
import pytest
import torch

from export.artifact import vision_feeds
from export.vision import VisionPruner, export_vision
from qapruner import pipeline
from qapruner.scoring import Scoring, hybrid_scores, score_terms
from runtime.backends import OrtBackend

SCORINGS = [Scoring(semantic="cls", alpha=0.7), Scoring(semantic="text", alpha=0.5),
            Scoring(semantic=None, alpha=0.0), Scoring(semantic="cls", alpha=0.3, sq_mode="error", group_size=32)]


def test_traced_score_terms_equal_hybrid_scores():
    """What the graph computes (score_terms, no value checks) is hybrid_scores exactly, zero groups included."""
    v = torch.randn(2, 7, 64) * torch.linspace(0.1, 30, 64)
    v[0, 3, :32] = 0  # a zero group dequantizes to 0
    sem = torch.rand(2, 7)
    for bits, g, mode, alpha, semantic in ((4, 16, "hybrid", 0.7, sem), (4, 64, "error", 0.3, sem),
                                           (8, 32, "range", 0.0, None), (3, 8, "hybrid", 0.5, None)):
        want = hybrid_scores(v, semantic, alpha, g, bits, mode)
        got = score_terms(v, semantic, alpha, g, bits, mode)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


@pytest.mark.parametrize("scoring", SCORINGS, ids=lambda s: f"{s.semantic}-{s.alpha}-{s.sq_mode}")
def test_module_equals_pipeline(llava, images, prompts, scoring):
    k = 9
    ref = pipeline.prefill_inputs(llava, images, prompts, keep=k, scoring=scoring)
    feeds = vision_feeds(llava, list(zip(images, prompts)), scoring.semantic)
    module = VisionPruner(llava, scoring, k).eval()
    with torch.no_grad():
        for i, f in enumerate(feeds):
            args = [torch.from_numpy(f["pixel_values"])] + ([torch.from_numpy(f["text_embedding"])]
                                                            if "text_embedding" in f else [])
            tokens, kept, s = module(*args)
            torch.testing.assert_close(s[0], ref.scores["S"][i], rtol=0, atol=1e-6)
            assert set(kept[0].tolist()) == set(ref.indices[i].tolist())
            assert kept[0].tolist() == sorted(kept[0].tolist())


@pytest.mark.parametrize("scoring", SCORINGS[:3], ids=lambda s: f"{s.semantic}")
def test_onnx_round_trip_fp32_with_dynamic_batch(llava, images, prompts, scoring, tmp_path):
    k = 12
    path = export_vision(llava, scoring, k, tmp_path / "vision.onnx")
    module = VisionPruner(llava, scoring, k).eval()
    session = OrtBackend(path)
    assert session.inputs == ["pixel_values"] + (["text_embedding"] if scoring.semantic == "text" else [])
    feeds = vision_feeds(llava, list(zip(images, prompts)), scoring.semantic)
    for b in (1, 3):  # the graph was traced at batch 2
        feed = {n: np.concatenate([f[n] for f in feeds[:b]]) for n in feeds[0]}
        got = session.infer(feed)
        with torch.no_grad():
            want = [t.numpy() for t in module(*(torch.from_numpy(feed[n]) for n in session.inputs))]
        assert got["tokens"].shape == (b, k, llava.model.config.text_config.hidden_size)
        assert got["indices"].dtype == np.int64
        np.testing.assert_allclose(got["tokens"], want[0], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got["scores"], want[2], atol=1e-5, rtol=0)
        for g, w in zip(got["indices"], want[1]):
            assert set(g.tolist()) == set(w.tolist()) and list(g) == sorted(g)


def test_standard_ops_only(llava, tmp_path):
    import onnx

    model = onnx.load(export_vision(llava, Scoring(), 5, tmp_path / "v.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    ops = {n.op_type for n in model.graph.node}
    assert {"TopK", "Round"} <= ops  # the score and the selection are in the graph


def test_bad_k(llava, tmp_path):
    with pytest.raises(ValueError, match="must be in"):
        export_vision(llava, Scoring(), llava.num_image_tokens + 1, tmp_path / "v.onnx")
    with pytest.raises(ValueError, match="group size"):
        export_vision(llava, Scoring(group_size=48), 4, tmp_path / "v.onnx")
    assert not (tmp_path / "v.onnx").exists()
