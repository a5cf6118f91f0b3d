"""python -m export: artifacts that describe themselves, round trips through ONNX Runtime for each
precision, and one-line errors that leave nothing behind."""
import json

import numpy as np
import pytest
import torch

from export.__main__ import main
from export.artifact import LlmPrecision, Options, VisionPrecision, build, read_metadata, sha256_file
from export.calibration import dataset_sha256
from qapruner import pipeline, ptq
from qapruner.scoring import Scoring
from runtime.backends import OrtBackend
from runtime.generate import greedy, splice


def _answers(art, llava, images, prompts):
    """The ONNX Runtime chain (vision.onnx -> numpy splice -> llm.onnx greedy) on HF-processed inputs."""
    m = json.loads((art / "manifest.json").read_text())
    vis, llm = OrtBackend(art / "vision.onnx"), OrtBackend(art / "llm.onnx", m["llm"]["session_options"])
    table = np.load(art / "embed_tokens.npy", allow_pickle=False)
    b = pipeline.encode_inputs(llava, images, prompts)
    v = vis.infer({"pixel_values": b["pixel_values"].numpy()})
    e, mask, pos = splice(b["input_ids"].numpy(), b["attention_mask"].numpy(), v["tokens"], v["indices"], table,
                          m["tokens"]["image_token_id"], m["positions"])
    ids = greedy(llm.infer, e, mask, pos, table, num_layers=m["llm"]["num_layers"], kv_heads=m["llm"]["kv_heads"],
                 head_dim=m["llm"]["head_dim"], eos_ids=m["tokens"]["eos_token_ids"],
                 pad_id=m["tokens"]["pad_token_id"], max_new_tokens=6)
    return ids, v["indices"]


@pytest.fixture(scope="module")
def fp32_artifact(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny-k10"
    manifest = build(tiny_dir, out, Options(keep=10, scoring=Scoring(group_size=64)), log=lambda m: None)
    return out, manifest


def test_manifest_and_metadata_describe_the_artifact(fp32_artifact, tiny_dir):
    out, manifest = fp32_artifact
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["keep"] == 10 and manifest["num_image_tokens"] == 64
    assert (manifest["alpha"], manifest["group_size"], manifest["bits"], manifest["semantic"]) == (0.7, 64, 4, "cls")
    assert manifest["vision"]["precision"] == "fp32" and manifest["llm"]["precision"] == "fp32"
    assert manifest["opset"] == {"vision": 21, "llm": 21}
    assert manifest["source"] == str(tiny_dir) and len(manifest["source_sha256"]) == 64
    assert set(manifest["versions"]) >= {"torch", "transformers", "onnx", "onnxruntime"}
    files = {p.name for p in out.iterdir()} - {"manifest.json"}
    assert files == set(manifest["files"]) >= {"vision.onnx", "llm.onnx", "embed_tokens.npy", "tokenizer.json"}
    for name, entry in manifest["files"].items():
        assert sha256_file(out / name) == entry["sha256"]
    for graph in ("vision", "llm"):
        meta = read_metadata(out / f"{graph}.onnx")
        assert meta["graph"] == graph and json.loads(meta["keep"]) == 10
        assert meta["source_sha256"] == manifest["source_sha256"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_fp32_answers_equal_torch(fp32_artifact, llava, images, prompts):
    out, manifest = fp32_artifact
    ids, indices = _answers(out, llava, images, prompts)
    ref = pipeline.answer(llava, images, prompts, keep=10, scoring=Scoring(group_size=64), max_new_tokens=6)
    assert [set(r) for r in indices.tolist()] == [set(r) for r in ref.indices.tolist()]
    np.testing.assert_array_equal(ids, ref.token_ids.numpy())


def test_fp16_round_trip(tiny_dir, tmp_path, llava, images, prompts):
    options = Options(keep=16, scoring=Scoring(group_size=64), vision=VisionPrecision(fp16=True),
                      llm=LlmPrecision(fp16=True))
    manifest = build(tiny_dir, tmp_path / "art", options, log=lambda m: None)
    assert (manifest["vision"]["precision"], manifest["llm"]["precision"]) == ("fp16", "fp16")
    import onnx
    vision = onnx.load(tmp_path / "art" / "vision.onnx")
    types = {i.data_type for i in vision.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types  # the tower's weights
    inferred = onnx.shape_inference.infer_shapes(vision)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    topk = next(n for n in vision.graph.node if n.op_type == "TopK")
    assert types[topk.input[0]] == onnx.TensorProto.FLOAT  # the score is ranked in float32
    ids, indices = _answers(tmp_path / "art", llava, images, prompts)
    ref = pipeline.answer(llava, images, prompts, keep=16, scoring=Scoring(group_size=64), max_new_tokens=6)
    overlap = np.mean([len(set(a) & set(b)) / 16 for a, b in zip(indices.tolist(), ref.indices.tolist())])
    assert overlap >= 0.9
    assert (ids[:, 0] == ref.token_ids[:, 0].numpy()).mean() >= 0.75


@pytest.mark.parametrize("llm", ["w4a16", "w8a8"])
def test_quantized_round_trip(tiny_dir, calib_dir, tmp_path, llava, images, prompts, llm):
    precision = {"w4a16": LlmPrecision(weight_bits=4, block_size=32, w_method="rtn"),
                 "w8a8": LlmPrecision(weight_bits=8, int8_activations=True)}[llm]
    options = Options(keep=16, scoring=Scoring(group_size=64), vision=VisionPrecision(int8=llm == "w8a8"),
                      llm=precision, calibration=str(calib_dir))
    manifest = build(tiny_dir, tmp_path / "art", options, log=lambda m: None)
    assert manifest["llm"]["precision"] == llm
    if llm == "w8a8":
        assert manifest["calibration"] == {"dir": str(calib_dir), "sha256": dataset_sha256(calib_dir),
                                           "pairs": 8, "tokens": "pruned"}
        assert manifest["opset"] == {"vision": 20, "llm": 20} and manifest["vision"]["int8_nodes"] > 0
        # the graph's own INT8 weights and scales mirrored into torch: the same quantized model
        from export.compare import mirror_int8
        from export.llm import Decoder
        from qapruner.quant import sqnr_db
        mirrored = mirror_int8(llava, tmp_path / "art" / "llm.onnx", ("model.language_model",))
        assert len(ptq.quant_linears(mirrored.model)) == manifest["llm"]["int8_nodes"] == 14
        p = pipeline.prefill_inputs(llava, images, prompts, keep=16, scoring=Scoring(group_size=64))
        feed = {"inputs_embeds": p.inputs_embeds, "attention_mask": p.attention_mask, "position_ids": p.position_ids}
        for name in manifest["llm"]["inputs"][3:]:
            feed[name] = torch.zeros(len(images), manifest["llm"]["kv_heads"], 0, manifest["llm"]["head_dim"])
        with torch.no_grad():
            want = Decoder(mirrored).eval()(*(feed[n] for n in manifest["llm"]["inputs"]))[0]
        got = OrtBackend(tmp_path / "art" / "llm.onnx").infer({k: v.numpy() for k, v in feed.items()})["logits"]
        assert sqnr_db(want, torch.from_numpy(got)) > 60
    else:
        assert manifest["llm"]["int4_linears"] == 7 * 2 and manifest["llm"]["session_options"] == {
            "session.qdq_matmulnbits_accuracy_level": "0"}
    ids, indices = _answers(tmp_path / "art", llava, images, prompts)
    ref = pipeline.prefill_inputs(llava, images, prompts, keep=16, scoring=Scoring(group_size=64))
    overlap = np.mean([len(set(a) & set(b)) / 16 for a, b in zip(indices.tolist(), ref.indices.tolist())])
    assert overlap >= (1.0 if llm == "w4a16" else 0.8)
    if llm == "w4a16":  # INT4 weights with float activations: the same tokens as torch's W4A16 simulation
        sim = ptq.apply(llava, ptq.Scheme(w_bits=4, w_group_size=32))
        want = pipeline.answer(sim, images, prompts, keep=16, scoring=Scoring(group_size=64), max_new_tokens=6)
        np.testing.assert_array_equal(ids, want.token_ids.numpy())


def _cli(tiny_dir, out, *extra):
    return main(["--model", str(tiny_dir), "--out", str(out), *extra])


@pytest.mark.parametrize("extra, message", [
    (["--keep", "65"], "keep must be in [1, 64]"),
    (["--keep", "4000"], "TopK limit of 3840"),
    (["--keep", "8", "--llm", "fp8"], "unsupported --llm precision 'fp8'"),
    (["--keep", "8", "--vision", "int4"], "unsupported --vision precision"),
    (["--keep", "8", "--vision", "fp16", "--llm", "bf16"], "unsupported --llm precision 'bf16'"),
    (["--keep", "8", "--llm", "w4a16", "--opset", "20"], "too low for INT4"),
    (["--keep", "8", "--opset", "17"], "too low"),
    (["--keep", "8", "--alpha", "1.5"], "alpha must be"),
    (["--keep", "8", "--llm", "w8a8", "--calibration", "/nonexistent/calib"], "/nonexistent/calib"),
])
def test_bad_input_one_line_and_nothing_written(tiny_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "engines" / "bad"
    assert _cli(tiny_dir, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()
    assert not (tmp_path / "engines").exists() or not list((tmp_path / "engines").iterdir())


def test_missing_model_and_existing_output(tiny_dir, tmp_path, capsys):
    assert _cli(tmp_path / "nope", tmp_path / "a", "--keep", "4") == 2
    assert "model directory not found" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    assert _cli(tiny_dir, tmp_path / "b", "--keep", "4") == 2
    assert "exists: pass --force" in capsys.readouterr().err
    assert (tmp_path / "b" / "keep.txt").exists()
    assert _cli(tiny_dir, tmp_path / "b", "--keep", "4", "--force") == 0
    assert not (tmp_path / "b" / "keep.txt").exists() and (tmp_path / "b" / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_failure_midway_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    import export.llm

    def boom(*a, **k):
        raise RuntimeError("simulated failure while exporting the LLM")
    monkeypatch.setattr(export.llm, "export_llm", boom)
    with pytest.raises(RuntimeError):
        build(tiny_dir, tmp_path / "art", Options(keep=4, scoring=Scoring(group_size=64)), log=lambda m: None)
    assert list(tmp_path.iterdir()) == []
