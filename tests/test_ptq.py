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
    assert _sqnr(llava, Scheme(rotate=True), images, prompts) > 80


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
    for n in (8, 128, 96):
        q = random_hadamard(n, seed=1)
        torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64))
    assert torch.equal(random_hadamard(64, 3), random_hadamard(64, 3))


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
