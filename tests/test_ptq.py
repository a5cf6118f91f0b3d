from dataclasses import replace

import pytest
import torch

from qapruner import ptq
from qapruner.pipeline import calibrator, generate, logits, prefill_inputs
from qapruner.ptq import PRESETS, QuantLinear, Scheme, gptq_weight, random_hadamard, rtn_weight, scheme_from_name
from qapruner.quant import sqnr_db
from tests.conftest import make_images

CALIB = list(zip(make_images(4, seed=7), ["USER: <image> how many digits ? ASSISTANT:"] * 4))


def _sqnr(llava, scheme, images, prompts, **calib):
    q = ptq.apply(llava, scheme, calibrator(CALIB, **calib) if scheme.needs_calibration else None)
    return sqnr_db(logits(llava, images, prompts, retention=1.0), logits(q, images, prompts, retention=1.0))


def test_presets_and_names():
    assert [PRESETS[k].name for k in ("fp", "w4a4", "w4a8", "w8a8", "w4a16", "w8a16")] == \
        ["fp", "w4a4", "w4a8", "w8a8", "w4a16", "w8a16"]
    assert PRESETS["w8a8"].w_granularity == "channel" and PRESETS["w4a4"].w_group_size == 128
    assert scheme_from_name("w4a4", kv_bits=4).name == "w4a4kv4"
    assert scheme_from_name("w4a4", a_mode="static").needs_calibration
    assert not PRESETS["w4a4"].needs_calibration
    with pytest.raises(dataclasses_frozen_error()):
        PRESETS["w4a4"].w_bits = 8


def dataclasses_frozen_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("kwargs,match", [
    (dict(w_bits=16), "w_bits"), (dict(a_bits=1), "a_bits"), (dict(kv_bits=9), "kv_bits"),
    (dict(w_granularity="row"), "w_granularity"), (dict(w_group_size=0), "w_group_size"),
    (dict(w_method="awq"), "w_method"), (dict(w_method="gptq"), "GPTQ needs"), (dict(a_mode="smooth"), "a_mode"),
    (dict(a_bits=8, a_mode="static", a_group_size=32), "static"), (dict(gptq_damp=0), "gptq_damp"),
    (dict(w_bits=4.0), "w_bits"), (dict(w_bits=True), "w_bits"), (dict(rotate="no"), "rotate"),
    (dict(a_bits=4, a_group_size=32.0), "a_group_size"), (dict(seed=1.5), "seed"),
])
def test_scheme_validates_itself(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Scheme(**kwargs)
    with pytest.raises(ValueError, match="unknown scheme"):
        scheme_from_name("w3a3")


def test_w8a8_sqnr_at_least_30db(llava, images, prompts):
    assert _sqnr(llava, PRESETS["w8a8"], images, prompts) >= 30
    assert _sqnr(llava, replace(PRESETS["w8a8"], a_mode="static"), images, prompts) >= 30


def test_more_bits_closer_to_float(llava, images, prompts):
    s = {n: _sqnr(llava, PRESETS[n], images, prompts) for n in ("w4a4", "w4a8", "w8a8", "w8a16")}
    assert s["w4a4"] < s["w4a8"] < s["w8a8"] < s["w8a16"]


def test_rotation_preserves_the_float_function(llava, images, prompts):
    rotated = ptq.apply(llava, Scheme(rotate=True))
    downs = [m for n, m in ptq.quant_linears(rotated.model).items() if n.endswith("down_proj")]
    assert len(downs) == 2 and downs[0].transform is not None  # the online Hadamard is in the path
    assert downs[0].transform.data_ptr() == downs[1].transform.data_ptr()  # one matrix, shared
    assert _sqnr(llava, Scheme(rotate=True), images, prompts) > 80


def test_rotation_refuses_norms_it_cannot_fold(llava):
    class OnePlusRMSNorm(torch.nn.Module):  # Gemma style: (1 + w)·x/rms(x)
        def __init__(self, n):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(n))

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    odd = ptq.copy.deepcopy(llava.model)
    odd.model.language_model.layers[0].input_layernorm = OnePlusRMSNorm(128)
    with pytest.raises(ValueError, match="folds norms"):
        ptq.apply(llava.replace(model=odd), Scheme(rotate=True))


def test_w4a4_with_rotation_beats_without_on_outlier_channels(outlier_llava, images, prompts):
    plain = _sqnr(outlier_llava, PRESETS["w4a4"], images, prompts)
    rotated = _sqnr(outlier_llava, replace(PRESETS["w4a4"], rotate=True), images, prompts)
    assert rotated > plain + 1.0


def test_gptq_beats_rtn_and_equals_rtn_without_correlation(llava, images, prompts):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    h = x.T.double() @ x.double()
    for gran in ("channel", "group"):
        rtn = rtn_weight(w, 4, gran, 16)
        gq = gptq_weight(w, h, 4, gran, 16)
        assert (x @ (w - gq).T).norm() < 0.8 * (x @ (w - rtn).T).norm()
        torch.testing.assert_close(gptq_weight(w, torch.eye(64), 4, gran, 16), rtn)  # nothing to propagate
    assert _sqnr(llava, replace(PRESETS["w4a16"], w_method="gptq"), images, prompts) > \
        _sqnr(llava, PRESETS["w4a16"], images, prompts) + 3


def test_weights_are_integer_codes_times_the_returned_scales():
    """What the exporter writes as INT4/INT8 initializers: weight == codes · scale on the signed grid."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 64, generator=g)
    x = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
    h = x.T.double() @ x.double()
    for bits, gran in ((4, "group"), (4, "channel"), (8, "channel"), (3, "group")):
        for fn in (lambda: rtn_weight(w, bits, gran, 16, return_scale=True),
                   lambda: gptq_weight(w, h, bits, gran, 16, return_scale=True)):
            q, scale = fn()
            assert scale.shape == ((24, 4) if gran == "group" else (24, 1))
            expanded = scale.repeat_interleave(64 // scale.shape[1], 1)
            codes = q / expanded
            torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
            assert codes.round().min() >= -(2 ** (bits - 1)) and codes.round().max() <= 2 ** (bits - 1) - 1
            torch.testing.assert_close(codes.round() * expanded, q, rtol=0, atol=1e-6)


def test_static_scales_depend_on_the_calibrated_token_set(llava):
    scheme = replace(PRESETS["w8a8"], a_mode="static")
    full = ptq.apply(llava, scheme, calibrator(CALIB))
    pruned = ptq.apply(llava, scheme, calibrator(CALIB, keep=8))
    sf = {n: m.act_scale for n, m in ptq.quant_linears(full.model).items()}
    sp = {n: m.act_scale for n, m in ptq.quant_linears(pruned.model).items()}
    assert sf.keys() == sp.keys() and len(sf) == 14  # 7 linears × 2 layers
    assert all(s > 0 for s in sf.values())
    assert any(not torch.equal(sf[n], sp[n]) for n in sf)


def test_apply_copies_and_checks(llava):
    before = {k: v.clone() for k, v in llava.model.state_dict().items()}
    q = ptq.apply(llava, replace(PRESETS["w4a4"], rotate=True))
    assert all(torch.equal(before[k], v) for k, v in llava.model.state_dict().items())
    assert llava.scheme is None and q.scheme.name == "w4a4" and q.rotation.shape == (128, 128)
    assert q.model.model.language_model.layers[0].mlp.down_proj.transform is not None
    with pytest.raises(ValueError, match="needs calibration"):
        ptq.apply(llava, replace(PRESETS["w8a8"], a_mode="static"))
    with pytest.raises(ValueError, match="already quantized"):
        ptq.apply(q, PRESETS["w8a8"])
    with pytest.raises(TypeError, match="Scheme"):
        ptq.apply(llava, "w4a4")
    with pytest.raises(ValueError, match="does not divide in_features"):
        ptq.apply(llava, replace(PRESETS["w4a16"], w_group_size=96))
    vis = ptq.apply(llava, replace(PRESETS["w8a8"], vision=True))
    names = ptq.quant_linears(vis.model)
    assert any(n.startswith("model.vision_tower") for n in names)
    assert any(n.startswith("model.multi_modal_projector") for n in names)
    assert not any(n == "lm_head" for n in names)


def test_random_hadamard_is_orthogonal():
    h = random_hadamard(16, seed=2)
    assert torch.allclose(h.abs(), torch.full((16, 16), 0.25, dtype=torch.float64))  # a ±1/√n Hadamard
    for n in (8, 128, 96, 40, 43):
        q = random_hadamard(n, seed=1)
        torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64))
    assert torch.equal(random_hadamard(64, 3), random_hadamard(64, 3))


def test_quantized_kv_cache_quantizes_each_token_once_per_head():
    from qapruner.quant import fake_quantize

    g = torch.Generator().manual_seed(0)
    cache = ptq.QuantizedKVCache(4)
    k1, v1 = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    k, v = cache.update(k1, v1, 0)
    ref_k = fake_quantize(k1, 4, symmetric=False, granularity="token")  # per (batch, head, token) over head_dim
    assert torch.equal(k, ref_k) and torch.equal(v, fake_quantize(v1, 4, symmetric=False, granularity="token"))
    k2 = torch.randn(1, 2, 1, 8, generator=g)
    k, _ = cache.update(k2, torch.randn(1, 2, 1, 8, generator=g), 0)
    assert k.shape == (1, 2, 6, 8) and torch.equal(k[:, :, :5], ref_k)  # stored values are not re-quantized
    assert torch.equal(k[:, :, 5:], fake_quantize(k2, 4, symmetric=False, granularity="token"))


def test_quantized_kv_cache(llava, images, prompts):
    s4 = _sqnr(llava, Scheme(kv_bits=4), images, prompts)
    s8 = _sqnr(llava, Scheme(kv_bits=8), images, prompts)
    assert 10 < s4 < s8 < 80
    q = ptq.apply(llava, Scheme(kv_bits=4))
    assert isinstance(ptq.make_cache(q), ptq.QuantizedKVCache)
    ids = generate(q, prefill_inputs(q, images[:2], prompts[:2], retention=0.5), max_new_tokens=3)
    assert ids.shape[0] == 2


def test_quantlinear_observes_after_transform():
    lin = torch.nn.Linear(8, 4, bias=True)
    t = random_hadamard(8, 0).float()
    q = QuantLinear(lin, t)
    x = torch.randn(3, 8)
    torch.testing.assert_close(q(x), lin(x), atol=1e-5, rtol=1e-5)  # W·T with x·T: the same function
    q.observe = q.want_hessian = True
    q(x)
    xt = (x @ t).double()
    torch.testing.assert_close(q.hessian, xt.T @ xt)
    assert q.amax == pytest.approx(float(xt.abs().max()), rel=1e-6) and q.tokens == 3


def test_sequential_calibration_sees_quantized_predecessors(llava):
    calls = []
    base = calibrator(CALIB[:2])

    def counting(model):
        calls.append(1)
        base(model)
    scheme = replace(PRESETS["w4a4"], a_mode="static")
    seq = ptq.apply(llava, scheme, counting)
    assert len(calls) == 2  # one pass per decoder layer
    one = ptq.apply(llava, replace(scheme, sequential=False), counting)
    assert len(calls) == 3
    s_seq = {n: m.act_scale for n, m in ptq.quant_linears(seq.model).items()}
    s_one = {n: m.act_scale for n, m in ptq.quant_linears(one.model).items()}
    first = [n for n in s_seq if ".layers.0." in n]
    later = [n for n in s_seq if ".layers.1." in n]
    assert all(torch.equal(s_seq[n], s_one[n]) for n in first)  # nothing quantized before layer 0
    assert any(not torch.equal(s_seq[n], s_one[n]) for n in later)


def test_half_precision_models(llava, images, prompts):
    from qapruner.model import tiny
    from qapruner.pipeline import encode_inputs

    half = llava.replace(model=tiny(seed=0).model.to(torch.bfloat16))
    batch = encode_inputs(half, images[:1], prompts[:1])
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        ref = half.model(**batch).logits
    assert torch.equal(logits(half, images[:1], prompts[:1], retention=1.0), ref)
    q = ptq.apply(half, replace(PRESETS["w4a4"], rotate=True, kv_bits=4))
    assert logits(q, images[:1], prompts[:1], keep=8).dtype == torch.bfloat16
