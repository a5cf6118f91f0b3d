import numpy as np
import pytest

from qapruner import data


def test_scenes_are_deterministic_for_their_seed():
    a, b = data.make_scene("train", 5, seed=1), data.make_scene("train", 5, seed=1)
    assert np.array_equal(a.image, b.image) and a.questions == b.questions and a.digits == b.digits
    c = data.make_scene("train", 5, seed=2)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == (224, 224, 3) and a.image.dtype == np.uint8


def test_splits_are_disjoint_by_digit_sample():
    pools = {s: set(data.split_pool(s).tolist()) for s in data.SPLITS}
    assert not pools["train"] & pools["val"] and not pools["train"] & pools["test"] and not pools["val"] & pools["test"]
    assert sum(map(len, pools.values())) == 1797
    for i in range(30):
        assert {d[4] for d in data.make_scene("test", i).digits} <= pools["test"]
        assert {d[4] for d in data.make_scene("train", i).digits} <= pools["train"]
    with pytest.raises(ValueError, match="unknown split"):
        data.make_scene("dev", 0)


def test_answers_follow_from_the_scene():
    for i in range(40):
        s = data.make_scene("val", i)
        values = [d[0] for d in s.digits]
        assert len(set(values)) == len(values) and 3 <= len(values) <= 8
        # one digit per patch cell, labels where the digits are
        assert (s.patch_digit != data.BACKGROUND).sum() == len(values)
        for v, colour, r, c, _ in s.digits:
            assert s.patch_digit[r, c] == v and data.COLOUR_NAMES[s.patch_colour[r, c]] == colour
        q = {x.kind: x for x in s.questions}
        assert q["count"].answer == str(len(values))
        assert q["largest"].answer == str(max(values))
        probe = int(q["exists"].text.split()[3])
        assert q["exists"].answer == ("yes" if probe in values else "no")
        target = int(q["colour"].text.split()[4])
        assert q["colour"].answer == next(d[1] for d in s.digits if d[0] == target)
        quad = " ".join(q["quadrant"].text.split()[5:7])
        inside = [d[0] for d in s.digits if data._quadrant(d[2], d[3]) == quad]
        assert inside == [int(q["quadrant"].answer)]


def test_answers_are_balanced():
    scenes = [data.make_scene("train", i) for i in range(400)]
    answers = {k: [x.answer for s in scenes for x in s.questions if x.kind == k] for k in data.QUESTION_TYPES}
    assert 0.4 < answers["exists"].count("yes") / 400 < 0.6
    assert set(answers["count"]) == {str(n) for n in range(3, 9)}
    assert set(answers["colour"]) == set(data.COLOUR_NAMES)
    assert max(answers["colour"].count(c) for c in data.COLOUR_NAMES) / 400 < 0.3
    assert set(answers["quadrant"]) == {str(d) for d in range(10)}


def test_vocabulary_covers_every_prompt_and_answer():
    from qapruner.model import word_tokenizer

    tok = word_tokenizer(data.vocabulary())
    unk = tok.unk_token_id
    for i in range(50):
        s = data.make_scene("test", i)
        for p, q in zip(s.prompts(), s.questions):
            assert unk not in tok(f"{p} {q.answer}")["input_ids"]


def test_photo_scene():
    s = data.make_scene("test", 0, photo=1)
    assert s.image.shape == (224, 224, 3) and len(s.questions) == 5
    with pytest.raises(ValueError, match="photo"):
        data.make_scene("test", 0, photo=5)
