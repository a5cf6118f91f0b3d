"""export.quota and `python -m export --recipe`: the QUOTA recipe baked into llm_prefill.onnx / llm.onnx, equal
to qapruner.quota's torch layer loop, through ONNX Runtime and the slim runtime, and refused when it does not fit."""
import json

import numpy as np
import pytest
import torch

from export.__main__ import main
from export.artifact import LlmPrecision, Options, build, read_metadata, sha256_file
from export.quota import RecipeDecode, RecipePrefill, example_prefill
from qapruner import ptq, quota
from qapruner.model import load, save, tiny
from qapruner.scoring import Scoring

PROMPTS = ["USER: <image> what digit is in the top left ? ASSISTANT:",
           "USER: <image> how many digits are there ? ASSISTANT:",
           "USER: <image> is there a red digit ? ASSISTANT:",
           "USER: <image> what is the largest digit on left ? ASSISTANT:"]


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    """A tiny LLaVA with a 6-layer decoder saved as a llava-hf directory (N = 64 visual tokens)."""
    return save(tiny(seed=1, text_layers=6), tmp_path_factory.mktemp("models") / "deep-llava")


@pytest.fixture(scope="module")
def deep(deep_dir):
    return load(deep_dir)


@pytest.fixture(scope="module")
def recipe_path(deep, images, tmp_path_factory):
    """A recipe calibrated on the saved model (so its sha256 matches): V0 = 48 of 64, then the schedule."""
    pairs = list(zip(images, PROMPTS))
    r = quota.calibrate(deep, ptq.PRESETS["w4a16"], pairs, budget=0.45, pre_retention=0.75)
    assert r.v0 == 48 and r.keeps[-1] < 48
    return r.save(tmp_path_factory.mktemp("recipes") / "recipe.json")


def _reference(llava, recipe, images, prompts, max_new_tokens=6):
    return quota.answer(llava, recipe, images, prompts, keep=recipe.v0, scoring=Scoring(group_size=64),
                        max_new_tokens=max_new_tokens)


def test_keep_top_breaks_ties_by_the_lower_index_like_onnx_topk(tmp_path):
    from runtime.backends import OrtBackend

    score = torch.tensor([[0.5, 1.0, 1.0, 0.2, 1.0, 1.0, 0.0, 1.0], [0.0] * 8])
    want = torch.tensor([[1, 2, 4], [0, 1, 2]])
    assert torch.equal(quota.keep_top(score, 3), want)

    class Top(torch.nn.Module):
        def forward(self, s):
            return quota.keep_top(s, 3)
    prog = torch.onnx.export(Top(), (score,), dynamo=True, opset_version=21, input_names=["s"],
                             output_names=["top"], verbose=False)
    prog.save(str(tmp_path / "top.onnx"))
    got = OrtBackend(tmp_path / "top.onnx").infer({"s": score.numpy()})["top"]
    np.testing.assert_array_equal(got, want.numpy())


def test_traceable_modules_equal_the_torch_layer_loop(deep, recipe_path):
    recipe = quota.Recipe.load(recipe_path, deep)
    embeds, mask, pos, visual = example_prefill(deep, recipe)  # row 1 left-padded
    with torch.no_grad():
        out = RecipePrefill(deep, recipe).eval()(embeds, mask, pos, visual)
    logits, state, _ = quota.prefill(deep, recipe, embeds, mask, pos, visual.bool())
    torch.testing.assert_close(out[0], logits, atol=0, rtol=0)
    lengths = [out[1 + 2 * i].shape[2] for i in range(6)]
    assert lengths == [state.cache.layers[i].keys.shape[2] for i in range(6)]
    T = embeds.shape[1]
    assert lengths[recipe.layers[0]] == T - (recipe.v0 - recipe.keeps[0]) and lengths[-1] == T - (recipe.v0 - recipe.keeps[-1])
    # one decode step over the per-layer caches
    nxt = torch.randn(2, 1, embeds.shape[-1])
    with torch.no_grad():
        step = RecipeDecode(deep, recipe).eval()(nxt, torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                                                 pos[:, -1:] + 1, *out[1:])
    torch.testing.assert_close(step[0], quota.step(deep, state, nxt), atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def recipe_artifact(deep_dir, recipe_path, tmp_path_factory):
    """Built through the CLI without --keep: K comes from the recipe's V0."""
    out = tmp_path_factory.mktemp("engines") / "deep-quota"
    assert main(["--model", str(deep_dir), "--recipe", str(recipe_path), "--group-size", "64", "--out", str(out)]) == 0
    return out


def test_recipe_artifact_describes_itself(recipe_artifact, recipe_path):
    m = json.loads((recipe_artifact / "manifest.json").read_text())
    r = quota.Recipe.load(recipe_path)
    assert m["keep"] == r.v0 == 48
    info = m["llm"]["recipe"]
    assert (info["layers"], info["keeps"], info["v0"]) == (list(r.layers), list(r.keeps), r.v0)
    assert info["sha256"] == sha256_file(recipe_artifact / "recipe.json") == m["files"]["recipe.json"]["sha256"]
    assert quota.Recipe.load(recipe_artifact / "recipe.json") == r
    assert {"llm_prefill.onnx", "llm.onnx", "vision.onnx"} <= set(m["files"])
    for graph in ("llm_prefill", "llm"):
        meta = read_metadata(recipe_artifact / f"{graph}.onnx")
        assert meta["graph"] == graph and json.loads(meta["recipe"])["keeps"] == list(r.keeps)
    import onnx

    for graph in ("llm_prefill", "llm"):
        model = onnx.load(str(recipe_artifact / f"{graph}.onnx"))
        onnx.checker.check_model(model)
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}  # standard ops only
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert "TopK" in {n.op_type for n in onnx.load(str(recipe_artifact / "llm_prefill.onnx")).graph.node}


def test_runtime_answers_equal_torch_with_the_recipe(recipe_artifact, recipe_path, deep, images):
    from engines.build import build as build_engines
    from runtime.artifact import open_artifact
    from runtime.infer import run

    recipe = quota.Recipe.load(recipe_path)
    want = _reference(deep, recipe, images, PROMPTS)
    for backend_built in (False, True):
        if backend_built:
            doc = build_engines(recipe_artifact, "ort", log=lambda m: None)
            assert set(doc["files"]) == {"vision", "llm", "llm_prefill"}
        art = open_artifact(recipe_artifact, "ort")
        assert art.llm_prefill is not None
        got = run(art, images, PROMPTS, max_new_tokens=6)  # one batch: left padding, per-layer caches
        assert got["answers"] == want
    # the runtime hands the LLM the V0 kept visual tokens spliced into the prompt; the graph drops the rest
    p, _ = quota.prepare(deep, images, PROMPTS, keep=recipe.v0, scoring=Scoring(group_size=64))
    assert got["prefill_tokens"] == p.inputs_embeds.shape[1]


def test_int4_recipe_artifact(deep_dir, recipe_path, deep, images, tmp_path):
    import onnx

    from runtime.artifact import open_artifact
    from runtime.infer import run

    options = Options(keep=48, recipe=str(recipe_path), scoring=Scoring(group_size=64),
                      llm=LlmPrecision(weight_bits=4, w_method="rtn"))
    m = build(deep_dir, tmp_path / "deep-quota-w4", options, log=lambda x: None)
    for graph in ("llm_prefill", "llm"):
        model = onnx.load(str(tmp_path / "deep-quota-w4" / f"{graph}.onnx"))
        int4 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4]
        assert len(int4) == m["llm"]["int4_linears"] == 6 * 7
    recipe = quota.Recipe.load(recipe_path)
    sim = ptq.apply(deep, ptq.Scheme(w_bits=4, w_group_size=128, w_method="rtn"))
    got = run(open_artifact(tmp_path / "deep-quota-w4", "ort"), images, PROMPTS, max_new_tokens=6)["answers"]
    assert got == _reference(sim, recipe, images, PROMPTS)


def test_recipe_refusals(deep_dir, recipe_path, tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="--keep 48"):
        build(deep_dir, tmp_path / "a", Options(keep=20, recipe=str(recipe_path), scoring=Scoring(group_size=64)))
    with pytest.raises(ValueError, match="W8A8"):
        Options(keep=48, recipe=str(recipe_path), llm=LlmPrecision(weight_bits=8, int8_activations=True))
    with pytest.raises(ValueError, match="recalibrate"):  # a 2-layer model
        build(tiny_dir, tmp_path / "b", Options(keep=48, recipe=str(recipe_path), scoring=Scoring(group_size=64)))
    assert main(["--model", str(deep_dir), "--recipe", str(tmp_path / "missing.json"), "--out", str(tmp_path / "c")]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name != "missing.json"]  # nothing half-written
