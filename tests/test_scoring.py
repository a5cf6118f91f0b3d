import math

import pytest
import torch

from qapruner.scoring import (Scoring, cls_attention, hybrid_scores, minmax_normalize, quantization_error,
                              text_relevance, token_range)


def test_hand_computed_error_and_range():
    # one token, D = 4, groups of 2, INT4: group 1 scale 1/7, 0.6 -> 4/7; group 2 scale 2/7, 0.3 -> 2/7
    v = torch.tensor([[[1.0, 0.6, -2.0, 0.3]]])
    E = quantization_error(v, group_size=2, bits=4)
    assert E.item() == pytest.approx(math.hypot(0.6 - 4 / 7, 0.3 - 2 / 7), rel=1e-5)
    assert token_range(v).item() == pytest.approx(3.0)


def test_planted_outlier_token_scores_highest():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 10, 16, generator=g) * 0.1
    f[0, 6, 3] = 9.0   # a massive activation in one channel of token 6 of image 0
    f[1, 2, 11] = -7.0  # and token 2 of image 1
    s = hybrid_scores(f, group_size=8)
    assert s["R"].argmax(1).tolist() == [6, 2]
    assert s["E"].argmax(1).tolist() == [6, 2]
    assert torch.equal(s["SQ"].argmax(1), torch.tensor([6, 2]))
    assert s["SQ"][0, 6] == 1 and s["SQ"][1, 2] == 1  # min-max normalised per image


def test_constant_token_and_zero_group():
    f = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1))
    f[0, 1] = 0.75          # constant token: no range, exact on the INT4 grid (q = 7 everywhere)
    f[0, 2, :4] = 0.0       # a zero group contributes no error
    s = hybrid_scores(f, group_size=4)
    assert s["R"][0, 1] == 0 and s["E"][0, 1] == 0
    rest = f[0, 2, 4:][None, None]
    assert s["E"][0, 2].item() == pytest.approx(quantization_error(rest, group_size=4).item(), abs=1e-7)
    assert not torch.isnan(s["S"]).any()


def test_normalisation_constant_vector_is_zeros():
    x = torch.tensor([[3.0, 3.0, 3.0], [1.0, 2.0, 5.0]])
    out = minmax_normalize(x)
    assert torch.equal(out[0], torch.zeros(3))
    torch.testing.assert_close(out[1], torch.tensor([0.0, 0.25, 1.0]))
    identical = torch.ones(1, 5, 8)
    s = hybrid_scores(identical, semantic=torch.arange(5.0)[None], group_size=8)
    assert torch.equal(s["SQ"], torch.zeros(1, 5))
    torch.testing.assert_close(s["S"], 0.7 * torch.tensor([[0.0, 0.25, 0.5, 0.75, 1.0]]))


def test_fusion_alpha_extremes_and_modes():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(2, 12, 16, generator=g)
    sem = torch.rand(2, 12, generator=g)
    s0 = hybrid_scores(f, sem, alpha=0.0, group_size=8)
    s1 = hybrid_scores(f, sem, alpha=1.0, group_size=8)
    assert torch.equal(s0["S"], s0["SQ"])
    assert torch.equal(s1["S"], minmax_normalize(sem))
    mid = hybrid_scores(f, sem, alpha=0.3, group_size=8)
    torch.testing.assert_close(mid["S"], 0.3 * mid["SP"] + 0.7 * mid["SQ"])
    torch.testing.assert_close(mid["SQ"], 0.5 * minmax_normalize(mid["E"]) + 0.5 * minmax_normalize(mid["R"]))
    assert torch.equal(hybrid_scores(f, group_size=8, sq_mode="error")["SQ"], minmax_normalize(mid["E"]))
    assert torch.equal(hybrid_scores(f, group_size=8, sq_mode="range")["SQ"], minmax_normalize(mid["R"]))
    nosem = hybrid_scores(f, None, group_size=8)  # S^P = 0 in S = α·S^P + (1 − α)·S^Q
    torch.testing.assert_close(nosem["S"], 0.3 * nosem["SQ"])
    assert torch.equal(nosem["SP"], torch.zeros(2, 12))
    assert set(mid) == {"E", "R", "SQ", "SP", "S"} and all(v.shape == (2, 12) for v in mid.values())


def test_default_group_size_is_128():
    f = torch.randn(1, 3, 256, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(hybrid_scores(f)["E"], quantization_error(f, group_size=128))
    with pytest.raises(ValueError, match="does not divide the feature dimension"):
        hybrid_scores(torch.randn(1, 3, 96))


def test_cls_attention_and_text_relevance():
    attn = torch.softmax(torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(4)), -1)
    patches = cls_attention(attn, 4)
    torch.testing.assert_close(patches, attn[:, :, 0, 1:].mean(1))
    torch.testing.assert_close(cls_attention(attn, 5).sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="do not match"):
        cls_attention(attn, 3)
    f = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]])
    torch.testing.assert_close(text_relevance(f, torch.tensor([[3.0, 0.0]])), torch.tensor([[1.0, 0.0, -1.0]]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"), (dict(group_size=0), "group_size"),
    (dict(sq_mode="both"), "sq_mode"), (dict(bits=1), "bits"), (dict(alpha=1.0), "semantic"),
    (dict(semantic=torch.rand(1, 5)), r"\[B, N\]"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hybrid_scores(torch.randn(1, 4, 8), **{"group_size": 8, **kwargs})


def test_bad_features_and_config():
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        hybrid_scores(torch.randn(4, 8))
    with pytest.raises(ValueError, match="semantic"):
        Scoring(semantic="clip")
    with pytest.raises(ValueError, match="alpha=1"):
        Scoring(semantic=None, alpha=1.0)
    with pytest.raises(ValueError, match="NaN"):
        hybrid_scores(torch.full((1, 2, 8), float("nan")), group_size=8)


def test_numpy_scalars_are_accepted():
    import numpy as np

    f = torch.randn(1, 4, 8)
    torch.testing.assert_close(hybrid_scores(f, torch.rand(1, 4), alpha=np.float32(0.5), group_size=np.int64(8))["E"],
                               quantization_error(f, group_size=8))
