"""qapruner.quota: schedule properties, recipe round trip and refusal, the layer loop against the HF decoder,
token dropping inside the LLM, and calibration end to end on the tiny model."""
import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from qapruner import pipeline, ptq, quota
from qapruner.model import tiny

CALIB_PROMPTS = ["USER: <image> what digit is in the top left ? ASSISTANT:",
                 "USER: <image> how many digits are there ? ASSISTANT:"]


@pytest.fixture(scope="module")
def deep():
    """A tiny LLaVA with a 6-layer decoder, so that there are candidate layers past the first two."""
    return tiny(seed=1, text_layers=6)


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("p_min", [0.05, 0.3, 1.0])
def test_schedule_is_non_increasing_with_floor(tau, p_min):
    s = [0.3, 0.01, 0.2, 0.05, 0.6]
    ratios, keeps = quota.schedule(s, 576, tau, p_min)
    assert all(b <= a for a, b in zip(ratios, ratios[1:])) and all(b <= a for a, b in zip(keeps, keeps[1:]))
    assert min(ratios) >= p_min - 1e-12 and keeps == [int(np.ceil(r * 576 - 1e-9)) for r in ratios]
    assert ratios[-1] == pytest.approx(p_min)  # the whole drop budget B = 1 − p_min is spent by the last layer


def test_sensitive_layers_drop_less():
    ratios, _ = quota.schedule([0.9, 0.1], 100, tau=0.2, p_min=0.1)
    drops = [1 - ratios[0], ratios[0] - ratios[1]]
    assert drops[0] < drops[1]  # the sensitive first layer gets the smaller share of the drop budget


def test_budget_met_within_one_token_per_layer():
    layers, n = [2, 3, 4], 576
    for budget in (0.3, 0.5, 0.8):
        fit = quota.fit_schedule([0.2, 0.1, 0.3], layers, 12, n, n, budget)
        got = quota.processed_fraction(fit["keeps"], layers, 12, n, n)
        assert got == pytest.approx(fit["achieved"]) and got <= budget + 1 / n
        assert budget - got < 0.05
    with pytest.raises(ValueError, match="unreachable"):
        quota.fit_schedule([0.2], [2], 3, n, n, 0.3)  # 2 of 3 layers always see every token
    # pre-LLM pruning to V0 makes it reachable
    fit = quota.fit_schedule([0.2], [2], 3, 256, n, 0.3)
    assert fit["achieved"] <= 0.3 + 1 / n


def _recipe(llava, keeps, layers=(2,), **kw):
    n = llava.num_image_tokens
    return quota.Recipe(model_sha256="", scheme={}, kv_bits=None,
                        num_layers=llava.model.config.text_config.num_hidden_layers, n=n, v0=kw.pop("v0", n),
                        pre_retention=1.0, layers=tuple(layers), keeps=tuple(keeps),
                        ratios=tuple(k / n for k in keeps), tau=1.0, p_min=0.1, budget=1.0, achieved=1.0, **kw)


def test_layer_loop_equals_the_hf_decoder(deep, images, prompts):
    p, visual = quota.prepare(deep, images, prompts)
    n = deep.num_image_tokens
    keep_all = _recipe(deep, [n, n], layers=(2, 3))
    logits, _, _ = quota.prefill(deep, keep_all, p.inputs_embeds, p.attention_mask, p.position_ids, visual)
    with torch.no_grad():
        hf = deep.model(inputs_embeds=p.inputs_embeds, attention_mask=p.attention_mask,
                        position_ids=p.position_ids).logits[:, -1:]
    torch.testing.assert_close(logits, hf, atol=1e-5, rtol=1e-5)
    ids = quota.generate(deep, keep_all, p, visual, max_new_tokens=5)
    torch.testing.assert_close(ids, pipeline.generate(deep, p, max_new_tokens=5))


def test_tokens_drop_inside_the_llm(deep, images, prompts):
    p, visual = quota.prepare(deep, images, prompts)
    recipe = _recipe(deep, [40, 20], layers=(2, 3))
    logits, state, _ = quota.prefill(deep, recipe, p.inputs_embeds, p.attention_mask, p.position_ids, visual)
    T = p.inputs_embeds.shape[1]
    lens = [m.shape[1] for m in state.key_masks]
    assert lens == [T, T, T - 24, T - 44, T - 44, T - 44]  # KV cache and mask shrink from layer 2 on
    assert [state.cache.layers[i].keys.shape[2] for i in range(6)] == lens
    assert state.kept[2].shape == (len(images), 40) and state.kept[3].shape == (len(images), 20)
    ids = quota.generate(deep, recipe, p, visual, max_new_tokens=4)
    assert ids.shape[0] == len(images)
    again = quota.generate(deep, recipe, p, visual, max_new_tokens=4)
    torch.testing.assert_close(ids, again)  # deterministic


def test_recipe_round_trip_and_refusal(deep, llava, tmp_path):
    r = _recipe(deep, [30, 10], layers=(2, 3), percentiles={"2": {"magnitude": [0.0, 1.0]}})
    path = r.save(tmp_path / "recipe.json")
    assert quota.Recipe.load(path, deep) == r
    with pytest.raises(ValueError, match="recalibrate"):
        quota.Recipe.load(path, llava)  # another decoder depth
    other_n = tiny(seed=1, text_layers=6, image_size=56)
    with pytest.raises(ValueError, match="N = 64"):
        quota.Recipe.load(path, other_n)
    raw = json.loads(path.read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**raw, "keeps": [10, 30]}))
    with pytest.raises(ValueError, match="non-increasing"):
        quota.Recipe.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({**raw, "format": "qapruner-quota-recipe/0"}))
    with pytest.raises(ValueError, match="not a qapruner-quota-recipe/1"):
        quota.Recipe.load(tmp_path / "old.json")
    with pytest.raises(ValueError, match="\\[2, 5\\]"):
        _recipe(deep, [30], layers=(1,))


def test_calibrate_end_to_end(deep, images):
    pairs = list(zip(images, CALIB_PROMPTS * 2))
    scheme = replace(ptq.PRESETS["w4a4"], kv_bits=4)
    recipe = quota.calibrate(deep, scheme, pairs, budget=0.6)
    assert recipe.layers[0] >= 2 and recipe.layers[-1] <= 4  # never the first two, not the last block
    assert recipe.achieved <= 0.6 + 1 / recipe.n and recipe.kv_bits == 4
    assert set(recipe.percentiles) == {str(l) for l in recipe.layers}
    assert all(lo <= hi for per in recipe.percentiles.values() for lo, hi in per.values())
    assert set(recipe.statistics) == {str(l) for l in range(6)}
    again = quota.calibrate(deep, scheme, pairs, budget=0.6)
    assert asdict(again) == asdict(recipe)  # deterministic


def test_fastv_recipe_meets_the_budget(deep):
    r = quota.fastv_recipe(deep, 0.5)
    assert r.layers == (2,) and r.achieved <= 0.5 + 1 / r.n
    assert quota.processed_fraction([r.keeps[0] + 1], [2], 6, r.v0, r.n) > 0.5 + 1 / r.n  # the largest such K
    with pytest.raises(ValueError, match="unreachable"):
        quota.fastv_recipe(deep, 0.2)


def test_evaluate_all_methods_at_one_budget(deep, images):
    from qapruner import data

    items = data.questions("test", 4, seed=0)
    pairs = list(zip(images[:2], CALIB_PROMPTS))
    res = quota.evaluate(deep, ptq.PRESETS["w4a16"], budget=0.5, pre_retention=0.8, items=items, calib_pairs=pairs)
    assert set(res) == set(quota.BASELINES)
    assert all(0 <= r["accuracy"] <= 1 for r in res.values())
    assert res["visionzip"]["processed"] == res["qapruner"]["processed"] == 0.5
    assert res["quota"]["processed"] <= 0.5 + 1 / 64 and res["fastv"]["processed"] <= 0.5 + 1 / 64


def test_pre_retention_only_as_deep_as_needed():
    assert quota.pre_retention_for(0.30, 3) == pytest.approx(0.4)  # 2 full layers + a quarter at layer 2
    assert quota.pre_retention_for(0.30, 32) == 1.0  # a deep decoder meets 30% on its own
    for budget in (0.125, 0.3, 0.5):
        for layers in (3, 6, 12):
            pre = quota.pre_retention_for(budget, layers)
            # with V0 = pre·N and a quarter of V0 from layer 2 on, the budget is met
            assert (2 * pre + (layers - 2) * 0.25 * pre) / layers <= budget + 1e-6 or pre == 1.0  # 6-decimal rounding
    with pytest.raises(ValueError):
        quota.pre_retention_for(0.3, 2)


def test_pre_flag_takes_auto_or_a_retention():
    assert quota._pre("auto") == "auto" and quota._pre("0.4") == 0.4
    for bad in ("0", "1.5", "half"):
        with pytest.raises(ValueError):
            quota._pre(bad)
