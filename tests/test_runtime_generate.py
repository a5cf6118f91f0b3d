"""runtime.generate: the numpy splice and text embedding equal the torch reference's."""
import numpy as np
import pytest
import torch

from qapruner import pipeline
from qapruner.pruning import select
from runtime.generate import splice, text_embedding


@pytest.mark.parametrize("positions", ["original", "contiguous"])
def test_splice_equals_torch(llava, images, prompts, positions):
    b = pipeline.encode_inputs(llava, images, prompts)  # left padded: the prompts differ in length
    n, d = llava.num_image_tokens, llava.model.config.text_config.hidden_size
    features = torch.randn(len(images), n, d)
    indices = select(torch.rand(len(images), n), 11)
    want = pipeline.splice(llava, b["input_ids"], b["attention_mask"], features, indices, positions)
    table = llava.model.get_input_embeddings().weight.detach().numpy()
    tokens = torch.gather(features, 1, indices[:, :, None].expand(-1, -1, d)).numpy()
    got = splice(b["input_ids"].numpy(), b["attention_mask"].numpy(), tokens, indices.numpy(), table,
                 llava.image_token_id, positions)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w.detach().numpy())


def test_text_embedding_equals_semantic_mean(llava, images, prompts):
    b = pipeline.encode_inputs(llava, images, prompts)
    table = llava.model.get_input_embeddings().weight.detach().numpy()
    special = [*llava.processor.tokenizer.all_special_ids, llava.image_token_id]
    got = text_embedding(b["input_ids"].numpy(), b["attention_mask"].numpy(), table, special)
    from qapruner.pipeline import text_embedding as reference
    want = reference(llava, b["input_ids"], b["attention_mask"]).detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_visual_mask_equals_quota_prepare(llava, images, prompts):
    from qapruner import quota
    from runtime.generate import visual_mask

    p, visual = quota.prepare(llava, images, prompts, keep=13)
    b = pipeline.encode_inputs(llava, images, prompts)
    got = visual_mask(b["input_ids"].numpy(), p.indices.numpy(), llava.image_token_id)
    np.testing.assert_array_equal(got, visual.numpy().astype(np.int64))
    assert (got.sum(1) == 13).all()
    starts = got.argmax(1)  # one contiguous block per row: what the prefill graph assumes
    assert all(got[i, s:s + 13].all() for i, s in enumerate(starts))
