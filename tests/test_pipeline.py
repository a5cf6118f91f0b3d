import subprocess
import sys

import pytest
import torch

from qapruner import ptq
from qapruner.model import save
from qapruner.pipeline import (_llm, answer, calibrator, encode_inputs, generate, logits, prefill_inputs,
                               splice)
from qapruner.scoring import Scoring, cls_attention, minmax_normalize
from qapruner.model import encode_images


def test_keep_all_reproduces_unpruned_logits_exactly(llava, images, prompts):
    # prompts 0 and 3 tokenise to the same length: no padding, HF's default positions apply
    batch = encode_inputs(llava, [images[0], images[3]], [prompts[0], prompts[3]])
    assert batch["attention_mask"].all()
    with torch.no_grad():
        ref = llava.model(**batch).logits
    for scoring in (Scoring(), Scoring(semantic="text"), Scoring(semantic=None)):
        got = logits(llava, [images[0], images[3]], [prompts[0], prompts[3]], keep=64, scoring=scoring)
        assert torch.equal(got, ref)


def test_padded_batch_rows_equal_single_runs(llava, images, prompts):
    batch = logits(llava, images, prompts, retention=0.25)
    mask = prefill_inputs(llava, images, prompts, retention=0.25).attention_mask
    for i in range(4):
        single = logits(llava, images[i:i + 1], prompts[i:i + 1], retention=0.25)
        torch.testing.assert_close(batch[i][mask[i].bool()], single[0], atol=1e-4, rtol=1e-4)


def test_pruned_prefill_shapes_and_order(llava, images, prompts):
    full = encode_inputs(llava, images, prompts)
    p = prefill_inputs(llava, images, prompts, keep=8)
    assert p.indices.shape == (4, 8) and p.indices.dtype == torch.int64
    assert torch.all(p.indices[:, 1:] > p.indices[:, :-1])
    assert p.inputs_embeds.shape[:2] == (4, full["input_ids"].shape[1] - 64 + 8)
    assert p.attention_mask.sum(1).tolist() == (full["attention_mask"].sum(1) - 56).tolist()
    # the kept visual tokens sit where the placeholder was, in ascending order
    enc = encode_images(llava.model, full["pixel_values"])
    row = 0
    start = int((full["input_ids"][row] == llava.image_token_id).nonzero()[0])
    torch.testing.assert_close(p.inputs_embeds[row, start:start + 8], enc["features"][row, p.indices[row]])
    # original positions: the kept tokens keep theirs, text after the image continues unpruned numbering
    row_pos = p.position_ids[0].tolist()
    assert row_pos[start:start + 8] == [start + int(i) for i in p.indices[0]]
    assert row_pos[start + 8] == start + 64 and row_pos[:start] == list(range(start))
    c = prefill_inputs(llava, images, prompts, keep=8, positions="contiguous")
    assert c.position_ids[0].tolist() == list(range(c.position_ids.shape[1]))
    torch.testing.assert_close(c.inputs_embeds, p.inputs_embeds)
    with pytest.raises(ValueError, match="positions"):
        prefill_inputs(llava, images[:1], prompts[:1], keep=8, positions="shifted")


def test_alpha_one_keeps_top_cls_attention(llava, images, prompts):
    p = prefill_inputs(llava, images[:2], prompts[:2], keep=16, scoring=Scoring(alpha=1.0))
    px = encode_inputs(llava, images[:2], prompts[:2])["pixel_values"]
    att = cls_attention(encode_images(llava.model, px, with_cls_attention=True)["attentions"], 64)
    ref = torch.sort(torch.topk(att, 16, dim=1).indices, dim=1).values
    assert torch.equal(p.indices, ref)
    torch.testing.assert_close(p.scores["SP"], minmax_normalize(att))


def test_text_semantic_is_cosine_to_the_mean_text_embedding(llava, images):
    prompt = "USER: <image> is there a red digit ? ASSISTANT:"
    p = prefill_inputs(llava, images[:1], [prompt], keep=8, scoring=Scoring("text", 1.0))
    tok = llava.processor.tokenizer
    words = prompt.replace("<image>", "").split()
    mean = llava.model.get_input_embeddings().weight[[tok.convert_tokens_to_ids(w) for w in words]].mean(0)
    px = encode_inputs(llava, images[:1], [prompt])["pixel_values"]
    feats = encode_images(llava.model, px)["features"][0]
    cos = torch.nn.functional.cosine_similarity(feats, mean[None], dim=-1)
    torch.testing.assert_close(p.scores["SP"][0], minmax_normalize(cos[None])[0], atol=1e-5, rtol=1e-5)


def test_right_padding_tokenizers_give_the_same_answers(images, prompts):
    from qapruner.model import tiny

    right = tiny(seed=0)
    right.processor.tokenizer.padding_side = "right"
    ref = answer(tiny(seed=0), images, prompts, keep=8, max_new_tokens=3)
    got = answer(right, images, prompts, keep=8, max_new_tokens=3)
    assert got.texts == ref.texts and torch.equal(got.token_ids, ref.token_ids)


def test_text_semantic_depends_on_the_prompt(llava, images):
    a = prefill_inputs(llava, images[:1], ["USER: <image> red ASSISTANT:"], keep=8, scoring=Scoring("text", 1.0))
    b = prefill_inputs(llava, images[:1], ["USER: <image> nine ASSISTANT:"], keep=8, scoring=Scoring("text", 1.0))
    assert not torch.equal(a.scores["SP"], b.scores["SP"])


def test_greedy_cache_decoding_equals_recomputation(llava, images, prompts):
    p = prefill_inputs(llava, images[:2], prompts[:2], retention=0.5)
    ids = generate(llava, p, max_new_tokens=4)
    embeds, mask, pos = p.inputs_embeds, p.attention_mask, p.position_ids
    embed = llava.model.get_input_embeddings()
    for step in range(ids.shape[1]):
        if step:
            pos = torch.cat([pos, pos[:, -1:] + 1], 1)
        with torch.no_grad():
            nxt = _llm(llava, embeds, mask, pos, None).logits[:, -1].argmax(-1)
        assert torch.equal(nxt, ids[:, step])
        embeds = torch.cat([embeds, embed(nxt[:, None])], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


def test_answer_is_deterministic_and_batched(llava, images, prompts):
    a = answer(llava, images, prompts, retention=0.125, max_new_tokens=3)
    b = answer(llava, images, prompts, retention=0.125, max_new_tokens=3)
    assert a.texts == b.texts and torch.equal(a.indices, b.indices) and len(a.texts) == 4
    assert a.indices.shape == (4, 8)
    single = answer(llava, images[1:2], prompts[1:2], retention=0.125, max_new_tokens=3)
    assert single.texts[0] == a.texts[1] and torch.equal(single.indices[0], a.indices[1])


def test_answer_with_quantized_schemes(llava, images, prompts):
    rot = ptq.apply(llava, ptq.Scheme(rotate=True))
    fp = answer(llava, images, prompts, keep=16, max_new_tokens=3)
    assert answer(rot, images, prompts, keep=16, max_new_tokens=3).texts == fp.texts
    static = ptq.replace(ptq.PRESETS["w8a8"], a_mode="static")
    with pytest.raises(ValueError, match="at least one"):
        answer(llava, images, prompts, keep=16, scheme=static)
    q = answer(llava, images, prompts, keep=16, scheme=static, calibration=list(zip(images, prompts)),
               max_new_tokens=3)
    assert torch.equal(q.indices, fp.indices)  # the vision side stays float unless scheme.vision


def test_calibrator_runs_on_the_pruned_token_set(llava, images, prompts):
    lengths = []
    hook = llava.model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        calibrator(list(zip(images[:1], prompts[:1])))(llava)
        calibrator(list(zip(images[:1], prompts[:1])), keep=8)(llava)
    finally:
        hook.remove()
    assert lengths[0] - lengths[1] == 64 - 8
    with pytest.raises(ValueError, match="at least one"):
        calibrator([])


@pytest.mark.parametrize("kwargs,match", [
    (dict(keep=0), "keep"), (dict(keep=65), r"\[1, 64\]"), (dict(retention=0.0), "retention"),
    (dict(retention=1.5), "retention"), (dict(keep=4, scoring=Scoring(group_size=96)), "does not divide"),
])
def test_bad_pruning_arguments(llava, images, prompts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prefill_inputs(llava, images[:1], prompts[:1], **kwargs)


def test_bad_inputs(llava, images, prompts):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        answer(llava, images[:2], prompts[:1], keep=4)
    with pytest.raises(ValueError, match="exactly once, found 0"):
        answer(llava, images[:1], ["what digit is this ?"], keep=4)
    with pytest.raises(ValueError, match="exactly once, found 2"):
        answer(llava, images[:1], ["<image> <image> what"], keep=4)
    with pytest.raises(ValueError, match="empty"):
        answer(llava, images[:1], ["  "], keep=4)
    with pytest.raises(ValueError, match="no images"):
        answer(llava, [], [], keep=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        answer(llava, images[:1], prompts[:1], keep=4, max_new_tokens=0)


def test_splice_keeps_text_and_drops_unkept(llava):
    n = llava.num_image_tokens
    ids = torch.tensor([[5] + [llava.image_token_id] * n + [7, 8]])
    feats = torch.arange(n, dtype=torch.float32)[None, :, None].expand(1, n, 128).contiguous()
    emb, mask, pos = splice(llava, ids, torch.ones_like(ids), feats, torch.tensor([[3, 10, 63]]))
    assert emb.shape == (1, 6, 128) and pos.tolist() == [[0, 4, 11, 64, 65, 66]]
    _, _, pos = splice(llava, ids, torch.ones_like(ids), feats, torch.tensor([[3, 10, 63]]), "contiguous")
    assert pos.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert emb[0, 1:4, 0].tolist() == [3.0, 10.0, 63.0]
    table = llava.model.get_input_embeddings().weight
    assert torch.equal(emb[0, 0], table[5]) and torch.equal(emb[0, 4], table[7])


def test_cli(tmp_path, llava, images):
    model = save(llava, tmp_path / "m")
    img = tmp_path / "a.png"
    images[0].save(img)
    base = [sys.executable, "-m", "qapruner.pipeline", "--model", str(model)]
    r = subprocess.run(base + ["--image", str(img), "--prompt", "USER: <image> what ? ASSISTANT:",
                               "--retention", "0.25", "--scheme", "w4a4", "--max-new-tokens", "2", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json
    out = json.loads(r.stdout)
    assert out["scheme"]["name"] == "w4a4" and len(out["answers"][0]["kept"]) == 16
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    r = subprocess.run(base + ["--image", str(bad), "--prompt", "USER: <image> what"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: cannot read image") and r.stderr.count("\n") == 1
