"""export.llm and export.qdq: the decoder graph with KV cache, INT4 block DQ of the core library's codes,
and ORT INT8 Q/DQ, each against torch."""
import numpy as np
import onnx
import pytest
import torch

from export.llm import Decoder, export_llm, int4_weights, io_names, kv_shape, weight_codes
from export.qdq import quantize_int8, weight_nodes
from qapruner import ptq
from qapruner.quant import sqnr_db
from runtime.backends import OrtBackend


def _feeds(llava, batch=2, seq=6, past=0, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    n = llava.model.config.text_config.num_hidden_layers
    hkv, dh = kv_shape(llava)
    d = llava.model.config.text_config.hidden_size
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    if pad:
        mask[0, :2] = 0  # left padding in row 0
    pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)[:, past:]
    feed = {"inputs_embeds": torch.randn(batch, seq, d, generator=g), "attention_mask": mask, "position_ids": pos}
    for name in io_names(n)[0][3:]:
        feed[name] = torch.randn(batch, hkv, past, dh, generator=g)
    return feed


def _torch(llava, feed):
    names = io_names(llava.model.config.text_config.num_hidden_layers)
    with torch.no_grad():
        out = Decoder(llava).eval()(*(feed[n] for n in names[0]))
    return dict(zip(names[1], (t.numpy() for t in out)))


@pytest.fixture(scope="module")
def fp32_graph(llava, tmp_path_factory):
    return export_llm(llava, tmp_path_factory.mktemp("llm") / "llm.onnx")


@pytest.mark.parametrize("past", [0, 4])
def test_fp32_prefill_and_decode_match_torch(llava, fp32_graph, past):
    session = OrtBackend(fp32_graph)
    feed = _feeds(llava, past=past, seq=1 if past else 6)
    got = session.infer({k: v.numpy() for k, v in feed.items()})
    want = _torch(llava, feed)
    assert got["logits"].shape == (2, 1, llava.model.config.text_config.vocab_size)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, atol=1e-4, rtol=1e-4, err_msg=name)


def test_decoder_equals_hf_forward(llava):
    """The wrapper adds nothing: its last logits are the HF model's with a DynamicCache."""
    feed = _feeds(llava, past=0)
    with torch.no_grad():
        hf = llava.model(inputs_embeds=feed["inputs_embeds"], attention_mask=feed["attention_mask"],
                         position_ids=feed["position_ids"]).logits[:, -1:]
    np.testing.assert_allclose(_torch(llava, feed)["logits"], hf.numpy(), atol=1e-6, rtol=0)


def test_standard_onnx_ops_only(fp32_graph):
    model = onnx.load(fp32_graph)
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)


@pytest.fixture(scope="module")
def w4(llava):
    return ptq.apply(llava, ptq.Scheme(w_bits=4, w_group_size=32))  # RTN, no calibration needed


def test_weight_codes_reproduce_the_core_weights(w4):
    codes = weight_codes(w4)
    linears = ptq.quant_linears(w4.model)
    assert set(codes) == set(linears) and codes
    for name, (c, s, bits, _) in codes.items():
        assert bits == 4 and c.min() >= -8 and c.max() <= 7
        w = np.repeat(s, c.shape[1] // s.shape[1], 1) * c
        np.testing.assert_array_equal(w.astype(np.float32), linears[name].weight.numpy())


def test_int4_block_dq_graph(llava, w4, tmp_path):
    path = export_llm(w4, tmp_path / "llm.onnx")
    model, done = int4_weights(onnx.load(path), weight_codes(w4))
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == len(done) == len(ptq.quant_linears(w4.model))
    inits = {i.name: i for i in model.graph.initializer}
    for n in dq:
        assert inits[n.input[0]].data_type == onnx.TensorProto.INT4
        assert {a.name: a.i for a in n.attribute} == {"axis": 0, "block_size": 32}
    onnx.save(model, path)
    feed = _feeds(llava)
    want = _torch(w4, feed)  # torch with the same fake-quantized weights
    np_feed = {k: v.numpy() for k, v in feed.items()}
    # W4A16: float activations; ORT fuses DQ+MatMul into MatMulNBits and must stay at float accuracy
    exact = OrtBackend(path, {"session.qdq_matmulnbits_accuracy_level": "0"}).infer(np_feed)
    for name, w in want.items():
        np.testing.assert_allclose(exact[name], w, atol=1e-4, rtol=1e-4, err_msg=name)
    # W4A8: MatMulNBits with INT8 activations: close, not equal
    w4a8 = OrtBackend(path, {"session.qdq_matmulnbits_accuracy_level": "4"}).infer(np_feed)
    assert 20 < sqnr_db(torch.from_numpy(want["logits"]), torch.from_numpy(w4a8["logits"])) < 120


def test_int4_refuses_other_bits_and_odd_blocks(llava, tmp_path):
    w8 = ptq.apply(llava, ptq.Scheme(w_bits=8, w_granularity="channel"))
    path = export_llm(w8, tmp_path / "llm.onnx")
    with pytest.raises(ValueError, match="4-bit"):
        int4_weights(onnx.load(path), weight_codes(w8))
    w4_16 = ptq.apply(llava, ptq.Scheme(w_bits=4, w_group_size=16))
    with pytest.raises(ValueError, match="block size 16"):
        int4_weights(onnx.load(export_llm(w4_16, tmp_path / "l16.onnx")), weight_codes(w4_16))


def test_int8_qdq_by_onnxruntime(llava, fp32_graph, tmp_path):
    with pytest.raises(ValueError, match="opset"):  # ORT cannot load its own opset-21 QDQ output
        quantize_int8(fp32_graph, tmp_path / "q.onnx", [{}])
    fp32_graph = export_llm(llava, tmp_path / "llm20.onnx", opset=20)
    feeds = [{k: v.numpy() for k, v in _feeds(llava, seed=s).items()} for s in range(4)]
    head = llava.model.lm_head.weight.detach().numpy().T
    nodes = quantize_int8(fp32_graph, tmp_path / "q.onnx", feeds, exclude=[head])
    model = onnx.load(tmp_path / "q.onnx")
    n_layers = llava.model.config.text_config.num_hidden_layers
    assert len(nodes) == 7 * n_layers  # q k v o gate up down per layer; the LM head stays float
    assert len(weight_nodes(onnx.load(fp32_graph))) == len(nodes) + 1
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    inits = {i.name: i for i in model.graph.initializer}
    assert q and all(inits[n.input[2]].data_type == onnx.TensorProto.INT8 for n in q)  # symmetric, signed
    assert all(np.all(onnx.numpy_helper.to_array(inits[n.input[2]]) == 0) for n in q)
    got = OrtBackend(tmp_path / "q.onnx").infer(feeds[0])
    want = _torch(llava, {k: torch.from_numpy(v) for k, v in feeds[0].items()})
    assert sqnr_db(torch.from_numpy(want["logits"]), torch.from_numpy(got["logits"])) > 25
