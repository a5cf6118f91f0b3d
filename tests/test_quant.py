import numpy as np
import pytest
import torch

from qapruner.quant import compute_params, dequantize, fake_quantize, qrange, quantize, sqnr_db


def slow_fake_quantize(x: np.ndarray, bits: int, symmetric: bool, granularity: str, group_size=None, axis=0):
    """Reference: loop over the sets of elements that share a scale, in float32 scalars."""
    x = x.astype(np.float32)
    out = np.empty_like(x)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    if granularity == "tensor":
        index_sets = [np.ones(x.shape, bool)]
    elif granularity == "channel":
        ax = axis % x.ndim
        index_sets = []
        for c in range(x.shape[ax]):
            m = np.zeros(x.shape, bool)
            sl = [slice(None)] * x.ndim
            sl[ax] = c
            m[tuple(sl)] = True
            index_sets.append(m)
    else:
        g = x.shape[-1] if granularity == "token" else group_size
        index_sets = []
        for lead in np.ndindex(*x.shape[:-1]):
            for start in range(0, x.shape[-1], g):
                m = np.zeros(x.shape, bool)
                m[lead + (slice(start, start + g),)] = True
                index_sets.append(m)
    for m in index_sets:
        vals = x[m]
        if symmetric:
            scale = np.float32(max(abs(float(v)) for v in vals)) / np.float32(qmax)
            zero = np.float32(0)
        else:
            lo = np.float32(min(min(float(v) for v in vals), 0.0))
            hi = np.float32(max(max(float(v) for v in vals), 0.0))
            scale = (hi - lo) / np.float32(qmax - qmin)
            zero = np.round(-lo / scale) if scale > 0 else np.float32(0)
        safe = scale if scale > 0 else np.float32(1)
        q = np.clip(np.round(vals / safe) + zero, qmin, qmax)
        out[m] = (q - zero).astype(np.float32) * scale
    return out


CASES = [("tensor", None, 0), ("channel", None, 0), ("channel", None, -1), ("token", None, 0), ("group", 4, 0)]


@pytest.mark.parametrize("granularity,group_size,axis", CASES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quantize_matches_slow_reference(granularity, group_size, axis, symmetric, bits):
    g = torch.Generator().manual_seed(bits * 10 + symmetric)
    x = torch.randn(3, 5, 8, generator=g) * 3
    x[0, 1, :4] = 0  # an all-zero group
    got = fake_quantize(x, bits, symmetric=symmetric, granularity=granularity, group_size=group_size, axis=axis)
    ref = slow_fake_quantize(x.numpy(), bits, symmetric, granularity, group_size, axis)
    assert np.array_equal(got.numpy(), ref)


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_dequantize_round_trip_is_fake_quantize(symmetric):
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    scale, zero = compute_params(x, 4, symmetric=symmetric, granularity="group", group_size=8)
    assert scale.shape == (4, 2)
    assert (zero is None) == symmetric
    q = quantize(x, scale, zero, bits=4, group_size=8)
    qmin, qmax = qrange(4, symmetric)
    assert q.dtype == (torch.int8 if symmetric else torch.uint8)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    back = dequantize(q, scale, zero, group_size=8)
    assert torch.equal(back, fake_quantize(x, 4, symmetric=symmetric, granularity="group", group_size=8))


def test_zero_group_dequantizes_to_zero_without_nan():
    x = torch.zeros(2, 8)
    x[1, 4:] = torch.tensor([1.0, -2.0, 0.5, 3.0])
    for sym in (True, False):
        y = fake_quantize(x, 4, symmetric=sym, granularity="group", group_size=4)
        assert not torch.isnan(y).any()
        assert torch.equal(y[0], torch.zeros(8)) and torch.equal(y[1, :4], torch.zeros(4))


def test_symmetric_int4_grid_is_max_over_7():
    x = torch.tensor([[1.0, 0.6, -2.0, 0.3]])
    y = fake_quantize(x, 4, granularity="group", group_size=2)
    # group 1: scale 1/7, 0.6·7 = 4.2 -> 4; group 2: scale 2/7, 0.3·3.5 = 1.05 -> 1
    expected = torch.tensor([[1.0, 4 / 7, -2.0, 2 / 7]])
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-7)


def test_static_scale_clamps_outliers():
    x = torch.tensor([0.1, -0.2, 5.0])
    y = fake_quantize(x, 8, scale=torch.tensor(0.5 / 127))
    assert y[2] == pytest.approx(0.5) and y[0] == pytest.approx(0.1, abs=0.5 / 127)
    with pytest.raises(ValueError, match="symmetric"):
        fake_quantize(x, 8, symmetric=False, scale=torch.tensor(1.0))


def test_more_bits_less_noise():
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    s = [sqnr_db(x, fake_quantize(x, b, granularity="token")) for b in (2, 4, 8)]
    assert s[0] < s[1] < s[2] and s[2] > 35


@pytest.mark.parametrize("call,match", [
    (lambda: fake_quantize(torch.randn(2, 6), 4, granularity="group", group_size=4), "does not divide"),
    (lambda: fake_quantize(torch.randn(2, 6), 4, granularity="group"), "group_size"),
    (lambda: fake_quantize(torch.randn(2, 6), 4, granularity="row"), "granularity"),
    (lambda: fake_quantize(torch.randn(2, 6), 9), "bits"),
    (lambda: fake_quantize(torch.ones(2, 6, dtype=torch.int32), 4), "floating-point"),
    (lambda: fake_quantize(torch.randn(2, 6), 4, granularity="channel", axis=2), "axis"),
    (lambda: quantize(torch.randn(2, 6), torch.ones(3), bits=4), "broadcast"),
    (lambda: quantize(torch.randn(2, 8), torch.ones(2, 3), bits=4, group_size=4), "group parameters"),
    (lambda: dequantize(torch.randn(2, 6), torch.ones(1)), "integer"),
    (lambda: sqnr_db(torch.ones(2), torch.ones(3)), "shape"),
])
def test_bad_inputs_fail_first(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
