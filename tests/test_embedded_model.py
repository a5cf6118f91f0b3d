"""The shipped DigitsVQA model: loads through the same path as any llava-hf directory and has learned."""
from pathlib import Path

import numpy as np
import pytest

from qapruner import data
from qapruner.evaluate import accuracy
from qapruner.model import load
from qapruner.scoring import Scoring

MODEL = Path(__file__).parent.parent / "models" / "digits-llava"


@pytest.fixture(scope="module")
def embedded():
    return load(MODEL)


def test_shipped_files(embedded):
    size = sum(f.stat().st_size for f in MODEL.glob("*.safetensors"))
    assert size <= 25 * 2**20
    assert embedded.num_image_tokens == 256
    assert embedded.model.config.vision_config.image_size == 224


def test_float_accuracy_on_200_test_questions(embedded):
    items = data.questions("test", 200, 0)
    assert accuracy(embedded, items, retention=1.0, scoring=Scoring()) >= 0.80


def test_fast_training_evaluation_matches_the_pipeline(embedded):
    """train.evaluate_fast (shared-prefix forward) and the pipeline agree question by question."""
    from qapruner.train import evaluate_fast

    fast = evaluate_fast(embedded, "test", 25, 0)
    items = [(s, q) for i in range(25) for s in [data.make_scene("test", i)] for q in s.questions]
    slow = accuracy(embedded, items, retention=1.0, scoring=Scoring())
    assert fast["overall"] == pytest.approx(slow, abs=0.02)


def test_demo_overlay(tmp_path):
    from qapruner.demo import kept_overlay

    img = np.full((224, 224, 3), 200, np.uint8)
    kept_overlay(img, [0, 17, 255], 16, tmp_path / "k.png")
    from PIL import Image

    pic = np.asarray(Image.open(tmp_path / "k.png"))
    assert pic.shape == (448, 448, 3)
    assert pic[10, 10].mean() > 150 and pic[100, 300].mean() < 80  # kept bright, dropped darkened
