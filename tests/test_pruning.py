import pytest
import torch

from qapruner.pruning import prune, resolve_k, select


def test_select_returns_ascending_top_k_with_ties_to_lower_index():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert select(s, 2).tolist() == [[1, 2], [0, 1]]
    assert select(s, 3).tolist() == [[1, 2, 4], [0, 1, 2]]
    assert select(s, 5).tolist() == [[0, 1, 2, 3, 4]] * 2
    assert select(s, 1).dtype == torch.int64


def test_select_matches_brute_force_as_sets():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 6, (8, 40), generator=g).float()  # many ties
    for k in (1, 5, 13, 40):
        got = select(s, k)
        for row, idx in zip(s.tolist(), got.tolist()):
            ref = sorted(sorted(range(len(row)), key=lambda i: (-row[i], i))[:k])
            assert idx == ref


def test_prune_gathers_rows():
    f = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    idx = torch.tensor([[0, 3], [2, 4]])
    out = prune(f, idx)
    assert out.shape == (2, 2, 3)
    assert torch.equal(out[0], f[0, [0, 3]]) and torch.equal(out[1], f[1, [2, 4]])


def test_resolve_k():
    assert resolve_k(256, keep=32) == 32
    assert resolve_k(256, retention=0.125) == 32
    assert resolve_k(576, retention=0.125) == 72
    assert resolve_k(10, retention=0.3) == 3  # 0.3·10 is 3.0000000000000004 in floating point
    assert resolve_k(10, retention=0.31) == 4
    assert resolve_k(5, retention=0.01) == 1
    assert resolve_k(5, retention=1.0) == 5


@pytest.mark.parametrize("kwargs,match", [
    (dict(keep=0), "keep"), (dict(keep=-3), "keep"), (dict(keep=257), r"\[1, 256\]"),
    (dict(retention=0.0), "retention"), (dict(retention=1.5), "retention"), (dict(retention=-0.2), "retention"),
    (dict(), "exactly one"), (dict(keep=3, retention=0.5), "exactly one"), (dict(keep=2.5), "integer"),
])
def test_resolve_k_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_k(256, **kwargs)


def test_select_and_prune_errors():
    s = torch.rand(2, 6)
    for k in (0, 7, -1):
        with pytest.raises(ValueError, match="k must be"):
            select(s, k)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        select(torch.rand(6), 2)
    with pytest.raises(ValueError, match="NaN"):
        select(torch.tensor([[0.1, float("nan")]]), 1)
    with pytest.raises(ValueError, match="out of range"):
        prune(torch.rand(1, 4, 2), torch.tensor([[1, 4]]))
    with pytest.raises(ValueError, match="int64"):
        prune(torch.rand(1, 4, 2), torch.tensor([[1, 2]], dtype=torch.int32))


def test_numpy_scalars_are_accepted():
    import numpy as np

    assert resolve_k(256, keep=np.int64(32)) == 32 and isinstance(resolve_k(256, keep=np.int64(32)), int)
    assert resolve_k(256, retention=np.float32(0.125)) == 32
    assert select(torch.tensor([[0.1, 0.9, 0.5]]), np.int64(2)).tolist() == [[1, 2]]
