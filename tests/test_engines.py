"""engines.build and engines.bench: ONNX Runtime engines everywhere, TensorRT where it exists (a clean
message here), and the benchmark's arithmetic on a tiny model."""
import json
import shutil

import numpy as np
import pytest

from engines import bench
from engines.build import _main as build_main
from engines.build import build, tensorrt_status
from export.artifact import Options, build as export
from export.llm import export_llm
from qapruner.scoring import Scoring


@pytest.fixture(scope="module")
def artifact(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny"
    export(tiny_dir, out, Options(keep=8, scoring=Scoring(group_size=64)), log=lambda m: None)
    return out


def test_ort_engines_record_what_they_are(artifact, tmp_path):
    art = tmp_path / "a"
    shutil.copytree(artifact, art)
    lines = []
    info = build(art, log=lines.append)
    usable, why = tensorrt_status()
    assert info["backend"] == ("tensorrt" if usable else "onnxruntime")
    assert lines == [f"{art}: {info['backend']} engines ({info['reason']})"]
    doc = json.loads((art / "engines.json").read_text())
    assert doc["artifact_keep"] == 8 and doc["precisions"] == {"vision": "fp32", "llm": "fp32"}
    if not usable:
        assert why in doc["reason"] and doc["graph_optimization_level"] == "ORT_ENABLE_EXTENDED"
        assert {(art / f["file"]).name for f in doc["files"].values()} == {"vision.ort.onnx", "llm.ort.onnx"}


def test_tensorrt_absent_is_a_message(artifact, tmp_path, capsys):
    usable, why = tensorrt_status()
    if usable:
        pytest.skip("tensorrt is usable here")
    assert "tensorrt" in why
    with pytest.raises(RuntimeError, match="--backend trt: tensorrt"):
        build(artifact, backend="trt", log=lambda m: None)
    assert build_main([str(artifact), "--backend", "trt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --backend trt") and "\n" not in err


def test_not_an_artifact(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert build_main([str(tmp_path / "x")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_flops_and_prefill_rows(llava, tmp_path):
    cfg = bench._cfg(llava)
    # the FLOP count: linear in T for the MatMuls, quadratic for attention, LM head once
    f1, f2 = bench.llm_flops(cfg, 10), bench.llm_flops(cfg, 20)
    head = 2 * cfg["hidden_size"] * cfg["vocab_size"]
    attn = lambda t: cfg["num_layers"] * 4 * t * t * cfg["heads"] * cfg["head_dim"]  # noqa: E731
    assert (f2 - head - attn(20)) == pytest.approx(2 * (f1 - head - attn(10)))
    rows = bench.prefill_rows(export_llm(llava, tmp_path / "llm.onnx"), cfg, 64, repeats=2, gflops=50.0)
    assert [r["retention"] for r in rows] == list(bench.RETENTIONS)
    assert [r["visual_tokens"] for r in rows] == [64, 32, 16, 8]
    assert rows[0]["speedup"] == 1 and rows[0]["flop_floor_speedup"] == 1
    assert all(a["flop_floor_speedup"] < b["flop_floor_speedup"] for a, b in zip(rows, rows[1:]))
    assert all(r["seconds"] > 0 and r["achieved_gflops"] > 0 for r in rows)


def test_score_select_graph_equals_the_vision_graph(llava, tmp_path):
    paths = bench._graphs(llava, tmp_path, 8, w4=False)
    from runtime.backends import OrtBackend

    pixels = np.random.default_rng(0).standard_normal((1, 3, 112, 112)).astype(np.float32)
    enc = OrtBackend(paths["encoder"]).infer({"pixel_values": pixels})
    tail = OrtBackend(paths["score_select"]).infer({"features": enc["features"], "cls_rows": enc["cls_attention"]})
    whole = OrtBackend(paths["vision"]).infer({"pixel_values": pixels})
    np.testing.assert_allclose(tail["scores"], whole["scores"], atol=1e-6)
    np.testing.assert_array_equal(tail["indices"], whole["indices"])
    v = bench.vision_fraction(paths, 112, repeats=2)
    assert v["fraction"] == pytest.approx(v["score_prune_s"] / v["encoder_s"]) and v["score_prune_s"] > 0


def test_layer_flops_count_each_layer_at_its_own_length(llava):
    cfg = bench._cfg(llava)
    L = cfg["num_layers"]
    assert bench.layer_flops(cfg, [40] * L) == pytest.approx(bench.llm_flops(cfg, 40))
    # shrinking the sequence from layer 1 on saves exactly that layer's share
    one = dict(cfg, num_layers=1)
    saved = bench.llm_flops(one, 40) - bench.llm_flops(one, 10)
    assert bench.layer_flops(cfg, [40] + [10] * (L - 1)) == pytest.approx(bench.llm_flops(cfg, 40) - (L - 1) * saved)
